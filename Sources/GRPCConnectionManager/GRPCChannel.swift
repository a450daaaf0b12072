import GRPCCMCalls
import GRPCCMCompression
import GRPCCMHandlers
import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire
import Logging
import Metrics
import Synchronization

/// A client for one service: its connections (one per resolved address, or `connectionsPerTarget`), reconnection
/// with backoff, keepalive, idle timeout, and the calls made on them.
///
/// Make one directly for a single target, or get one per service name from `ConnectionManager`. Calls may start
/// on any thread. Completions and stream callbacks run on the reactor thread, exactly once per call, never inside
/// the library's socket, TLS or HTTP/2 processing and never inside the call that started them; from them the whole
/// API is legal (start the next call, cancel, close this channel, drop it, stop the loop). They must not block.
public final class GRPCChannel: Sendable {
    /// The target this channel connects to.
    public let target: Target
    /// The `:authority` of its requests: TLS's `serverName` when set (as grpc-go takes it from the credentials: a
    /// proxy that routes by authority must see the name the certificate is checked against), else the target's.
    let authority: String
    /// Where its connections' TLS context comes from (nil: plaintext); shared with every channel of equal settings.
    let tlsContextSource: TLSContextSource?
    /// The service name it serves (the target's text for a standalone channel).
    public let service: String
    /// The validated configuration.
    public let configuration: Configuration
    /// Connection and call events of this channel (shared by every channel of a manager).
    public let events: EventBus
    /// One part per loop the channel runs on: the loop, its pool of connections, what its calls share.
    let shards: [ChannelShard]
    /// The first shard's, for code that knows the channel runs on one loop.
    let reactor: Reactor
    let pool: ServicePool
    let environment: CallEnvironment
    private let cursor = Atomic<Int>(0)
    /// `close()` was called (a manager dials a service again rather than hand out a closed channel).
    private let closedByUser = Atomic<Bool>(false)
    /// Run before every call, in order (none: nothing of them costs a call anything).
    let interceptors: [any CallInterceptor]
    /// Whether dropping the last reference closes the connections (standalone channels); a manager's channels
    /// live until the manager closes them.
    private let closesOnDeinit: Bool

    /// Creates a standalone channel on one loop. Nothing connects until the first call.
    /// - Parameters:
    ///   - target: `host:port`, `[v6]:port`, `unix:/path`, or `etcd:///name` (with `configuration.etcd`).
    ///   - configuration: Limits and timeouts; validated here.
    ///   - logger: Receives the logging handler's records; no-op by default.
    ///   - metricsFactory: Receives the metrics handler's metrics; passing one turns metrics on. nil: the
    ///     application's bootstrapped `MetricsSystem.factory` when `enableMetrics`.
    ///   - interceptors: Run, in this order, before every call (`CallInterceptor`).
    ///   - eventLoop: The loop to run on; nil uses `ReactorLoop.shared`. It must run (`start()`, or a host's
    ///     `runOnce`): until it does, nothing of a call happens, its deadline and a cancel included.
    /// - Throws: `ConfigurationError` naming the bad field or the unparsable address; `ReactorError` when
    ///   `ReactorLoop.shared` cannot be made (the process at its file descriptor or thread limit).
    public convenience init(
        target: String, configuration: Configuration = .defaults,
        logger: Logger = Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil, interceptors: [any CallInterceptor] = [],
        eventLoop: ReactorLoop? = nil
    ) throws {
        try self.init(
            target: target, configuration: configuration, logger: logger, metricsFactory: metricsFactory,
            interceptors: interceptors, loops: [(eventLoop ?? ReactorLoop.sharedLoop()).reactor])
    }

    /// Creates a standalone channel spread over the loops of `group`: each loop gets its own connections, and a
    /// call runs on one loop from start to completion (see `ReactorGroup`).
    public convenience init(
        target: String, configuration: Configuration = .defaults,
        logger: Logger = Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil, interceptors: [any CallInterceptor] = [], group: ReactorGroup
    ) throws {
        try self.init(
            target: target, configuration: configuration, logger: logger, metricsFactory: metricsFactory,
            interceptors: interceptors, loops: group.loops.map(\.reactor))
    }

