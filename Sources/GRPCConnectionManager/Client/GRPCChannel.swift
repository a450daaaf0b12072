import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A client for one target (`host:port`, `[v6]:port` or `unix:/path`): it connects on the first call, keeps one
/// HTTP/2 connection, and makes unary calls on it.
///
/// Calls may start on any thread. Completions run on the reactor thread, exactly once per call, and must not block.
public final class GRPCChannel: Sendable {
    /// The target this channel connects to.
    public let target: Target
    /// The validated configuration.
    public let configuration: Configuration
    let reactor: Reactor
    let core: ChannelCore

    /// Creates a channel. Nothing connects until the first call.
    /// - Parameters:
    ///   - target: `host:port`, `[v6]:port` or `unix:/path`.
    ///   - configuration: Limits and timeouts; validated here.
    ///   - eventLoop: The reactor to run on; nil uses `EventLoop.shared`.
    /// - Throws: `ConfigurationError` naming the bad field or the unparsable address.
    public init(target: String, configuration: Configuration = .defaults, eventLoop: EventLoop? = nil) throws {
        try configuration.validate()
        self.target = try Target(parsing: target)
        self.configuration = configuration
        self.reactor = (eventLoop ?? EventLoop.shared).reactor
        self.core = ChannelCore(reactor: self.reactor, target: self.target, configuration: configuration)
    }

