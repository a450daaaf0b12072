import GRPCCMCalls
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire
import Logging

/// Registers a server's address in etcd the way grpc-go's endpoints manager does, so that `etcd:///name` clients
/// (this package's, or grpc-go's etcd resolver) find it: a lease, the key `name/address` with the value
/// `{"Op":0,"Addr":"address","Metadata":null}` attached to it, and a bidirectional LeaseKeepAlive stream that renews
/// the lease every third of its TTL. If the process dies the lease expires and the key goes; if etcd loses the lease
/// (restarted, or unreachable for longer than the TTL) the registration grants a new one and writes the key again.
/// `deregister()` revokes the lease, which deletes the key unless another registration of the address has taken it.
///
/// Keep the registration for as long as the server serves: letting go of it stops its keepalives (nothing else holds
/// it), and the key goes when its lease expires, as when the process exits.
///
/// ```swift
/// let registration = try await EtcdRegistration.register(
///     name: "services/echo", address: "10.0.0.7:50051", etcd: .init(endpoints: ["127.0.0.1:2379"]))
/// // ... serve ...
/// await registration.deregister()
/// ```
public final class EtcdRegistration: Sendable {
    /// The key written: `name/address`.
    public let key: String
    /// The address registered: the key's last part, and the value's `Addr`.
    public let address: String
    private let channel: GRPCChannel
    private let loop: ReactorLoop
    private let ttl: Duration
    private let state = PThreadLock<State>(State())

    private struct State {
        var lease: Int64 = 0
        var stream: StreamingCall?
        var timer: LoopTimer?
        var stopped = false
        /// The renewal under way (a new lease and the key again), awaited by `deregister()`.
        var renewal: Task<Void, Never>?
        /// Counts the keepalive streams opened: a ping chain belongs to one and ends with it, and only the current
        /// one's end opens the next.
        var generation = 0
        /// The current stream's last keepalive has had no answer yet.
        var pingUnanswered = false
    }

    private init(key: String, address: String, channel: GRPCChannel, loop: ReactorLoop, ttl: Duration) {
        self.key = key
        self.address = address
        self.channel = channel
        self.loop = loop
        self.ttl = ttl
    }