    /// A standalone channel whose host names go to `resolver` instead of getaddrinfo (tests script the answers).
    convenience init(target: String, configuration: Configuration = .defaults, eventLoop: ReactorLoop, resolver: any AddressResolver) throws {
        try self.init(
            target: target, configuration: configuration,
            logger: Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }), metricsFactory: nil,
            interceptors: [], loops: [eventLoop.reactor], resolver: resolver)
    }

    convenience init(
        target: String, configuration: Configuration, logger: Logger, metricsFactory: (any MetricsFactory)?,
        interceptors: [any CallInterceptor], loops: [Reactor], resolver: (any AddressResolver)? = nil
    ) throws {
        try configuration.validate()
        let parsed = try Target(parsing: target)
        let bus = EventBus(reactors: loops)
        let factory = metricsFactory ?? MetricsSystem.factory
        // One value for every loop: its connection counts are shared (see `ConnectionStateCounts`).
        let handlerSettings = configuration.handlerSettings(metricsFactoryPassed: metricsFactory != nil)
        let contexts = loops.map { reactor in
            LoopContext(
                reactor: reactor, bus: bus.local(for: reactor),
                pipeline: CallPipeline(
                    settings: handlerSettings, bus: bus.local(for: reactor), logger: logger,
                    metricsFactory: factory))
        }
        try self.init(
            service: target, target: parsed, configuration: configuration, bus: bus, loops: contexts,
            connectionIDs: ConnectionIDSource(), closesOnDeinit: true, interceptors: interceptors, resolver: resolver)
    }

    /// A channel of a manager (or the standalone ones above): a pool and a connector on each loop.
    init(
        service: String, target: Target, configuration: Configuration, bus: EventBus, loops: [LoopContext],
        connectionIDs: ConnectionIDSource, closesOnDeinit: Bool, interceptors: [any CallInterceptor] = [],
        resolver: (any AddressResolver)? = nil
    ) throws(ConfigurationError) {
        // One resolver for the channel's pools (the configuration's unless a test brings its own).
        let chosen: any AddressResolver
        if let resolver {
            chosen = resolver
        } else {
            chosen = try configuration.makeResolver(for: target)
        }
        let resolver = chosen
        self.interceptors = interceptors
        let authority: String
        if let name = configuration.tls?.serverName, !name.isEmpty {
            authority = name
        } else {
            authority = target.authority
        }
        self.authority = authority
        var tls: TLSContextSource?
        var tlsServerName: String?
        if let settings = configuration.tls {
            do {
                tls = try TLSContextSource(settings: settings)
            } catch {
                throw ConfigurationError(field: "tls", message: error.description)
            }
            switch target.kind {
            // A certificate names an IPv6 address without its zone (which only says where this host reaches it).
            case .hostPort(let host, _): tlsServerName = settings.serverName ?? String(host.prefix { $0 != "%" })
            case .unix: tlsServerName = settings.serverName ?? "localhost"
            case .etcd(let name):
                // The name is a key prefix, which no certificate names: every handshake would fail its check.
                if settings.verifyCertificate && settings.serverName == nil {
                    throw ConfigurationError(
                        field: "tls.serverName",
                        message: "etcd:///\(name) names no host to check the servers' certificates against: set it (or turn verifyCertificate off)")
                }
                tlsServerName = settings.serverName ?? name
            }
        }
        self.tlsContextSource = tls
        let connectionSettings = configuration.http2ClientSettings  // one for every loop's connections
        self.shards = loops.map { context in
            let connector = HTTP2Connector(
                reactor: context.reactor, authority: authority, settings: connectionSettings,
                tls: tls, tlsServerName: tlsServerName)
            let pool = ServicePool(
                reactor: context.reactor, service: service, target: target, settings: configuration.poolSettings(service: service),
                connector: connector, bus: context.bus, connectionIDs: connectionIDs, resolver: resolver)
            context.pipeline.register(service: service, target: target.description)
            let environment = CallEnvironment(
                reactor: context.reactor, service: service, router: pool, bus: context.bus,
                policies: context.pipeline.policies, maxHeaderListSize: configuration.http2.maxHeaderListSize)
            return ChannelShard(reactor: context.reactor, pool: pool, environment: environment)
        }
        if let etcd = resolver as? EtcdResolver {
            etcd.reportProblems(service: service, buses: self.shards.map { ($0.reactor, $0.environment.bus) })
        }
        self.reactor = self.shards[0].reactor
        self.pool = self.shards[0].pool
        self.environment = self.shards[0].environment
        self.target = target
        self.service = service
        self.configuration = configuration
        self.events = bus
        self.closesOnDeinit = closesOnDeinit
    }

    /// The shard a call starts on: the calling thread's loop when it is one of the channel's (no hop, no lock),
    /// else the next one in turn.
    @inline(__always)
    private func shardForCall() -> ChannelShard {
        let shards = self.shards
        if shards.count == 1 { return shards[0] }
        for shard in shards where shard.onItsLoop { return shard }
        return shards[self.cursor.add(1, ordering: .relaxed).oldValue % shards.count]
    }

    /// Starts a unary call.
    /// - Parameters:
    ///   - path: `/package.Service/Method`.
    ///   - request: The request message bytes.
    ///   - metadata: Request metadata; validated before anything is sent.
    ///   - options: Deadline, receive limit, wait-for-ready.
    ///   - completion: Called exactly once, on the reactor thread, with the final status and the response; never
    ///     before this method has returned.
    /// - Returns: A handle that can cancel the call from any thread.
    @discardableResult
    public func unary(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions(),
        completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        self.start(path: path, request: request, metadata: metadata, options: options, completion: completion)
    }

    /// Creates a call of any kind and starts it on the reactor (inline when this is the reactor thread: its
    /// completion still waits for the deferred phase).
    func start(
        path: String, request: [UInt8]?, metadata: CallMetadata, options: RequestOptions,
        delivery: consuming ClientCall.Delivery = .single,
        buffers: StreamBuffers? = nil, onWritable: (@Sendable () -> Void)? = nil, previousAttempts: Int = 0,
        endsWhenClosing: Bool = false, completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        let deadline: UInt64
        if let timeout = options.timeout {
            let nanos = max(timeout.nanoseconds, 0)
            deadline = Reactor.clock() &+ UInt64(nanos) | 1  // never 0, which means "none"
        } else {
            deadline = 0
        }
        let shard = self.shardForCall()
        var metadata = metadata
        var observers: [any CallObserver] = []
        var problem: CallStatus? = nil
        var suspended: InterceptorRun.Suspension? = nil
        if let limit = options.maxReceiveMessageSize, limit < 0 {
            // Refused before anything is sent: every response would be refused after the server did the work.
            problem = CallStatus(code: .invalidArgument, message: "maxReceiveMessageSize must not be negative (\(limit))")
        } else if !self.interceptors.isEmpty {
            var intercepted = InterceptedCall(
                service: self.service, authority: self.target.authority, path: path, metadata: metadata, options: options)
            switch InterceptorRun.run(self.interceptors, from: 0, &intercepted, observers: &observers) {
            case .done: break
            case .failed(let status): problem = status
            case .suspended(let suspension): suspended = suspension
            }
            metadata = intercepted.metadata
        }
        if problem == nil && suspended == nil {
            problem = Self.checkRequest(
                path: path, metadata: metadata, requestSize: request?.count ?? 0, maxMessageSize: self.configuration.maxMessageSize)
        }
        // Streamed messages are compressed as they are written (the buffers know how); one request message here, on
        // the caller's thread, once for every attempt.
        let encoding = buffers?.requestEncoding ?? self.requestEncoding(path: path, options: options)
        // The send limit is on the message as the application gave it, whenever it is checked (the compressed one
        // may be far smaller).
        let requestSize = request?.count ?? 0
        var request = request
        if encoding != .identity, problem == nil, let message = request {
            request = MessageCompressor.compress(message, with: encoding)
        }
        if case .single = delivery, buffers == nil, request != nil, problem == nil,
            let policy = self.configuration.hedgingPolicy(forPath: path)
        {
            return self.startHedged(
                policy: policy, shard: shard, path: path, request: request, requestSize: requestSize, metadata: metadata,
                options: options, deadline: deadline, encoding: encoding, previousAttempts: previousAttempts,
                observers: observers, suspended: suspended, completion: completion)
        }
        // The local copies of the metadata, request and observers move into the call: each would otherwise be
        // retained for it and released here.
        // Interceptor work still running when the call ends (its deadline, a cancel) is cancelled with it.
        let preparation = suspended == nil ? nil : PreparationTask()
        // Not `preparation?.cancelling(completion) ?? completion`: through the generic `??` the closure is
        // reabstracted, a thunk allocated for every call (about 800 instructions at the gate).
        let completion = preparation == nil ? completion : preparation!.cancelling(completion)
        let call = ClientCall(
            environment: shard.environment, path: path, metadata: consume metadata, request: consume request,
            deadline: deadline, maxReceiveMessageSize: options.maxReceiveMessageSize ?? self.configuration.maxMessageSize,
            waitForReady: options.waitForReady, delivery: consume delivery, buffers: buffers, requestEncoding: encoding,
            onWritable: onWritable, previousAttemptsElsewhere: previousAttempts, invalid: problem,
            observers: consume observers, preparing: suspended != nil, completion: completion)
        if endsWhenClosing { call.endsWhenClosing = true }
        if shard.onItsLoop {
            call.start()
        } else if !shard.reactor.submit(call) {
            call.finishWithoutReactor(Self.loopStopped)
            return CallHandle(call: call)
        }
        if let suspended, let preparation {
            self.finishPreparation(suspended, into: preparation, on: shard.reactor, path: path, requestSize: requestSize) {
                call.preparationFinished(metadata: $0, observers: $1, failure: $2)
            }
        }
        return CallHandle(call: call)
    }

    /// How a call ends that its loop, stopped, can no longer take.
    private static let loopStopped = CallStatus(code: .unavailable, message: "the event loop has stopped")

    /// The interceptors' work from where one suspended, then the ones after it, in a task (cancelled with the call
    /// through `preparation`); `finished` gets what they left on the call's loop (the call, already there with its
    /// deadline armed, begins then).
    private func finishPreparation(
        _ suspended: InterceptorRun.Suspension, into preparation: PreparationTask, on reactor: Reactor, path: String,
        requestSize: Int,
        finished: @escaping @Sendable (CallMetadata, [any CallObserver], CallStatus?) -> Void
    ) {
        let maxMessageSize = self.configuration.maxMessageSize
        let interceptors = self.interceptors
        preparation.set(Task {
            let (metadata, observers, failure) = await suspended.finish(interceptors)
            let problem = failure ?? Self.checkRequest(
                path: path, metadata: metadata, requestSize: requestSize, maxMessageSize: maxMessageSize)
            if !reactor.execute({ finished(metadata, observers, problem) }) {
                // The loop stopped meanwhile and ended the call; the observers the interceptors added since never
                // joined it, so they hear the end here (a tracing span must end).
                let end = UnaryResponse(status: Self.loopStopped)
                for observer in observers.reversed() { observer.callFinished(end) }
            }
        })
    }

    /// A unary call hedged (gRFC A6): a coordinator on the shard's loop sends the attempts.
    /// - Parameter suspended: An interceptor's async work, which the first attempt waits for (the deadline running).
    private func startHedged(
        policy: CallHedgingPolicy, shard: ChannelShard, path: String, request: [UInt8]?, requestSize: Int,
        metadata: CallMetadata, options: RequestOptions, deadline: UInt64, encoding: CallCompression,
        previousAttempts: Int, observers: [any CallObserver], suspended: InterceptorRun.Suspension?,
        completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        let maxReceive = options.maxReceiveMessageSize ?? self.configuration.maxMessageSize
        let preparation = suspended == nil ? nil : PreparationTask()
        // Not `preparation?.cancelling(completion) ?? completion`: through the generic `??` the closure is
        // reabstracted, a thunk allocated for every call (about 800 instructions at the gate).
        let completion = preparation == nil ? completion : preparation!.cancelling(completion)
        let hedged = HedgedCall(
            environment: shard.environment, path: path, policy: policy, metadata: metadata, deadline: deadline,
            preparing: suspended != nil, observers: observers, completion: completion
        ) { number, coordinator, metadata in
            let attempt = ClientCall(
                environment: shard.environment, path: path, metadata: metadata, request: request, deadline: deadline,
                maxReceiveMessageSize: maxReceive, waitForReady: options.waitForReady, requestEncoding: encoding,
                // gRFC A6: each hedged attempt says how many went before it.
                previousAttemptsElsewhere: previousAttempts + number - 1,
                completion: { [coordinator] response in coordinator.attemptEnded(number, response) })
            attempt.hedgeAttempt = number
            attempt.onResponseHeaders = { [coordinator] in coordinator.responseHeadersReceived(number) }
            return attempt
        }
        if shard.onItsLoop {
            hedged.start()
        } else if !shard.reactor.execute({ hedged.start() }) {
            // As a single call that the stopped loop refused ends (`ClientCall.finishWithoutReactor`): observers
            // first, then the completion, off the caller's thread.
            hedged.refusedByStoppedLoop()
            spawnDetachedThread {
                let end = UnaryResponse(status: Self.loopStopped)
                for observer in observers.reversed() { observer.callFinished(end) }
                completion(end)
            }
            return CallHandle(hedged: hedged)
        }
        if let suspended, let preparation {
            self.finishPreparation(suspended, into: preparation, on: shard.reactor, path: path, requestSize: requestSize) {
                hedged.preparationFinished(metadata: $0, observers: $1, failure: $2)
            }
        }
        return CallHandle(hedged: hedged)
    }

    func makeBuffers(path: String, options: RequestOptions) -> StreamBuffers {
        StreamBuffers(
            limit: self.configuration.streamBufferSize, maxSendMessageSize: self.configuration.maxMessageSize,
            requestEncoding: self.requestEncoding(path: path, options: options))
    }

    /// How a call's request messages are compressed: its options, else the configuration's per method, else its
    /// default.
    @inline(__always)
    func requestEncoding(path: String, options: RequestOptions) -> CallCompression {
        options.compression ?? self.configuration.requestEncoding(forPath: path)
    }

    /// Makes a unary call: `try await channel.unary(...)` returns the response (its message and both metadata) when
    /// the call ends OK, and throws the call's `CallError` (status and trailers) otherwise. Cancelling the task
    /// cancels the call (CANCELLED).
    public func unary(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions()
    ) async throws(CallError) -> UnaryResponse {
        let response = await self.unaryResult(path: path, request: request, metadata: metadata, options: options)
        return try response.get()
    }

    /// Makes a unary call and returns how it ended, whatever the status: the non-throwing form of
    /// `unary(path:request:metadata:options:)`, for code that handles every status the same way (or counts them).
    /// Cancelling the task cancels the call (CANCELLED).
    public func unaryResult(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions()
    ) async -> UnaryResponse {
        await Self.awaitCall { completion in
            self.unary(path: path, request: request, metadata: metadata, options: options, completion: completion)
        }
    }

    /// Awaits a call started by `start` (which hands it the completion); cancelling the task cancels the call.
    static func awaitCall(
        _ start: (@escaping @Sendable (UnaryResponse) -> Void) -> CallHandle
    ) async -> UnaryResponse {
        let handleBox = CancellationBox()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<UnaryResponse, Never>) in
                handleBox.set(start { continuation.resume(returning: $0) })
            }
        } onCancel: {
            handleBox.cancel()
        }
    }

    /// Starts connecting now instead of on the first call.
    public func connect() {
        for shard in self.shards {
            let pool = shard.pool
            shard.onReactor { pool.connectAll() }
        }
    }

    /// The connectivity state (aggregated over the service's connections, on every loop) and the last error.
    public func connectivity() async -> (state: ConnectivityState, lastError: CallStatus?) {
        var states: [(state: ConnectivityState, lastError: CallStatus?)] = []
        for shard in self.shards {
            let pool = shard.pool
            if shard.onItsLoop {
                states.append((pool.state, pool.lastError))
                continue
            }
            if shard.reactor.isDriven && shard.reactor.isStopping {
                // A driven loop that stops runs work only if its host turns it again, which may never happen.
                states.append((.shutdown, nil))
                continue
            }
            states.append(
                await withCheckedContinuation { continuation in
                    let accepted = shard.reactor.execute { continuation.resume(returning: (pool.state, pool.lastError)) }
                    if !accepted { continuation.resume(returning: (.shutdown, nil)) }
                })
        }
        // round_robin's rule over the loops too: any READY, else any CONNECTING, else any IDLE, else the rest.
        for wanted in [ConnectivityState.ready, .connecting, .idle, .transientFailure] {
            if let match = states.first(where: { $0.state == wanted }) {
                return (wanted, wanted == .ready ? nil : states.compactMap(\.lastError).first ?? match.lastError)
            }
        }
        return (.shutdown, states.compactMap(\.lastError).first)
    }

    /// Closes the connections at once: every call of the channel ends with UNAVAILABLE (open, waiting for a
    /// connection, or between retries), later calls fail at once. Safe from any thread, completions included.
    public func close() {
        self.closedByUser.store(true, ordering: .releasing)
        for shard in self.shards {
            let pool = shard.pool
            shard.onReactor { pool.close(graceful: false) }
        }
    }

    /// Closes as a channel that another replaced: no new calls (they fail at once, as do calls waiting for a
    /// connection or between retries, with `reason`); calls in flight run to their end for up to `gracePeriod`,
    /// then end with `reason` too. Returns at once; safe from any thread.
    package func closeGracefully(gracePeriod: Duration, reason: CallStatus) {
        self.closedByUser.store(true, ordering: .releasing)
        let nanoseconds = UInt64(max(gracePeriod.nanoseconds, 0))
        for shard in self.shards {
            let pool = shard.pool
            shard.onReactor {
                pool.close(graceful: true, reason: reason)
                // Holds the pool until then (the channel may be let go of first); a loop that stops ends the calls.
                _ = pool.reactor.schedule(afterNanoseconds: nanoseconds) { pool.close(graceful: false, reason: reason) }
            }
        }
    }

    /// Whether `close()` (or `closeGracefully`) was called.
    package var isClosed: Bool { self.closedByUser.load(ordering: .acquiring) }

    /// Dropping the last reference of a standalone channel closes its connections on the reactor thread (so no
    /// fd outlives its channel), and the reactor-side state is released there, never under the reactor's feet.
    deinit {
        for shard in self.shards {
            let pool = shard.pool
            if self.closesOnDeinit {
                shard.onReactor {
                    pool.close(
                        graceful: false,
                        reason: CallStatus(
                            code: .unavailable,
                            message: "the channel was released (its last reference dropped) while calls were running"))
                }
            } else if !shard.onItsLoop {
                // A manager's channel: the manager closes it; its pool is released on the reactor thread all the
                // same, where its connections and timers live.
                shard.reactor.execute { withExtendedLifetime(pool) {} }
            }
        }
    }

    /// Takes the one figure it needs, not the configuration: passing that struct copies it, a retain and a release
    /// for each of its references, on every call.
    static func checkRequest(path: String, metadata: CallMetadata, requestSize: Int, maxMessageSize: Int) -> CallStatus? {
        if !MethodPath.isValid(path) {
            return CallStatus(code: .invalidArgument, message: "invalid method path \"\(path)\": expected /package.Service/Method")
        }
        do {
            try metadata.validate()
        } catch {
            return CallStatus(code: .invalidArgument, message: error.description)
        }
        if requestSize > maxMessageSize {
            return CallStatus(
                code: .resourceExhausted,
                message: "request message of \(requestSize) bytes exceeds the send limit of \(maxMessageSize) bytes")
        }
        return nil
    }
}