    /// Starts a unary call.
    /// - Parameters:
    ///   - path: `/package.Service/Method`.
    ///   - request: The request message bytes.
    ///   - metadata: Request metadata; validated before anything is sent.
    ///   - options: Deadline and receive limit.
    ///   - completion: Called exactly once, on the reactor thread, with the final status and the response.
    /// - Returns: A handle that can cancel the call from any thread.
    @discardableResult
    public func unary(
        path: String, request: [UInt8], metadata: Metadata = [:], options: CallOptions = CallOptions(),
        completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        let deadline: UInt64
        if let timeout = options.timeout {
            let nanos = max(timeout.nanoseconds, 0)
            deadline = Reactor.clock() &+ UInt64(nanos) | 1  // never 0, which means "none"
        } else {
            deadline = 0
        }
        let call = UnaryCall(
            channel: self.core, path: path, metadata: metadata, request: request, deadline: deadline,
            maxReceiveMessageSize: options.maxReceiveMessageSize ?? self.configuration.maxMessageSize,
            completion: completion)
        if let problem = Self.checkRequest(path: path, metadata: metadata, request: request, configuration: self.configuration) {
            call.invalid = problem
        }
        if self.reactor.inReactorThread {
            self.core.start(call)
        } else if !self.reactor.submit(call) {
            completion(UnaryResponse(status: Status(code: .unavailable, message: "the event loop has stopped")))
        }
        return CallHandle(call: call, reactor: self.reactor)
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

    /// Dropping the last reference closes the connection on the reactor thread (so no fd outlives its channel),
    /// and the reactor-side state is released there, never under the reactor's feet.
    deinit {
        let core = self.core
        if self.reactor.inReactorThread {
            core.close()
        } else {
            self.reactor.execute { core.close() }
        }
    }

    /// Closes the connection: open calls end with UNAVAILABLE, later calls fail at once.
    public func close() {
        let core = self.core
        if self.reactor.inReactorThread {
            core.close()
        } else {
            self.reactor.execute { core.close() }
        }
    }

    static func checkRequest(path: String, metadata: Metadata, request: [UInt8], configuration: Configuration) -> Status? {
        if !path.hasPrefix("/") || path.utf8.contains(where: { $0 <= 0x20 || $0 > 0x7E }) {
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
    let call: UnaryCall
    let reactor: Reactor

    /// Ends the call with CANCELLED (RST_STREAM CANCEL if it was sent), unless it already finished.
    public func cancel() {
        let call = self.call
        if self.reactor.inReactorThread {
            call.fail(Status(code: .cancelled, message: "cancelled by the client"), reset: true)
        } else {
            self.reactor.execute { call.fail(Status(code: .cancelled, message: "cancelled by the client"), reset: true) }
        }
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

/// The channel's reactor-side state: its address list and its connection.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
final class ChannelCore: ReactorHandler, HTTP2ClientConnectionDelegate, @unchecked Sendable {
    unowned let reactor: Reactor
    let target: Target
    let configuration: Configuration

    private var addresses: [SocketAddress]?
    private var addressIndex = 0
    private var resolving = false
    private var awaitingAddresses: [UnaryCall] = []
    private var connection: HTTP2ClientConnection?
    private var nextConnectionID = 1
    private var closed = false

    init(reactor: Reactor, target: Target, configuration: Configuration) {
        self.reactor = reactor
        self.target = target
        self.configuration = configuration
        self.addresses = target.numericAddresses
    }

    /// A call arrives on the reactor thread.
    func start(_ call: UnaryCall) {
        if let problem = call.invalid {
            call.finish(UnaryResponse(status: problem))
            return
        }
        if self.closed {
            call.finish(UnaryResponse(status: Status(code: .unavailable, message: "the channel is closed")))
            return
        }
        if self.reactor.isStopping {
            call.finish(UnaryResponse(status: Status(code: .unavailable, message: "the event loop is shutting down")))
            return
        }
        if call.deadline != 0 && call.deadlineTimer == 0 && !call.isFinished {
            call.deadlineTimer = self.reactor.scheduleTimer(at: call.deadline, handler: call)
        }
        self.dispatch(call)
    }

    private func dispatch(_ call: UnaryCall) {
        if call.isFinished { return }
        if let connection = self.connection, connection.state != .closed, connection.state != .draining {
            connection.enqueue(call)
            return
        }
        guard let addresses = self.addresses, !addresses.isEmpty else {
            call.markWaiting()
            self.awaitingAddresses.append(call)
            self.resolve()
            return
        }
        let address = addresses[self.addressIndex % addresses.count]
        let connection = HTTP2ClientConnection(
            reactor: self.reactor, address: address, authority: self.target.authority,
            configuration: self.configuration, id: self.nextConnectionID)
        self.nextConnectionID += 1
        connection.delegate = self
        self.connection = connection
        connection.enqueue(call)
        connection.connect()
    }

    /// getaddrinfo blocks, so it runs on a helper thread and reports back through the inbox.
    private func resolve() {
        guard !self.resolving else { return }
        self.resolving = true
        let target = self.target
        let reactor = self.reactor
        let core = self
        spawnDetachedThread {
            let result = target.resolveBlocking()
            reactor.execute { core.resolved(result) }
        }
    }

    private func resolved(_ result: Result<[SocketAddress], Status>) {
        self.resolving = false
        let waiting = self.awaitingAddresses
        self.awaitingAddresses = []
        switch result {
        case .success(let addresses):
            self.addresses = addresses
            self.addressIndex = 0
            for call in waiting { self.dispatch(call) }
        case .failure(let status):
            for call in waiting { call.finish(UnaryResponse(status: status)) }
        }
    }

    func close() {
        self.closed = true
        for call in self.awaitingAddresses {
            call.finish(UnaryResponse(status: Status(code: .unavailable, message: "the channel is closed")))
        }
        self.awaitingAddresses = []
        self.connection?.shutdown(reason: Status(code: .unavailable, message: "the channel is closed"))
        self.connection = nil
    }

    // MARK: HTTP2ClientConnectionDelegate

    func connectionReady(_ connection: HTTP2ClientConnection) {}

    func connectionDraining(_ connection: HTTP2ClientConnection, unstarted: [UnaryCall]) {
        if self.connection === connection { self.connection = nil }
        // Never sent, so safe to move once to a new connection (gRFC A6 transparent retry).
        for call in unstarted {
            if call.transparentlyRetried {
                call.finish(UnaryResponse(status: Status(code: .unavailable, message: "server is going away")))
            } else {
                call.transparentlyRetried = true
                self.dispatch(call)
            }
        }
    }

    func connectionClosed(_ connection: HTTP2ClientConnection, reason: Status, unstarted: [UnaryCall], wasReady: Bool) {
        if self.connection === connection {
            self.connection = nil
            if !wasReady { self.addressIndex += 1 }  // try the next address next time
        }
        for call in unstarted { call.finish(UnaryResponse(status: reason)) }
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
