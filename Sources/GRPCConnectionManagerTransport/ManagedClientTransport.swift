import GRPCConnectionManager
import GRPCCore

/// A grpc-swift-2 `ClientTransport` that runs every RPC on a ``GRPCChannel`` of this package, so generated
/// clients get its pooling, reconnection, keepalive, circuit breaker, metrics and reactor.
///
/// ```swift
/// let manager = try ConnectionManager()
/// let transport = try ManagedClientTransport(manager: manager, service: "echo", address: "127.0.0.1:50051")
/// try await withGRPCClient(transport: transport) { client in
///     let echo = Echo_Echo.Client(wrapping: client)
///     print(try await echo.get(.with { $0.text = "hi" }).text)
/// }
/// ```
///
/// **Who does what.** GRPCCore serializes, runs interceptors, enforces the deadline and, when the
/// ``init(channel:serviceConfig:)`` service config asks for it, retries or hedges. This transport does the rest:
/// HTTP/2 and framing, metadata and status mapping, `waitForReady`, message size limits, backpressure (a
/// `write` suspends while the send buffer is full; the server's window reopens as responses are read) and
/// RST_STREAM when the task running `withStream` is cancelled. A request producer that throws ends the RPC with its
/// error (its code and message, UNKNOWN for an error that is not an `RPCError`), the stream reset with CANCEL.
///
/// **Retries happen in one place only.** Every RPC reaches the channel as a stream of requests, which the
/// package's own retry handler never retries (it does not keep streamed messages for replay), so the only retry
/// policy on this path is GRPCCore's, configured through `serviceConfig`. Transparent retries of streams the
/// server provably never saw still happen underneath, as gRPC specifies. The circuit breaker, the metrics and the
/// logging handlers see every attempt as a call of the service: an open breaker fails attempts at once with
/// UNAVAILABLE ("circuit breaker is open").
///
/// **Compression:** `CallOptions.compression` compresses the requests (gzip or deflate; others go out
/// uncompressed), and the configuration's `compression.acceptedEncodings` are offered, so a server may answer
/// compressed; such answers are inflated within the receive limit.
public final class ManagedClientTransport: ClientTransport, Sendable {
    public typealias Bytes = [UInt8]

    /// The channel RPCs run on: the one given, or the manager's open channel for the service, looked up for each
    /// RPC, so that the manager replacing it (for a new address) does not leave this transport on a closed one.
    /// When the manager has none open (after `closeConnection(service:)`, or the channel's own `close()`), the RPC
    /// dials the service again through the manager, as `connection(service:)` does; only a closed manager leaves
    /// RPCs on the closed channel, failing UNAVAILABLE.
    public var channel: GRPCChannel {
        guard let (manager, service) = self.managed else { return self.givenChannel }
        if let open = manager.openChannel(service: service), !open.isClosed { return open }
        return (try? manager.connection(service: service)) ?? self.givenChannel
    }
    private let givenChannel: GRPCChannel
    private let managed: (manager: ConnectionManager, service: String)?
    /// The throttle of the service config's `retryThrottling`, which GRPCCore's retries consult; nil without one.
    public let retryThrottle: GRPCCore.RetryThrottle?
    private let methodConfigs: MethodConfigLookup
    private let ownsChannel: Bool
    private let state = PThreadLock(TransportState())

    /// Runs RPCs on `channel` (for example `manager.connection(service:)`). The channel stays open after the
    /// transport shuts down: its owner closes it.
    /// - Parameter serviceConfig: Per-method timeouts, limits, wait-for-ready and GRPCCore retry or hedging
    ///   policies; the default has none.
    public convenience init(channel: GRPCChannel, serviceConfig: ServiceConfig = ServiceConfig()) {
        self.init(channel: channel, ownsChannel: false, serviceConfig: serviceConfig)
    }

    private init(
        channel: GRPCChannel, ownsChannel: Bool, serviceConfig: ServiceConfig,
        managed: (manager: ConnectionManager, service: String)? = nil
    ) {
        self.givenChannel = channel
        self.managed = managed
        self.ownsChannel = ownsChannel
        self.methodConfigs = MethodConfigLookup(serviceConfig)
        self.retryThrottle = serviceConfig.retryThrottling.map { GRPCCore.RetryThrottle(policy: $0) }
    }

    /// Runs RPCs on the manager's channel for `service` (registered at `address`, or already known), whichever
    /// channel the manager has open for it when each RPC starts.
    /// - Throws: What `ConnectionManager.connection(service:address:)` throws (an unknown service, a closed
    ///   manager, a bad address).
    public convenience init(
        manager: ConnectionManager, service: String, address: String? = nil,
        serviceConfig: ServiceConfig = ServiceConfig()
    ) throws {
        self.init(
            channel: try manager.connection(service: service, address: address), ownsChannel: false,
            serviceConfig: serviceConfig, managed: (manager, service))
    }

    /// Opens a channel of its own to `target` (`host:port`), closed when the transport shuts down.
    public convenience init(
        target: String, configuration: Configuration = .defaults, serviceConfig: ServiceConfig = ServiceConfig()
    ) throws {
        self.init(
            channel: try GRPCChannel(target: target, configuration: configuration), ownsChannel: true,
            serviceConfig: serviceConfig)
    }

    // MARK: ClientTransport