/// One loop's part of a manager: its bus part and its handlers (each loop has its own breaker and throttle state).
struct LoopContext: Sendable {
    let reactor: Reactor
    let bus: LocalEventBus
    let pipeline: CallPipeline
}

/// One loop's part of a channel.
final class ChannelShard: Sendable {
    let reactor: Reactor
    let pool: ServicePool
    let environment: CallEnvironment

    init(reactor: Reactor, pool: ServicePool, environment: CallEnvironment) {
        self.reactor = reactor
        self.pool = pool
        self.environment = environment
    }

    /// Whether this is the shard's loop thread. Asked of the shard rather than as `shard.reactor.inReactorThread`,
    /// which put a protective retain and release of the reactor around the read (about 40 instructions a call).
    var onItsLoop: Bool { self.reactor.inReactorThread }

    /// Runs `body` on the shard's loop: inline there, else through the inbox; not at all once the loop has stopped
    /// (it closed everything then).
    func onReactor(_ body: @escaping @Sendable () -> Void) {
        if self.onItsLoop {
            body()
        } else {
            self.reactor.execute(body)
        }
    }
}

/// Cancels a call from any thread. Cancelling a finished call does nothing.
public struct CallHandle: Sendable {
    let call: ClientCall?
    let hedged: HedgedCall?

