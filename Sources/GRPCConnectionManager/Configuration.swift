import GRPCCMHandlers
import GRPCCMPool
import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire
import Synchronization

/// How channels connect and call. Every field has a documented default; `validate()` names the first bad field.
public struct Configuration: Sendable, Hashable {
    /// Every field, behind one immutable reference: copies of a configuration (one per channel, one per service of a
    /// manager) share it, so a channel holds 8 bytes of it instead of about 670. Setting a field to a new value stores
    /// a new one (a copy of all the fields: a table filled entry by entry is copied each time), which suits a
    /// configuration set up once and then only read.
    private var storage: Storage

    /// Largest message sent or received, in bytes. Default 4 MiB (gRPC's receive default; the Go original's README
    /// value). A larger response fails with RESOURCE_EXHAUSTED and the connection is kept.
    public var maxMessageSize: Int {
        get { self.storage.fields.maxMessageSize }
        set { self.update(\.maxMessageSize, to: newValue) }
    }

    /// Longest a connection attempt (TCP connect plus the server's HTTP/2 SETTINGS) may take. Default 10 s (the
    /// Go original's MinConnectTimeout). A server that accepts TCP and never speaks HTTP/2 fails the attempt then.
    public var minConnectTimeout: Duration {
        get { self.storage.fields.minConnectTimeout }
        set { self.update(\.minConnectTimeout, to: newValue) }
    }

    /// Interval between keepalive PINGs, measured from the last bytes read. Default 30 s (the Go original).
    /// Doubled after a GOAWAY `too_many_pings` (gRFC A8), for the service's connections on that loop: the others take
    /// it when they next connect, and each loop of a `ReactorGroup` learns it on its own.
    public var keepAliveTime: Duration {
        get { self.storage.fields.keepAliveTime }
        set { self.update(\.keepAliveTime, to: newValue) }
    }

    /// How long nothing at all may be read after a keepalive PING (no ACK, no other bytes: any count as life, as in
    /// grpc-go) before the connection is declared dead: it closes, its calls fail with UNAVAILABLE and it goes to
    /// TRANSIENT_FAILURE. Default 5 s. Also set as TCP_USER_TIMEOUT.
    public var keepAliveTimeout: Duration {
        get { self.storage.fields.keepAliveTimeout }
        set { self.update(\.keepAliveTimeout, to: newValue) }
    }

    /// Whether keepalive PINGs are sent while no call is open. Default true (the Go original).
    public var keepAlivePermitWithoutStream: Bool {
        get { self.storage.fields.keepAlivePermitWithoutStream }
        set { self.update(\.keepAlivePermitWithoutStream, to: newValue) }
    }

    /// Cap on the reconnect backoff, applied before its jitter (with the default ±20 %, a wait may reach 1.2 times
    /// this). Default 3 s (the Go original's MaxReconnectDelay).
    public var maxReconnectDelay: Duration {
        get { self.storage.fields.maxReconnectDelay }
        set { self.update(\.maxReconnectDelay, to: newValue) }
    }

    /// Reconnect backoff before the cap: first delay, growth and jitter.
    public var reconnectBackoff: ReconnectBackoff {
        get { self.storage.fields.reconnectBackoff }
        set { self.update(\.reconnectBackoff, to: newValue) }
    }

    /// Bytes a streaming call buffers each way before backpressure applies, in bytes. Default 64 KiB.
    /// Out: a writer is told to wait while more than this is written and not yet sent (the HTTP/2 send window
    /// decides how fast it drains). In: an async reader with more than this unread stops returning window to the
    /// server, so a slow reader holds at most this plus one stream window (`http2.initialStreamWindowSize`).
    public var streamBufferSize: Int {
        get { self.storage.fields.streamBufferSize }
        set { self.update(\.streamBufferSize, to: newValue) }
    }

    /// A connection with no call for this long closes and goes IDLE; the next call reconnects. Default 30 min
    /// (grpc-go, grpc-java); `.zero` means never.
    public var idleTimeout: Duration {
        get { self.storage.fields.idleTimeout }
        set { self.update(\.idleTimeout, to: newValue) }
    }

