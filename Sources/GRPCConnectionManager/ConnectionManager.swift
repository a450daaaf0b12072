import GRPCCMCalls
import GRPCCMHandlers
import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire
import Logging
import Metrics

#if canImport(Glibc)
import Glibc
#endif

/// The public face: one channel per service name, each with its own connections that look after themselves.
///
/// Behaves like the Go original's manager: `connection(service:address:)` registers or reuses the address of a
/// service and returns its channel (address omitted: the one registered before); `closeConnection(service:)`,
/// `close(gracePeriod:)`, `connectionCount` and `healthCheck()` as there. All channels share one loop (or spread over
/// the loops of a `ReactorGroup`) and one `EventBus`.
public final class ConnectionManager: Sendable {
    /// Health of one registered service, as `healthCheck()` reports it.
    public struct ServiceHealth: Sendable, Hashable {
        /// "IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE", "SHUTDOWN", or "NotConnected" for a registered
        /// service whose connection was closed.
        public var state: String
        /// True when a connection is READY.
        public var healthy: Bool
        /// The last connection error, if any.
        public var error: String?
    }

    /// The validated configuration every channel uses.
    public let configuration: Configuration
    /// Events of every channel of this manager.
    public let events: EventBus
    /// The first loop's (the only one unless the manager runs on a group).
    let reactor: Reactor
    let logger: Logger
    /// The first loop's handlers (each loop has its own; see `ReactorGroup`).
    let pipeline: CallPipeline
    /// Each loop's bus part and handlers.
    let loops: [LoopContext]
    /// The factory the metrics handler records into.
    public let metricsFactory: any MetricsFactory
    /// Run before every call of every channel, in order.
    let interceptors: [any CallInterceptor]
    private let connectionIDs = ConnectionIDSource()
    let registry = PThreadLock<Registry>(Registry())

    struct Registry {
        /// What each service was registered with: its address, and its security (`configuration.tls` when it was
        /// not given). Kept after its channel closes, so that the channel made again connects as the first one did.
        var addresses: [String: String] = [:]
        var security: [String: TransportSecurity] = [:]
        var channels: [String: GRPCChannel] = [:]
        var closed = false
        /// The channels a close took out of `channels`: a later `closeNow()` (or another `close`) reaches them while
        /// a graceful close lets their calls finish.
        var closing: [GRPCChannel] = []
        /// Channels replaced by another (a new address or security) whose calls in flight may still run, with the
        /// clock reading at which their grace period ends: the manager's close reaches them too.
        var replaced: [(service: String, channel: GRPCChannel, until: UInt64)] = []
    }

    /// Creates a manager on one loop.
    /// - Parameters:
    ///   - configuration: Validated here.
    ///   - logger: Receives the logging handler's records, all at debug (calls, retries, connection events, circuit
    ///     breaker changes, GOAWAY too_many_pings) or trace (attempts); no-op by default. The library never
    ///     bootstraps LoggingSystem.
    ///   - metricsFactory: Receives the metrics; passing one turns metrics on. nil: the application's
    ///     `MetricsSystem.factory` when `enableMetrics`. Pass a `PrometheusMetrics` (GRPCConnectionManagerPrometheus)
    ///     to get `metricsText()`. The library never bootstraps MetricsSystem.
    ///   - interceptors: Run, in this order, before every call of every channel (`CallInterceptor`).
    ///   - eventLoop: The loop; nil uses `ReactorLoop.shared`. It must run (`start()`, or a host's `runOnce`): until
    ///     it does, nothing of a call happens, its deadline and a cancel included.
    /// - Throws: `ConfigurationError` naming the first bad field; `ReactorError` when `ReactorLoop.shared` cannot be made
    ///   (the process at its file descriptor or thread limit).
    public convenience init(
        configuration: Configuration = .defaults,
        logger: Logger = Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil,
        interceptors: [any CallInterceptor] = [],
        eventLoop: ReactorLoop? = nil
    ) throws {
        try self.init(
            configuration: configuration, logger: logger, metricsFactory: metricsFactory, interceptors: interceptors,
            reactors: [(eventLoop ?? ReactorLoop.sharedLoop()).reactor])
    }

    /// Creates a manager whose channels spread over the loops of `group`: each loop gets its own connections to
    /// every service, and a call runs on one loop from start to completion (see `ReactorGroup` for the choice and
    /// its cost).
    public convenience init(
        configuration: Configuration = .defaults,
        logger: Logger = Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil,
        interceptors: [any CallInterceptor] = [],
        group: ReactorGroup
    ) throws {
        try self.init(
            configuration: configuration, logger: logger, metricsFactory: metricsFactory, interceptors: interceptors,
            reactors: group.loops.map(\.reactor))
    }