    init(call: ClientCall) {
        self.call = call
        self.hedged = nil
    }

    init(hedged: HedgedCall) {
        self.call = nil
        self.hedged = hedged
    }

    /// Ends the call with CANCELLED (RST_STREAM CANCEL if it was sent), unless it already finished.
    public func cancel() {
        self.call?.cancelFromAnyThread()
        self.hedged?.cancel()
    }

    /// Ends the call with `status` instead of CANCELLED (the stream is reset with CANCEL all the same): the reason
    /// this side gave up, such as the error that stopped a transport's request producer.
    package func cancel(with status: CallStatus) {
        self.call?.cancelFromAnyThread(status)
        self.hedged?.cancel()
    }

    /// Ends the call with `status` as a failure (the breaker counts it), not as this side giving up: a deadline that
    /// a layer above enforced (GRPCCore's) ends it so.
    package func fail(with status: CallStatus) {
        self.call?.failFromAnyThread(status)
        self.hedged?.cancel()
    }
}

/// Hands the handle of an async call to its cancellation handler, whichever comes first.
final class CancellationBox: Sendable {
    private let state = PThreadLock<(handle: CallHandle?, cancelled: Bool)>((nil, false))

    func set(_ handle: CallHandle) {
        let cancelled = self.state.withLock { state -> Bool in
            state.handle = handle
            return state.cancelled
        }
        if cancelled { handle.cancel() }
    }

    func cancel() {
        let handle = self.state.withLock { state -> CallHandle? in
            state.cancelled = true
            return state.handle
        }
        handle?.cancel()
    }
}

/// The task that runs a call's interceptors after one of them suspended: cancelled if the call ends first, whichever
/// comes first of the task being stored and the call ending.
final class PreparationTask: Sendable {
    private let state = PThreadLock<(task: Task<Void, Never>?, cancelled: Bool)>((nil, false))

    func set(_ task: Task<Void, Never>) {
        let cancelled = self.state.withLock { state -> Bool in
            state.task = task
            return state.cancelled
        }
        if cancelled { task.cancel() }
    }

    /// `completion`, cancelling the task first: the call has ended, so its preparation has nothing left to do.
    func cancelling(_ completion: @escaping @Sendable (UnaryResponse) -> Void) -> @Sendable (UnaryResponse) -> Void {
        { response in
            self.cancel()
            completion(response)
        }
    }

    func cancel() {
        let task = self.state.withLock { state -> Task<Void, Never>? in
            state.cancelled = true
            defer { state.task = nil }
            return state.task
        }
        task?.cancel()
    }
}
