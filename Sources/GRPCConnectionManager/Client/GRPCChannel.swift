import Logging
import Metrics
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A client for one service: its connections (one per resolved address, or `connectionsPerTarget`), reconnection
/// with backoff, keepalive, idle timeout, and the calls made on them.
///
/// Make one directly for a single target, or get one per service name from `ConnectionManager`. Calls may start
/// on any thread; completions run on the reactor thread, exactly once per call, and must not block.
public final class GRPCChannel: Sendable {
    /// The target this channel connects to.
    public let target: Target
    /// The service name it serves (the target's text for a standalone channel).
    public let service: String
    /// The validated configuration.
    public let configuration: Configuration
    /// Connection and call events of this channel (shared by every channel of a manager).
    public let events: EventBus
    let reactor: Reactor
    let pool: ServicePool
    /// Whether dropping the last reference closes the connections (standalone channels); a manager's channels
    /// live until the manager closes them.
    private let closesOnDeinit: Bool

    /// Creates a standalone channel. Nothing connects until the first call.
    /// - Parameters:
    ///   - target: `host:port`, `[v6]:port` or `unix:/path`.
    ///   - configuration: Limits and timeouts; validated here.
    ///   - logger: Receives the logging handler's records; no-op by default.
    ///   - metricsFactory: Receives the metrics handler's metrics when `enableMetrics`; default: the application's
    ///     bootstrapped `MetricsSystem.factory`.
    ///   - eventLoop: The reactor to run on; nil uses `EventLoop.shared`.
    /// - Throws: `ConfigurationError` naming the bad field or the unparsable address.
    public convenience init(
        target: String, configuration: Configuration = .defaults,
        logger: Logger = Logger(label: "grpc-cm", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil, eventLoop: EventLoop? = nil
    ) throws {
        try configuration.validate()
        let reactor = (eventLoop ?? EventLoop.shared).reactor
        let parsed = try Target(parsing: target)
        let bus = EventBus(reactor: reactor)
        let pipeline = CallPipeline(
            configuration: configuration, bus: bus, logger: logger,
            metricsFactory: metricsFactory ?? MetricsSystem.factory)
        let pool = try ServicePool(
            reactor: reactor, service: target, target: parsed, configuration: configuration, bus: bus,
            connectionIDs: ConnectionIDSource(), pipeline: pipeline)
        self.init(pool: pool, bus: bus, reactor: reactor, closesOnDeinit: true)
    }

    init(pool: ServicePool, bus: EventBus, reactor: Reactor, closesOnDeinit: Bool) {
        self.pool = pool
        self.target = pool.target
        self.service = pool.service
        self.configuration = pool.configuration
        self.events = bus
        self.reactor = reactor
        self.closesOnDeinit = closesOnDeinit
    }

    /// Starts a unary call.
    /// - Parameters:
    ///   - path: `/package.Service/Method`.
    ///   - request: The request message bytes.
    ///   - metadata: Request metadata; validated before anything is sent.
    ///   - options: Deadline, receive limit, wait-for-ready.
    ///   - completion: Called exactly once, on the reactor thread, with the final status and the response.
    /// - Returns: A handle that can cancel the call from any thread.
    @discardableResult
    public func unary(
        path: String, request: [UInt8], metadata: Metadata = [:], options: CallOptions = CallOptions(),
        completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        self.start(path: path, request: request, metadata: metadata, options: options, completion: completion)
    }

    /// Creates a call of any kind and hands it to the reactor.
    func start(
        path: String, request: [UInt8]?, metadata: Metadata, options: CallOptions, delivery: ClientCall.Delivery = .single,
        buffers: StreamBuffers? = nil, onWritable: (@Sendable () -> Void)? = nil, previousAttempts: Int = 0,
        completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        let deadline: UInt64
        if let timeout = options.timeout {
            let nanos = max(timeout.nanoseconds, 0)
            deadline = Reactor.clock() &+ UInt64(nanos) | 1  // never 0, which means "none"
        } else {
            deadline = 0
        }
        let call = ClientCall(
            pool: self.pool, path: path, metadata: metadata, request: request, deadline: deadline,
            maxReceiveMessageSize: options.maxReceiveMessageSize ?? self.configuration.maxMessageSize,
            waitForReady: options.waitForReady, delivery: delivery, buffers: buffers, onWritable: onWritable,
            completion: completion)
        call.previousAttemptsElsewhere = previousAttempts
        if let problem = Self.checkRequest(
            path: path, metadata: metadata, request: request ?? [], configuration: self.configuration)
        {
            call.invalid = problem
        }
        if self.reactor.inReactorThread {
            self.pool.start(call)
        } else if !self.reactor.submit(call) {
            call.finishWithoutReactor(Status(code: .unavailable, message: "the event loop has stopped"))
        }
        return CallHandle(call: call, reactor: self.reactor)
    }

    func makeBuffers() -> StreamBuffers {
        StreamBuffers(limit: self.configuration.streamBufferSize, maxSendMessageSize: self.configuration.maxMessageSize)
    }

    /// Makes a unary call and waits for its final status. Cancelling the task cancels the call (CANCELLED).
    public func unary(
        path: String, request: [UInt8], metadata: Metadata = [:], options: CallOptions = CallOptions()
    ) async -> UnaryResponse {
        let handleBox = CancellationBox()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<UnaryResponse, Never>) in
                let handle = self.unary(path: path, request: request, metadata: metadata, options: options) {
                    continuation.resume(returning: $0)
                }
                handleBox.set(handle)
            }
        } onCancel: {
            handleBox.cancel()
        }
    }

    /// Starts connecting now instead of on the first call.
    public func connect() {
        let pool = self.pool
        self.onReactor { pool.connectAll() }
    }

    /// The connectivity state (aggregated over the service's connections) and the last error.
    public func connectivity() async -> (state: ConnectivityState, lastError: Status?) {
        let pool = self.pool
        return await withCheckedContinuation { continuation in
            let accepted = self.reactor.execute { continuation.resume(returning: (pool.state, pool.lastError)) }
            if !accepted { continuation.resume(returning: (.shutdown, nil)) }
        }
    }

    /// Closes the connections at once: open calls end with UNAVAILABLE, later calls fail at once.
    public func close() {
        let pool = self.pool
        self.onReactor { pool.close(graceful: false) }
    }

    /// Dropping the last reference of a standalone channel closes its connections on the reactor thread (so no
    /// fd outlives its channel), and the reactor-side state is released there, never under the reactor's feet.
    deinit {
        if self.closesOnDeinit {
            let pool = self.pool
            self.onReactor { pool.close(graceful: false) }
        }
    }

    func onReactor(_ body: @escaping @Sendable () -> Void) {
        if self.reactor.inReactorThread {
            body()
        } else {
            self.reactor.execute(body)
        }
    }

    /// `/` then printable ASCII without spaces. Scans the string's bytes in place (the generic `contains(where:)`
    /// over `utf8` showed in callgrind at ~500 instructions a call).
    static func isValidPath(_ path: String) -> Bool {
        var path = path
        return path.withUTF8 { bytes in
            guard bytes.first == UInt8(ascii: "/") else { return false }
            for byte in bytes where byte <= 0x20 || byte > 0x7E { return false }
            return true
        }
    }

    static func checkRequest(path: String, metadata: Metadata, request: [UInt8], configuration: Configuration) -> Status? {
        if !Self.isValidPath(path) {
            return Status(code: .invalidArgument, message: "invalid method path \"\(path)\": expected /package.Service/Method")
        }
        do {
            try metadata.validate()
        } catch {
            return Status(code: .invalidArgument, message: error.description)
        }
        if request.count > configuration.maxMessageSize {
            return Status(
                code: .resourceExhausted,
                message: "request message of \(request.count) bytes exceeds the send limit of \(configuration.maxMessageSize) bytes")
        }
        return nil
    }
}

/// Cancels a call from any thread. Cancelling a finished call does nothing.
public struct CallHandle: Sendable {
    let call: ClientCall
    let reactor: Reactor

    /// Ends the call with CANCELLED (RST_STREAM CANCEL if it was sent), unless it already finished.
    public func cancel() {
        self.call.failFromAnyThread(Status(code: .cancelled, message: "cancelled by the client"))
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

/// Runs `body` on a new detached thread (for the blocking resolver).
func spawnDetachedThread(_ body: @escaping @Sendable () -> Void) {
    final class Box: Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let pointer = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { arg in
        let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
        box.body()
        return nil
    }, pointer)
    if rc == 0 {
        pthread_detach(thread)
    } else {
        Unmanaged<Box>.fromOpaque(pointer).takeRetainedValue().body()
    }
}