    private init(
        configuration: Configuration, logger: Logger, metricsFactory: (any MetricsFactory)?,
        interceptors: [any CallInterceptor], reactors: [Reactor]
    ) throws {
        try configuration.validate()
        self.configuration = configuration
        self.interceptors = interceptors
        self.logger = logger
        self.reactor = reactors[0]
        let bus = EventBus(reactors: reactors)
        self.events = bus
        let factory = metricsFactory ?? MetricsSystem.factory
        self.metricsFactory = factory
        // One value for every loop: its connection counts are shared (see `ConnectionStateCounts`).
        let handlerSettings = configuration.handlerSettings(metricsFactoryPassed: metricsFactory != nil)
        self.loops = reactors.map { reactor in
            LoopContext(
                reactor: reactor, bus: bus.local(for: reactor),
                pipeline: CallPipeline(
                    settings: handlerSettings, bus: bus.local(for: reactor), logger: logger,
                    metricsFactory: factory))
        }
        self.pipeline = self.loops[0].pipeline
    }

    /// A manager dropped without `close` closes its connections: nothing else can reach them any more.
    deinit {
        self.closeNow()
    }

    /// The metrics in Prometheus text format, when the metrics factory can render them (`PrometheusMetrics` can);
    /// nil otherwise. Serve it on your `/metrics` endpoint.
    public func metricsText() -> String? {
        (self.metricsFactory as? any MetricsTextExporting)?.exposition()
    }

    /// The channel of `service`, registering `address` for it (or reusing the one registered before when
    /// `address` is nil). A new address for a known service replaces the old channel. The channel starts
    /// connecting at once.
    /// - Parameters:
    ///   - service: The service's name: the key of its channel, its metrics and its logs.
    ///   - address: `host:port`, `[v6]:port`, `dns:///host:port`, `unix:/path` or `etcd:///name` (with
    ///     `configuration.etcd`); nil reuses the address registered before.
    ///   - security: Plaintext or TLS for this service's connections; nil keeps what the service was registered
    ///     with before, or, the first time, uses `configuration.tls`. A channel open with other settings is replaced.
    ///     A replaced channel takes no new calls; those in flight on it finish there, for up to 30 s.
    /// - Throws: `ConnectionManagerError` for an unknown service without an address or a closed manager;
    ///   `ConfigurationError` for an unparsable address or unusable TLS files.
    public func connection(service: String, address: String? = nil, security: TransportSecurity? = nil) throws
        -> GRPCChannel
    {
        guard !service.isEmpty else { throw ConnectionManagerError.invalidServiceName }
        var replaced: GRPCChannel?
        let channel: GRPCChannel = try self.registry.withLock { registry in
            if registry.closed { throw ConnectionManagerError.closed }
            let resolved: String
            if let address {
                resolved = address
            } else if let known = registry.addresses[service] {
                resolved = known
            } else {
                throw ConnectionManagerError.unknownService(service)
            }
            // What the connections would use, nil spelled out: asking again for the same thing keeps the channel.
            let security =
                security ?? registry.security[service] ?? self.configuration.tls.map { .tls($0) } ?? .plaintext
            // A channel closed by its own close() (not closeConnection) is dialled again, not handed out dead.
            if let existing = registry.channels[service], registry.addresses[service] == resolved,
                registry.security[service] == security, !existing.isClosed
            {
                return existing
            }
            let target = try Target(parsing: resolved)
            var configuration = self.configuration
            switch security {
            case .plaintext: configuration.tls = nil
            case .tls(let tls):
                try tls.validate()
                configuration.tls = tls
            }
            let channel = try GRPCChannel(
                service: service, target: target, configuration: configuration, bus: self.events, loops: self.loops,
                connectionIDs: self.connectionIDs, closesOnDeinit: false, interceptors: self.interceptors)
            // Only now, with nothing left to throw: a failed replacement leaves the old channel as it was.
            replaced = registry.channels[service]
            if let replaced {
                // Those whose grace period ended a while ago have been closed for good: not kept for ever.
                let now = Reactor.clock()
                registry.replaced.removeAll { now > $0.until &+ 1_000_000_000 }
                registry.replaced.append((service, replaced, now &+ UInt64(Self.replacedGracePeriod.nanoseconds)))
            }
            registry.addresses[service] = resolved
            registry.security[service] = security
            registry.channels[service] = channel
            return channel
        }
        // Calls in flight on the old channel finish there (a reload that moves a busy service must not fail its
        // streams); new ones get the new channel.
        replaced?.closeGracefully(gracePeriod: Self.replacedGracePeriod, reason: Self.replacedStatus)
        channel.connect()
        return channel
    }