    /// Connections per resolved address of a service. Default 1. The service's `loadBalancingPolicy` picks among
    /// them (the fewest open streams, in turn, or pick_first's first with a free stream).
    public var connectionsPerTarget: Int {
        get { self.storage.fields.connectionsPerTarget }
        set { self.update(\.connectionsPerTarget, to: newValue) }
    }

    /// Calls that may wait for a connection (none ready, or every stream in use) before new ones fail with
    /// RESOURCE_EXHAUSTED. Default 10,000.
    public var maxQueuedCalls: Int {
        get { self.storage.fields.maxQueuedCalls }
        set { self.update(\.maxQueuedCalls, to: newValue) }
    }
    /// How often a service's host name is resolved again, besides after a connection failure or a GOAWAY; jittered
    /// by ±20 %. Default 30 s; `.zero` means only after failures. Addresses that disappear drain, new ones join.
    public var resolutionInterval: Duration {
        get { self.storage.fields.resolutionInterval }
        set { self.update(\.resolutionInterval, to: newValue) }
    }
    /// The shortest time between two resolutions of a name, whatever asks for them. Default 1 s.
    public var minimumResolutionInterval: Duration {
        get { self.storage.fields.minimumResolutionInterval }
        set { self.update(\.minimumResolutionInterval, to: newValue) }
    }
    /// More connections when streams run out (gRFC A105): when a call would wait because every ready connection to
    /// the service is at the server's MAX_CONCURRENT_STREAMS, another connection opens, up to this many per address.
    /// nil (the default) keeps `connectionsPerTarget` fixed and queues such calls.
    public var maxConnectionsPerTarget: Int? {
        get { self.storage.fields.maxConnectionsPerTarget }
        set { self.update(\.maxConnectionsPerTarget, to: newValue) }
    }
    /// How calls are spread over a service's connections (`LoadBalancingPolicy`): `.leastLoaded` (default),
    /// `.roundRobin` or `.pickFirst`. `loadBalancingPolicies` overrides it per service name.
    public var loadBalancingPolicy: LoadBalancingPolicy {
        get { self.storage.fields.loadBalancingPolicy }
        set { self.update(\.loadBalancingPolicy, to: newValue) }
    }
    /// Under `.pickFirst`, how long an attempt may go without an answer before the next address is tried beside it
    /// (gRFC A61's Happy Eyeballs; RFC 8305 recommends 250 ms). Default 250 ms. A longer one keeps a slow first
    /// address preferred longer; a silent one then holds waiting calls as long.
    public var connectionAttemptDelay: Duration {
        get { self.storage.fields.connectionAttemptDelay }
        set { self.update(\.connectionAttemptDelay, to: newValue) }
    }
    /// Per-service policies, by the service name given to `ConnectionManager.connection(service:)` (for a standalone
    /// `GRPCChannel`, its target text).
    public var loadBalancingPolicies: [String: LoadBalancingPolicy] {
        get { self.storage.fields.loadBalancingPolicies }
        set { self.update(\.loadBalancingPolicies, to: newValue) }
    }

    /// Client-side health checking (gRFC A17): with a name (`""` means the whole server), every connection watches
    /// `grpc.health.v1.Health/Watch` for it and takes calls only while the answer is SERVING; NOT_SERVING (or any
    /// other answer) makes it TRANSIENT_FAILURE to the load-balancing policy, the connection kept. A server without
    /// the health service (UNIMPLEMENTED) counts as healthy. A watch that answered and then ended is started again at
    /// once (CONNECTING meanwhile); one that ended without an answer leaves the connection TRANSIENT_FAILURE until
    /// the next, after a backoff of 1 s doubling to 30 s. nil (the default): off. `healthCheckServiceNames` overrides it
    /// per service name.
    public var healthCheckServiceName: String? {
        get { self.storage.fields.healthCheckServiceName }
        set { self.update(\.healthCheckServiceName, to: newValue) }
    }
    /// Per service name (the `ConnectionManager`'s, or a channel's target), the health service its connections
    /// watch, overriding `healthCheckServiceName`; an empty value watches the server as a whole. Default empty.
    public var healthCheckServiceNames: [String: String] {
        get { self.storage.fields.healthCheckServiceNames }
        set { self.update(\.healthCheckServiceNames, to: newValue) }
    }