    /// Connects the channel, then waits until a graceful shutdown has drained every stream, or until the task is
    /// cancelled (which cancels the open streams).
    /// - Throws: `RPCError` (FAILED_PRECONDITION) when `connect()` was already called: the transport runs once.
    public func connect() async throws {
        let first = self.state.withLock { state -> Bool in
            defer { state.connectCalled = true }
            return !state.connectCalled
        }
        guard first else {
            throw RPCError(code: .failedPrecondition, message: "connect() was already called on this transport")
        }
        self.channel.connect()
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = self.state.withLock { state -> Bool in
                    if state.shuttingDown && state.streams.isEmpty { return true }
                    if state.cancelled { return true }
                    state.connectWaiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let (streams, waiter) = self.state.withLock { state in
                state.cancelled = true
                state.shuttingDown = true
                defer { state.connectWaiter = nil }
                return (Array(state.streams.values), state.connectWaiter)
            }
            for stream in streams { stream.cancel() }
            waiter?.resume()
        }
        if self.ownsChannel { self.givenChannel.close() }
    }

    /// New streams fail with FAILED_PRECONDITION from now on; open ones run to their end, then `connect()`
    /// returns.
    public func beginGracefulShutdown() {
        let waiter = self.state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.shuttingDown = true
            guard state.streams.isEmpty else { return nil }
            defer { state.connectWaiter = nil }
            return state.connectWaiter
        }
        waiter?.resume()
    }

    public func withStream<T: Sendable>(
        descriptor: MethodDescriptor, options: GRPCCore.CallOptions,
        _ closure: (_ stream: RPCStream<Inbound, Outbound>, _ context: ClientContext) async throws -> T
    ) async throws -> T {
        // Before the channel is asked for: for a manager's service, that may register and dial one.
        if self.state.withLock({ $0.shuttingDown }) {
            throw GRPCCore.RPCError(code: .failedPrecondition, message: "the transport is shutting down")
        }
        let channel = self.channel
        let stream = TransportStream(channel: channel, path: "/" + descriptor.fullyQualifiedMethod, options: options)
        // The channel's peer description, read under the same lock as the stream is registered (once known).
        var knownPeer: String? = nil
        let id = try self.state.withLock { state throws(GRPCCore.RPCError) -> Int in
            if state.shuttingDown {
                throw GRPCCore.RPCError(code: .failedPrecondition, message: "the transport is shutting down")
            }
            state.nextStreamID += 1
            state.streams[state.nextStreamID] = stream
            if let peer = state.peer, peer.channel === channel { knownPeer = peer.description }
            return state.nextStreamID
        }
        let peer = knownPeer ?? self.describePeer(of: channel)
        defer { self.streamEnded(id) }
        let rpcStream = RPCStream(
            descriptor: descriptor,
            inbound: RPCAsyncSequence(wrapping: ResponseParts(stream: stream)),
            outbound: RPCWriter.Closable(wrapping: RequestWriter(stream: stream)))
        let context = ClientContext(descriptor: descriptor, remotePeer: peer, localPeer: "")
        return try await withTaskCancellationHandler {
            // Whatever the closure leaves open is reset when it returns or throws.
            defer { stream.cancel() }
            return try await closure(rpcStream, context)
        } onCancel: {
            stream.cancel()
        }
    }

    /// `channel`'s remote peer, described and kept for the RPCs after this one (parsing its target, and an
    /// interface lookup for a zoned address, are not work for every RPC).
    private func describePeer(of channel: GRPCChannel) -> String {
        let described = Self.peer(channel.target)
        self.state.withLock { $0.peer = (channel, described) }
        return described
    }

    /// The remote peer as GRPCCore describes one, `<transport>:<address>` (`ipv4:127.0.0.1:50051`, `ipv6:[::1]:443`,
    /// `unix:/path`): the target's, as the connection is picked after the RPC has begun; a name stays a name
    /// (`dns:api.example.com:443`, `etcd:///users`). The local peer is not known yet either: empty.
    static func peer(_ target: Target) -> String {
        switch target.kind {
        case .hostPort(let host, let port):
            if NetworkAddress(ip: host, port: port) == nil { return "dns:\(host):\(port)" }
            return host.contains(":") ? "ipv6:[\(host)]:\(port)" : "ipv4:\(host):\(port)"
        case .unix, .etcd:
            return target.description
        }
    }

    public func config(forMethod descriptor: MethodDescriptor) -> MethodConfig? {
        self.methodConfigs[descriptor]
    }

    /// Whether `connect()` has been called (GRPCClient's `runConnections()` calls it): tests wait for it before they
    /// shut the client down, which GRPCClient refuses to do before it runs.
    package var connectCalled: Bool { self.state.withLock { $0.connectCalled } }

    private func streamEnded(_ id: Int) {
        let waiter = self.state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.streams[id] = nil
            guard state.shuttingDown && state.streams.isEmpty else { return nil }
            defer { state.connectWaiter = nil }
            return state.connectWaiter
        }
        waiter?.resume()
    }
}

struct TransportState {
    var connectCalled = false
    var shuttingDown = false
    var cancelled = false
    var connectWaiter: CheckedContinuation<Void, Never>?
    var streams: [Int: TransportStream] = [:]
    var nextStreamID = 0
    /// The last channel's remote peer, as `ClientContext` describes it.
    var peer: (channel: GRPCChannel, description: String)?
}