    /// How long calls in flight on a replaced channel may run before they end.
    static let replacedGracePeriod: Duration = .seconds(30)
    private static let replacedStatus = CallStatus(
        code: .unavailable, message: "the service's channel was replaced (a new address or security)")

    /// Closes the channel of `service` now (its calls end with UNAVAILABLE, those still finishing on a channel it
    /// replaced too); the address stays registered, so
    /// `connection(service:)` dials again and `healthCheck()` reports "NotConnected" meanwhile.
    public func closeConnection(service: String) {
        let channels = self.registry.withLock { registry -> [GRPCChannel] in
            // Its replaced channels too, whose calls may still be finishing.
            var closing = registry.replaced.filter { $0.service == service }.map(\.channel)
            registry.replaced.removeAll { $0.service == service }
            if let open = registry.channels.removeValue(forKey: service) { closing.append(open) }
            return closing
        }
        for channel in channels { channel.close() }
    }

    /// The open channel of `service`, if it has one: a lookup only (`connection(service:)` also connects, or
    /// opens a channel).
    package func openChannel(service: String) -> GRPCChannel? {
        self.registry.withLock { $0.channels[service] }
    }

    /// Services with an open channel: not one closed by its own `close()` (kept until asked for again, and
    /// reported "NotConnected" by `healthCheck()`, as here).
    public var connectionCount: Int {
        self.registry.withLock { $0.channels.values.count { !$0.isClosed } }
    }

    /// Stops taking calls, lets calls in flight finish for up to `gracePeriod`, then closes everything: calls still
    /// running then (on connections that are draining, too) end with UNAVAILABLE. When it returns, every call of the
    /// manager has had its completion. Calls waiting for a connection or
    /// between retries end at once; nothing is retried once closing began. Cancelling the task that awaits it ends
    /// the grace period at once.
    ///
    /// From a completion (on the reactor thread) it cannot wait there: call it from a task
    /// (`Task { await manager.close() }`), or use `closeNow()`, which returns at once.
    public func close(gracePeriod: Duration = .seconds(30)) async {
        let pools = self.beginClosing()
        guard !pools.isEmpty else { return }
        let reason = Self.closedStatus
        for pool in pools { pool.reactor.execute { pool.close(graceful: true, reason: reason) } }
        let deadline = Reactor.clock() &+ UInt64(max(gracePeriod.nanoseconds, 0))
        while Reactor.clock() < deadline {
            var open = 0
            for pool in pools { open += await Self.onLoop(pool.reactor) { pool.openCallCount } ?? 0 }
            // A cancelled task ends the grace period: what is left is force-closed now.
            if open == 0 || Task.isCancelled { break }
            try? await Task.sleep(nanoseconds: 5_000_000)
        }
        for pool in pools {
            _ = await Self.onLoop(pool.reactor) { pool.close(graceful: false, reason: reason) }
        }
        // Back to each loop until its deferred phase has nothing left: the completions of the calls the close ended
        // run there, in the turn that closed them (a hedged call's, one turn later), and a body sent now runs in a
        // later turn. Bounded: a busy loop always has deferred work of other channels.
        for pool in pools {
            let reactor = pool.reactor
            var rounds = 0
            while rounds < 4, await Self.onLoop(reactor, { reactor.hasDeferredWork }) == true { rounds += 1 }
        }
    }

    /// How a call ends that the manager's close ended (or that came after it).
    private static let closedStatus = CallStatus(code: .unavailable, message: "the manager closed")

    /// Closes everything now, without a grace period: every call ends with UNAVAILABLE. Safe from any thread,
    /// completions included.
    public func closeNow() {
        let reason = Self.closedStatus
        for pool in self.beginClosing() {
            if pool.reactor.inReactorThread {
                pool.close(graceful: false, reason: reason)
            } else {
                pool.reactor.execute { pool.close(graceful: false, reason: reason) }
            }
        }
    }