    /// Registers `address` under `name` and keeps it registered until `deregister()`.
    /// - Parameters:
    ///   - ttl: The lease's time to live (whole seconds, at least 2): how long the key outlives this process.
    ///   - eventLoop: The loop its calls and timers run on; nil uses `ReactorLoop.shared`.
    /// - Throws: `CallError` when etcd cannot be reached or refuses (the lease or the key); INVALID_ARGUMENT for a
    ///   name an `etcd:///name` target cannot spell, or an address other than a numeric `ip:port` / `[v6]:port`
    ///   (what those targets read; a key nobody would find is not written); UNAVAILABLE when `ReactorLoop.shared`
    ///   cannot be made (the process at its file descriptor or thread limit).
    public static func register(
        name: String, address: String, etcd: Configuration.Etcd, ttl: Duration = .seconds(10),
        eventLoop: ReactorLoop? = nil
    ) async throws(CallError) -> EtcdRegistration {
        if let problem = Self.problem(name: name, address: address) {
            throw CallError(status: CallStatus(code: .invalidArgument, message: problem))
        }
        let loop: ReactorLoop
        do {
            loop = try eventLoop ?? ReactorLoop.sharedLoop()
        } catch {
            // The process is at its file descriptor or thread limit: UNAVAILABLE, as etcd out of reach would be.
            throw CallError(status: CallStatus(code: .unavailable, message: "no event loop: \(error)"))
        }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.etcd = etcd
        let channel: GRPCChannel
        do {
            try configuration.validate()
            channel = try etcd.clientChannel(
                configuration: configuration, logger: Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }),
                loops: [loop.reactor])
        } catch {
            throw CallError(status: CallStatus(code: .invalidArgument, message: "\(error)"))
        }
        let registration = EtcdRegistration(
            key: name + "/" + address, address: address, channel: channel, loop: loop,
            ttl: max(ttl, .seconds(2)))
        try await registration.grantAndPut()
        registration.keepAlive()
        return registration
    }

    /// Whether a client can dial `address`: not unspecified (`0.0.0.0`, `::`, a server's bind address, which Linux
    /// takes as this very host). The registration and the resolver apply the same rule.
    static func dialable(_ address: NetworkAddress) -> Bool { !address.isUnspecified }

    /// Why `name` and `address` would register nothing an `etcd:///name` target finds, or nil.
    static func problem(name: String, address: String) -> String? {
        guard (try? Target(parsing: "etcd:///" + name)) != nil else {
            return "name \"\(name)\": expected printable text without spaces or a trailing /, as in etcd:///name"
        }
        guard let target = try? Target(parsing: address), case .hostPort = target.kind,
            let numeric = target.numericAddresses
        else {
            return "address \"\(address)\": expected a numeric ip:port or [v6]:port, which etcd:/// targets read"
        }
        if !numeric.allSatisfy(Self.dialable) {
            return "address \"\(address)\": an unspecified address (a server's bind address) is nowhere a client can dial; register the address clients reach it at"
        }
        return nil
    }

    /// A lease, then the key attached to it.
    private func grantAndPut() async throws(CallError) {
        let seconds = max(Int64(self.ttl.components.seconds), 2)
        let grant = try await self.channel.unary(
            path: EtcdMessages.leaseGrantPath, request: EtcdMessages.leaseGrantRequest(ttlSeconds: seconds),
            options: RequestOptions(timeout: .seconds(5)))
        let lease = EtcdMessages.leaseResponse(grant.message)
        guard lease.error.isEmpty, lease.id != 0 else {
            throw CallError(status: CallStatus(code: .unavailable, message: "etcd refused a lease: \(lease.error)"))
        }
        _ = try await self.channel.unary(
            path: EtcdMessages.putPath,
            request: EtcdMessages.putRequest(
                key: self.key, value: EtcdMessages.endpointValue(address: self.address), lease: lease.id),
            options: RequestOptions(timeout: .seconds(5)))
        self.state.withLock { $0.lease = lease.id }
    }

    /// Opens the LeaseKeepAlive stream and renews every third of the TTL; a stream that ends opens again.
    private func keepAlive() {
        let next = self.state.withLock { state -> Int? in
            guard !state.stopped else { return nil }
            state.generation += 1
            state.pingUnanswered = false
            return state.generation
        }
        guard let generation = next else { return }
        let callbacks = StreamingCallbacks(
            onMessage: { [weak self] message in
                guard let self else { return }
                self.state.withLock { if $0.generation == generation { $0.pingUnanswered = false } }
                // TTL 0: etcd no longer knows the lease (it expired): register afresh.
                if EtcdMessages.leaseResponse(message).ttl == 0 { self.renew() }
            },
            onFinish: { [weak self] _ in
                // A stream given up for a new one (`ping`) opens nothing more; nor does the reopen when a new one
                // was opened meanwhile (a stalled ping of this stream found it before its end did): one chain only.
                guard let self, self.isCurrent(generation) else { return }
                _ = self.loop.scheduleTimer(after: .seconds(1)) { [weak self] in
                    guard let self, self.isCurrent(generation) else { return }
                    self.keepAlive()
                }
            })
        let stream = self.channel.bidirectionalStreaming(path: EtcdMessages.leaseKeepAlivePath, callbacks: callbacks)
        let (stopped, previousTimer, previousStream) = self.state.withLock { state -> (Bool, LoopTimer?, StreamingCall?) in
            guard !state.stopped else { return (true, nil, nil) }
            defer {
                state.stream = stream
                state.timer = nil
            }
            return (false, state.timer, state.stream)
        }
        if stopped {
            stream.cancel()
            return
        }
        // The old stream's ping chain ends here: left running, every reopened stream added one more (an outage of an
        // hour left thousands, all pinging the new stream). The old stream too, if it is still open.
        previousTimer?.cancel()
        previousStream?.cancel()
        self.ping(generation)
    }

    /// Whether the keepalive stream of `generation` is the current one.
    private func isCurrent(_ generation: Int) -> Bool {
        self.state.withLock { !$0.stopped && $0.generation == generation }
    }

    /// One keepalive now, the next after a third of the TTL, for as long as the stream of `generation` is current.
    /// A stream whose last keepalive went unanswered for that long is given up for a new one at once (round robin
    /// puts it on the next member): etcd answers at once, so its member stopped serving though the connection
    /// stands (a host gone without a reset, a process stopped), which TCP and HTTP/2 keepalives notice only after
    /// tens of seconds, past a lease of a few.
    private func ping(_ generation: Int) {
        let (stream, lease, current, stalled) = self.state.withLock { state in
            let current = !state.stopped && state.generation == generation
            defer { if current { state.pingUnanswered = true } }
            return (state.stream, state.lease, current, state.pingUnanswered)
        }
        guard current, let stream else { return }
        if stalled {
            self.keepAlive()  // which cancels this stream
            return
        }
        _ = stream.send(EtcdMessages.leaseIDRequest(lease))
        let timer = self.loop.scheduleTimer(after: self.ttl / 3) { [weak self] in self?.ping(generation) }
        self.state.withLock { state in
            if state.generation == generation { state.timer = timer }
        }
    }

    /// The lease is gone: a new one and the key again (once at a time; retried by the next keepalive).
    private func renew() {
        self.state.withLock { state in
            guard !state.stopped, state.renewal == nil else { return }
            state.renewal = Task {
                try? await self.grantAndPut()
                self.state.withLock { $0.renewal = nil }
            }
        }
    }

    /// Revokes the lease, and the key with it unless a registration of the same address has put it since (it is
    /// that one's now); the keepalive stops. Idempotent. Done from a cancelled task too (a server's task tree being
    /// cancelled as it shuts down): the revoke is cleanup, not the caller's to cancel.
    public func deregister() async {
        let (stream, timer, renewal, wasStopped) = self.state.withLock { state in
            defer { state.stopped = true }
            return (state.stream, state.timer, state.renewal, state.stopped)
        }
        guard !wasStopped else { return }
        // In a task of its own, which the caller's cancellation does not reach: inherited, it cancelled the revoke
        // as it was sent, the key stayed for the lease's TTL, and a second deregister() did nothing.
        await Task { await self.revoke(stream: stream, timer: timer, renewal: renewal) }.value
    }

    private func revoke(stream: StreamingCall?, timer: LoopTimer?, renewal: Task<Void, Never>?) async {
        timer?.cancel()
        stream?.cancel()
        // A renewal under way finishes first: its Put landing after the Delete below would register the address
        // again, on a lease nothing revokes or renews (resolvers would route to it for the TTL). Its lease is the one
        // revoked then.
        await renewal?.value
        let lease = self.state.withLock { $0.lease }
        // Revoking the lease deletes the key only while it is still attached to it. A plain delete would also remove
        // the key another registration of the same address put since (a server restarted in place, its successor
        // registered before this one left): that registration's lease lives on, so it never writes the key again.
        _ = await self.channel.unaryResult(
            path: EtcdMessages.leaseRevokePath, request: EtcdMessages.leaseIDRequest(lease),
            options: RequestOptions(timeout: .seconds(5)))
        self.channel.close()
    }
}