    /// How host names are resolved.
    public var dns: DNS {
        get { self.storage.fields.dns }
        set { self.update(\.dns, to: newValue) }
    }

    /// Where `etcd:///name` targets are looked up (nil: such targets are refused).
    public var etcd: Etcd? {
        get { self.storage.fields.etcd }
        set { self.update(\.etcd, to: newValue) }
    }

    /// An etcd cluster holding endpoints as grpc-go's endpoints manager writes them (`EtcdResolver`,
    /// `EtcdRegistration`).
    public struct Etcd: Sendable, Hashable {
        /// etcd's client addresses, `host:port` (plaintext gRPC, etcd's `--listen-client-urls http://...`): the
        /// client connects to each and spreads its calls over those that are ready (round_robin), so one that goes
        /// away, or loses its leader, is passed over (a call it fails is retried on another). Numeric addresses
        /// are used as they are; with a host name among them every endpoint is looked up again each time the
        /// client resolves, one after another, and a slow lookup holds the others back.
        public var endpoints: [String]
        /// Bound on each Range. Default 5 s.
        public var timeout: Duration = .seconds(5)

        /// etcd at `endpoints` (`host:port`), with the default timeout.
        public init(endpoints: [String]) {
            self.endpoints = endpoints
        }

        /// The endpoints as errors name them.
        var endpointsText: String { self.endpoints.joined(separator: ",") }
    }

    /// HTTP/2 settings of each connection.
    public var http2: HTTP2 {
        get { self.storage.fields.http2 }
        set { self.update(\.http2, to: newValue) }
    }

    /// TLS for every connection; nil (the default, as in the Go original) is plaintext HTTP/2.
    public var tls: TLSSettings? {
        get { self.storage.fields.tls }
        set { self.update(\.tls, to: newValue) }
    }

    /// Log calls, retries, connection events, circuit breaker changes and GOAWAY too_many_pings at debug (attempts
    /// at trace) to the manager's `Logger`. Default true.
    public var enableLogging: Bool {
        get { self.storage.fields.enableLogging }
        set { self.update(\.enableLogging, to: newValue) }
    }
    /// Record metrics through the application's `MetricsSystem.factory`. Default false (the Go original's). A
    /// factory passed to `ConnectionManager(metricsFactory:)` or `GRPCChannel(metricsFactory:)` records whatever
    /// this says.
    public var enableMetrics: Bool {
        get { self.storage.fields.enableMetrics }
        set { self.update(\.enableMetrics, to: newValue) }
    }
    /// Retry failed calls with `retry`. Default true.
    public var enableRetry: Bool {
        get { self.storage.fields.enableRetry }
        set { self.update(\.enableRetry, to: newValue) }
    }
    /// Guard each service and method with a circuit breaker. Default true.
    public var enableCircuitBreaker: Bool {
        get { self.storage.fields.enableCircuitBreaker }
        set { self.update(\.enableCircuitBreaker, to: newValue) }
    }

    /// Retry policy, per-method overrides and throttling.
    public var retry: Retry {
        get { self.storage.fields.retry }
        set { self.update(\.retry, to: newValue) }
    }
    /// Hedging (gRFC A6) of unary calls, by method (`/package.Service/Method`) or service (`package.Service`): a
    /// method or service listed here is hedged instead of retried (the retry throttle still applies). Streaming calls
    /// are never hedged.
    public var hedging: [String: CallHedgingPolicy] {
        get { self.storage.fields.hedging }
        set { self.update(\.hedging, to: newValue) }
    }
    /// Circuit breaker settings.
    public var circuitBreaker: CircuitBreakerConfiguration {
        get { self.storage.fields.circuitBreaker }
        set { self.update(\.circuitBreaker, to: newValue) }
    }