    /// Marks the manager closed and returns the pools of every channel it had, those an earlier close took included:
    /// `closeNow()` after `close(gracePeriod:)` began ends the calls still draining, and a second `close` waits for
    /// them too.
    private func beginClosing() -> [ServicePool] {
        let channels = self.registry.withLock { registry -> [GRPCChannel] in
            registry.closed = true
            registry.closing.append(contentsOf: registry.channels.values)
            registry.closing.append(contentsOf: registry.replaced.map(\.channel))
            registry.channels.removeAll()
            registry.replaced.removeAll()
            return registry.closing
        }
        return channels.flatMap { $0.shards.map(\.pool) }
    }

    /// For every registered service: its aggregate connectivity state, whether it is healthy (READY), and the last
    /// connection error. Services whose channel was closed report "NotConnected".
    public func healthCheck() async -> [String: ServiceHealth] {
        let (addresses, channels) = self.registry.withLock { ($0.addresses, $0.channels) }
        var report: [String: ServiceHealth] = [:]
        for service in addresses.keys {
            // A channel closed by its own close() stays registered until asked for again: not connected either.
            guard let channel = channels[service], !channel.isClosed else {
                report[service] = ServiceHealth(
                    state: "NotConnected", healthy: false, error: "connection not established yet")
                continue
            }
            let (state, error) = await channel.connectivity()
            report[service] = ServiceHealth(state: state.description, healthy: state == .ready, error: error?.message)
        }
        return report
    }

    /// Calls `grpc.health.v1.Health/Check` on the service's server.
    /// - Parameters:
    ///   - service: A registered service name.
    ///   - healthServiceName: The name to ask the server about; "" (the default) means the whole server.
    ///   - timeout: Deadline of the check. Default 5 s.
    /// - Returns: The serving status.
    /// - Throws: `CallError` when the call fails (NOT_FOUND for a name the server does not know; UNIMPLEMENTED
    ///   when it has no health service), `ConnectionManagerError` for an unknown service.
    public func checkHealth(
        service: String, healthServiceName: String = "", timeout: Duration = .seconds(5)
    ) async throws -> HealthStatus {
        try await self.connection(service: service).checkHealth(healthServiceName, timeout: timeout)
    }

    /// Health changes of `service`'s server, as they happen: streams `grpc.health.v1.Health/Watch`, or polls
    /// `Check` every `pollInterval` when the server has no Watch (UNIMPLEMENTED). See `GRPCChannel.watchHealth`.
    /// The watch follows the service: registered again at another address, its new channel is watched (after an
    /// UNKNOWN for the old one's end). It ends when the service's channel closes and none replaces it
    /// (`closeConnection`, the manager's close), as `GRPCChannel.watchHealth` ends with its channel. It dials only as
    /// it begins, as `connection(service:)` does (a service closed with `closeConnection` is connected again).
    /// - Throws: `ConnectionManagerError` for an unknown service or a closed manager.
    public func watchHealth(
        service: String, healthServiceName: String = "", pollInterval: Duration = .seconds(5)
    ) throws -> AsyncStream<HealthStatus> {
        _ = try self.connection(service: service)
        return GRPCChannel.watchHealth(healthServiceName, pollInterval: pollInterval) { [weak self] in
            self?.openChannel(service: service)
        }
    }

    /// Runs `body` on `reactor`'s thread and returns its value (nil when that loop has stopped).
    private static func onLoop<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () -> T) async -> T? {
        if reactor.inReactorThread { return body() }
        // A driven loop that stops turns only when its host turns it, which a host that stopped it may never do:
        // its inbox may take the body and never run it.
        if reactor.isDriven && reactor.isStopping { return nil }
        return await withCheckedContinuation { (continuation: CheckedContinuation<T?, Never>) in
            if !reactor.execute({ continuation.resume(returning: body()) }) {
                continuation.resume(returning: nil)
            }
        }
    }
}

/// Why the manager refused a request.
public enum ConnectionManagerError: Error, Sendable, Hashable, CustomStringConvertible {
    /// `connection(service:)` without an address for a service never registered.
    case unknownService(String)
    /// The service name is empty.
    case invalidServiceName
    /// The manager was closed.
    case closed

    public var description: String {
        switch self {
        case .unknownService(let name):
            return "service \"\(name)\" is not registered: pass its address the first time"
        case .invalidServiceName: return "the service name must not be empty"
        case .closed: return "the connection manager is closed"
        }
    }
}

/// A metrics factory that can render what it holds as text (Prometheus exposition format).
public protocol MetricsTextExporting {
    /// The exposition text.
    func exposition() -> String
}