    /// Retry settings (`RetrySettings`).
    public typealias Retry = RetrySettings

    /// Text put before `grpc-swift-cm/<version>` in the user-agent header (nil: none).
    public var userAgentPrefix: String? {
        get { self.storage.fields.userAgentPrefix }
        set { self.update(\.userAgentPrefix, to: newValue) }
    }

    /// Message compression: what responses may use, what requests use.
    public var compression: Compression {
        get { self.storage.fields.compression }
        set { self.update(\.compression, to: newValue) }
    }

    /// Every field at its default (`Configuration.defaults`).
    public init() {
        self.storage = Storage.defaults
    }

    /// Message compression (gRPC `doc/compression.md`), with zlib.
    public struct Compression: Sendable, Hashable {
        /// Encodings offered in `grpc-accept-encoding` on every call. Default gzip and deflate. Empty: only
        /// `identity` is offered. Responses in gzip or deflate are inflated whatever was offered (as grpc-go does:
        /// grpc core servers compress with their default regardless), at most to the call's receive limit (past it
        /// the call ends RESOURCE_EXHAUSTED); a compressed response in any other encoding ends INTERNAL.
        public var acceptedEncodings: [CallCompression] = [.gzip, .deflate]
        /// How request messages are compressed. Default `.identity` (not at all); `RequestOptions.compression`
        /// overrides it per call.
        public var requestEncoding: CallCompression = .identity
        /// Request compression per method (`/package.Service/Method`) or per service (`package.Service`), over
        /// `requestEncoding`; a method's entry wins over its service's.
        public var requestEncodingPerMethod: [String: CallCompression] = [:]

        public init() {}

        /// The request encoding of a call to `path` (`/package.Service/Method`), before per-call options.
        func requestEncoding(forPath path: String) -> CallCompression {
            Configuration.perMethod(self.requestEncodingPerMethod, path: path) ?? self.requestEncoding
        }

        /// The `grpc-accept-encoding` value. With nothing offered it says `identity`: grpc core servers read a
        /// missing header as "anything" and would compress anyway.
        var acceptEncodingHeader: String {
            let names = self.acceptedEncodings.filter { $0 != .identity }.map(\.name)
            return names.isEmpty ? "identity" : names.joined(separator: ",")
        }
    }

    /// The defaults above.
    public static var defaults: Configuration { Configuration() }

    /// Exponential reconnect backoff (grpc `doc/connection-backoff.md`); the cap is `maxReconnectDelay`.
    public struct ReconnectBackoff: Sendable, Hashable {
        /// First delay. Default 100 ms (the Go original's base); `maxReconnectDelay` caps it, as every delay, before
        /// the jitter.
        public var initial: Duration = .milliseconds(100)
        /// Growth per attempt. Default 1.6; at least 1.
        public var multiplier: Double = 1.6
        /// Each delay is multiplied by a random factor in [1 - jitter, 1 + jitter]. Default 0.2; 0...1.
        public var jitter: Double = 0.2

        public init() {}
    }

    /// Name resolution of `host:port` targets (numeric addresses and Unix paths are never resolved).
    public struct DNS: Sendable, Hashable {
        /// Which resolver looks names up.
        public enum Resolver: Sendable, Hashable {
            /// c-ares on the channel's own loop: A and AAAA queries, its sockets on the loop's epoll, no thread.
            case cAres
            /// getaddrinfo (the C library's configuration, NSS included) on a thread of its own per lookup.
            case system
        }

        /// Default `.cAres`.
        public var resolver: Resolver = .cAres
        /// Name servers for c-ares as `ip` or `ip:port` (`[v6]:port`), asked with no search domains; nil (the
        /// default): `/etc/resolv.conf` and `/etc/hosts`.
        public var servers: [String]? = nil
        /// How long c-ares waits for an answer to the first try. Each later round of tries waits twice as long as
        /// the one before (c-ares's rule), so with the defaults a name no server answers fails after 5 + 10 = 15 s,
        /// for each name `resolv.conf`'s search list makes of it. Default 5 s.
        public var timeout: Duration = .seconds(5)
        /// Tries per server before a lookup fails (UNAVAILABLE, "timed out"); see `timeout` for how long. Default 2.
        public var attempts: Int = 2

        public init() {}
    }

    /// HTTP/2 flow-control and framing settings.
    public struct HTTP2: Sendable, Hashable {
        /// SETTINGS_INITIAL_WINDOW_SIZE we announce for each stream, in bytes. Default 1 MiB; 65,535...2^31-1.
        public var initialStreamWindowSize: Int = 1 << 20
        /// Receive window of the whole connection, in bytes. Default 8 MiB; at least 65,535.
        public var connectionWindowSize: Int = 8 << 20
        /// SETTINGS_MAX_FRAME_SIZE we accept, in bytes. Default 16 KiB; 16,384...16,777,215 (RFC 9113 §6.5.2).
        public var maxFrameSize: Int = 1 << 14
        /// SETTINGS_MAX_HEADER_LIST_SIZE we accept, in bytes. Default 16 KiB.
        public var maxHeaderListSize: Int = 16 << 10

        public init() {}
    }

    /// Checks every field.
    /// - Throws: `ConfigurationError` naming the first field that is out of range.
    public func validate() throws(ConfigurationError) {
        if self.maxMessageSize <= 0 {
            throw ConfigurationError(field: "maxMessageSize", message: "must be greater than zero")
        }
        if self.maxMessageSize > Int(Int32.max) {
            throw ConfigurationError(field: "maxMessageSize", message: "must fit the 4-byte gRPC length prefix")
        }
        if self.streamBufferSize <= 0 {
            throw ConfigurationError(field: "streamBufferSize", message: "must be greater than zero")
        }
        if self.minConnectTimeout <= .zero {
            throw ConfigurationError(field: "minConnectTimeout", message: "must be greater than zero")
        }
        if self.keepAliveTime <= .zero {
            throw ConfigurationError(field: "keepAliveTime", message: "must be greater than zero")
        }
        if self.keepAliveTimeout <= .zero {
            throw ConfigurationError(field: "keepAliveTimeout", message: "must be greater than zero")
        }
        if self.maxReconnectDelay <= .zero {
            throw ConfigurationError(field: "maxReconnectDelay", message: "must be greater than zero")
        }
        if self.connectionAttemptDelay <= .zero {
            throw ConfigurationError(field: "connectionAttemptDelay", message: "must be greater than zero")
        }
        if self.reconnectBackoff.initial <= .zero {
            throw ConfigurationError(field: "reconnectBackoff.initial", message: "must be greater than zero")
        }
        if !(self.reconnectBackoff.multiplier >= 1) {
            throw ConfigurationError(field: "reconnectBackoff.multiplier", message: "must be at least 1")
        }
        if !(0...1).contains(self.reconnectBackoff.jitter) {
            throw ConfigurationError(field: "reconnectBackoff.jitter", message: "must be within 0...1")
        }
        if self.idleTimeout < .zero {
            throw ConfigurationError(field: "idleTimeout", message: "must not be negative (zero means never)")
        }
        // Bounded: each is a subchannel made at the first resolution, and a manager's service connects them all
        // at once (a typo of Int.max exhausted memory, a million the file descriptors, with no error).
        if !(1...Self.maxConnectionsPerAddress).contains(self.connectionsPerTarget) {
            throw ConfigurationError(field: "connectionsPerTarget", message: "must be 1...\(Self.maxConnectionsPerAddress)")
        }
        if self.resolutionInterval < .zero {
            throw ConfigurationError(field: "resolutionInterval", message: "must not be negative (zero means only after failures)")
        }
        if self.minimumResolutionInterval < .zero {
            throw ConfigurationError(field: "minimumResolutionInterval", message: "must not be negative")
        }
        if let limit = self.maxConnectionsPerTarget, limit < self.connectionsPerTarget {
            throw ConfigurationError(field: "maxConnectionsPerTarget", message: "must be at least connectionsPerTarget")
        }
        if self.dns.timeout <= .zero {
            throw ConfigurationError(field: "dns.timeout", message: "must be greater than zero")
        }
        if self.dns.attempts < 1 {
            throw ConfigurationError(field: "dns.attempts", message: "must be at least 1")
        }
        if self.dns.resolver == .system {
            // getaddrinfo reads /etc/resolv.conf: c-ares's settings would silently not apply.
            let defaults = DNS()
            for (field, set) in [
                ("servers", self.dns.servers != nil), ("timeout", self.dns.timeout != defaults.timeout),
                ("attempts", self.dns.attempts != defaults.attempts),
            ] where set {
                throw ConfigurationError(
                    field: "dns.\(field)", message: "applies to the c-ares resolver only (dns.resolver is .system)")
            }
        }
        if self.dns.servers?.isEmpty == true {
            // c-ares would keep the system's servers without /etc/hosts or search domains: neither what nil nor
            // what "none" would mean.
            throw ConfigurationError(field: "dns.servers", message: "must name at least one server (nil: the system's)")
        }
        for server in self.dns.servers ?? [] where !Self.isServerAddress(server) {
            throw ConfigurationError(field: "dns.servers", message: "\"\(server)\" is not ip, ip:port or [v6]:port")
        }
        if let etcd = self.etcd {
            if etcd.endpoints.isEmpty {
                throw ConfigurationError(field: "etcd.endpoints", message: "must name at least one host:port")
            }
            for endpoint in etcd.endpoints {
                guard let target = try? Target(parsing: endpoint), case .hostPort = target.kind else {
                    throw ConfigurationError(field: "etcd.endpoints", message: "\"\(endpoint)\" is not host:port")
                }
            }
            if etcd.timeout <= .zero {
                throw ConfigurationError(field: "etcd.timeout", message: "must be greater than zero")
            }
        }
        if self.maxQueuedCalls < 1 {
            throw ConfigurationError(field: "maxQueuedCalls", message: "must be at least 1")
        }
        if !(65_535...Int(Int32.max)).contains(self.http2.initialStreamWindowSize) {
            throw ConfigurationError(field: "http2.initialStreamWindowSize", message: "must be 65535...2147483647")
        }
        if !(65_535...Int(Int32.max)).contains(self.http2.connectionWindowSize) {
            throw ConfigurationError(field: "http2.connectionWindowSize", message: "must be 65535...2147483647")
        }
        if !((1 << 14)...((1 << 24) - 1)).contains(self.http2.maxFrameSize) {
            throw ConfigurationError(field: "http2.maxFrameSize", message: "must be 16384...16777215")
        }
        if !(1...Int(UInt32.max)).contains(self.http2.maxHeaderListSize) {
            // SETTINGS_MAX_HEADER_LIST_SIZE is a 32-bit field (RFC 9113 §6.5.1).
            throw ConfigurationError(field: "http2.maxHeaderListSize", message: "must be 1...4294967295")
        }
        try self.retry.policy.validate(field: "retry.policy")
        // Tables in key order: with two bad keys, the one named is the same in every process.
        for (key, policy) in self.retry.perMethod.sorted(by: { $0.key < $1.key }) {
            try Self.validate(methodKey: key, field: "retry.perMethod[\(key)]")
            try policy.validate(field: "retry.perMethod[\(key)]")
        }
        if let throttling = self.retry.throttling {
            if !(1...1000).contains(throttling.maxTokens) {
                throw ConfigurationError(field: "retry.throttling.maxTokens", message: "must be 1...1000")
            }
            // Counted in thousandths (gRFC A6 keeps three decimal places): a smaller ratio would never refill the
            // bucket, and one past the bucket's size (or not finite) means nothing more.
            if !(0.001...1000).contains(throttling.tokenRatio) {
                throw ConfigurationError(field: "retry.throttling.tokenRatio", message: "must be 0.001...1000")
            }
        }
        try self.circuitBreaker.validate()
        try self.tls?.validate()
        // Keyed by service name (a manager's) or target text (a standalone channel's): an empty key names neither,
        // and its setting would silently apply to nothing.
        if self.loadBalancingPolicies.keys.contains("") {
            throw ConfigurationError(field: "loadBalancingPolicies", message: "a key must name a service (it is empty)")
        }
        if self.healthCheckServiceNames.keys.contains("") {
            throw ConfigurationError(field: "healthCheckServiceNames", message: "a key must name a service (it is empty)")
        }
        for (key, policy) in self.hedging.sorted(by: { $0.key < $1.key }) {
            try Self.validate(methodKey: key, field: "hedging[\(key)]")
            if !(2...5).contains(policy.maxAttempts) {
                throw ConfigurationError(field: "hedging[\(key)].maxAttempts", message: "must be 2...5")
            }
            if policy.hedgingDelay < .zero {
                throw ConfigurationError(field: "hedging[\(key)].hedgingDelay", message: "must not be negative")
            }
        }
        for key in self.compression.requestEncodingPerMethod.keys.sorted() {
            try Self.validate(methodKey: key, field: "compression.requestEncodingPerMethod[\(key)]")
        }
        if let prefix = self.userAgentPrefix {
            for byte in prefix.utf8 where byte < 0x20 || byte > 0x7E {
                throw ConfigurationError(field: "userAgentPrefix", message: "must be printable ASCII")
            }
        }
    }
}

/// Where the fields live (see `storage`).
extension Configuration {
    private final class Storage: Sendable {
        let fields: Fields
        /// The connections' and the pools' settings, made from `fields` when a channel first asks and kept: every
        /// channel made from this storage shares them (a storage's fields never change).
        let http2ClientSettings = Mutex<HTTP2ClientSettings?>(nil)
        /// Only for services without settings of their own (`loadBalancingPolicies`, `healthCheckServiceNames`).
        let poolSettings = Mutex<SharedPoolSettings?>(nil)
        init(_ fields: Fields) { self.fields = fields }
        /// What every `Configuration()` starts with.
        static let defaults = Storage(Fields())
    }

    /// `make()`'s answer, made once for this configuration and its unchanged copies.
    func sharedHTTP2ClientSettings(_ make: () -> HTTP2ClientSettings) -> HTTP2ClientSettings {
        Self.once(self.storage.http2ClientSettings, make)
    }

    /// `make()`'s answer, made once for this configuration and its unchanged copies.
    func sharedPoolSettings(_ make: () -> PoolSettings) -> SharedPoolSettings {
        Self.once(self.storage.poolSettings) { SharedPoolSettings(make()) }
    }

    /// What `kept` holds, or `make()`'s answer, kept there.
    private static func once<Made: Sendable>(_ kept: borrowing Mutex<Made?>, _ make: () -> Made) -> Made {
        kept.withLock { kept in
            if let kept { return kept }
            let made = make()
            kept = made
            return made
        }
    }

    /// The stored fields with their defaults, documented on the properties above.
    private struct Fields: Sendable, Hashable {
        var maxMessageSize: Int = 4 * 1024 * 1024
        var minConnectTimeout: Duration = .seconds(10)
        var keepAliveTime: Duration = .seconds(30)
        var keepAliveTimeout: Duration = .seconds(5)
        var keepAlivePermitWithoutStream: Bool = true
        var maxReconnectDelay: Duration = .seconds(3)
        var reconnectBackoff: ReconnectBackoff = ReconnectBackoff()
        var streamBufferSize: Int = 64 << 10
        var idleTimeout: Duration = .seconds(30 * 60)
        var connectionsPerTarget: Int = 1
        var maxQueuedCalls: Int = 10_000
        var resolutionInterval: Duration = .seconds(30)
        var minimumResolutionInterval: Duration = .seconds(1)
        var maxConnectionsPerTarget: Int? = nil
        var loadBalancingPolicy: LoadBalancingPolicy = .leastLoaded
        var connectionAttemptDelay: Duration = .milliseconds(250)
        var loadBalancingPolicies: [String: LoadBalancingPolicy] = [:]
        var healthCheckServiceName: String? = nil
        var healthCheckServiceNames: [String: String] = [:]
        var dns: DNS = DNS()
        var etcd: Etcd? = nil
        var http2: HTTP2 = HTTP2()
        var tls: TLSSettings? = nil
        var enableLogging: Bool = true
        var enableMetrics: Bool = false
        var enableRetry: Bool = true
        var enableCircuitBreaker: Bool = true
        var retry: Retry = Retry()
        var hedging: [String: CallHedgingPolicy] = [:]
        var circuitBreaker: CircuitBreakerConfiguration = CircuitBreakerConfiguration()
        var userAgentPrefix: String? = nil
        var compression: Compression = Compression()
    }

    /// Sets one field: a new `Storage` with it changed, never a change to one that copies may share. A field set to
    /// the value it has leaves the storage shared (a manager's service channels keep the manager's).
    private mutating func update<Value: Equatable>(_ field: WritableKeyPath<Fields, Value>, to value: Value) {
        guard self.storage.fields[keyPath: field] != value else { return }
        var fields = self.storage.fields
        fields[keyPath: field] = value
        self.storage = Storage(fields)
    }

    public static func == (lhs: Configuration, rhs: Configuration) -> Bool {
        lhs.storage === rhs.storage || lhs.storage.fields == rhs.storage.fields
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.storage.fields)
    }
}

/// `print`, `dump` and `String(describing:)` show the fields, not the storage that holds them.
extension Configuration: CustomReflectable {
    public var customMirror: Mirror {
        Mirror(self, children: Mirror(reflecting: self.storage.fields).children, displayStyle: .struct)
    }
}

extension Configuration {
    /// The most connections per address `connectionsPerTarget` takes (`maxConnectionsPerTarget`, which opens one
    /// at a time as calls need them, takes any number).
    static let maxConnectionsPerAddress = 100_000

    /// The hedging policy of a call to `path`: the method's, else its service's unless the method has a retry
    /// policy of its own (gRFC A6: a method's config holds a retry or a hedging policy, and the most specific one
    /// applies; a method kept from being sent twice says so there); nil (no lookup) when none is set. This and the
    /// next read the fields in place: through the public getters every call retained and released the tables.
    func hedgingPolicy(forPath path: String) -> CallHedgingPolicy? {
        let table = self.storage.fields.hedging
        if table.isEmpty { return nil }
        if let own = table[path] { return own }
        if self.storage.fields.retry.perMethod[path] != nil { return nil }
        return MethodKeys.lookUp(table, path: path)
    }

    /// How a call to `path` compresses its requests, before per-call options.
    func requestEncoding(forPath path: String) -> CallCompression {
        self.storage.fields.compression.requestEncoding(forPath: path)
    }

    /// The entry of `table` for a call to `path` (`MethodKeys`). No lookup, no hashing, when the table is empty
    /// (the common case costs nothing).
    @inline(__always)
    static func perMethod<Value>(_ table: [String: Value], path: String) -> Value? {
        if table.isEmpty { return nil }
        return MethodKeys.lookUp(table, path: path)
    }

    /// Refuses a per-method table's key that is not one of `MethodKeys`' spellings.
    static func validate(methodKey key: String, field: String) throws(ConfigurationError) {
        if !MethodKeys.isValid(key) {
            throw ConfigurationError(field: field, message: "must be /package.Service/Method, package.Service or /package.Service/")
        }
    }

    /// `ip`, `ip:port` or `[v6]:port` with a numeric address.
    static func isServerAddress(_ text: String) -> Bool {
        if NetworkAddress(ip: text, port: 53) != nil { return true }
        guard let target = try? Target(parsing: text), case .hostPort = target.kind else { return false }
        return target.numericAddresses != nil
    }
}

/// Plaintext or TLS, for one service's connections (`ConnectionManager.connection(service:address:security:)`).
public enum TransportSecurity: Sendable, Hashable {
    /// HTTP/2 without TLS (h2c).
    case plaintext
    /// TLS with these settings.
    case tls(TLSSettings)
}
