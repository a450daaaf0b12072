/// The public handle of a reactor: one thread with one epoll instance that runs all socket I/O, timers and call
/// state of the channels built on it.
///
/// Most programs use `ReactorLoop.shared`. Create your own to control its thread (`start()`) or to run the loop on
/// a thread you own (`run()`, for embedding).
public final class ReactorLoop: Sendable {
    package let reactor: Reactor

    /// The process-wide loop, started on its own thread on first use. Traps when it cannot be made (no file
    /// descriptor for epoll or its eventfd, no thread): the initialisers that take an optional loop use it through
    /// `sharedLoop()`, and throw then instead.
    public static var shared: ReactorLoop {
        do {
            return try Self.sharedLoop()
        } catch {
            preconditionFailure("ReactorLoop.shared: \(error)")
        }
    }

    /// The process-wide loop, made and started on first use; a failure (the process at its file descriptor or
    /// thread limit) is thrown, and the next use tries again.
    package static func sharedLoop() throws -> ReactorLoop {
        try Self.sharedState.withLock { shared in
            if let loop = shared { return loop }
            let loop = try ReactorLoop(reactor: Reactor())
            try loop.reactor.startThread()
            shared = loop
            return loop
        }
    }

    private static let sharedState = PThreadLock<ReactorLoop?>(nil)

    private init(reactor: Reactor) {
        self.reactor = reactor
    }

    /// Creates a loop that is not running yet.
    /// - Throws: `ReactorError` when epoll or eventfd cannot be created.
    public init() throws {
        self.reactor = try Reactor()
    }

    /// Runs the loop on a new thread. Traps when the system cannot create one (`ReactorGroup` throws instead).
    public func start() { self.reactor.start() }

    /// Runs the loop on the calling thread until `shutdown()` is called from another thread (or `stop()` from a
    /// completion).
    public func run() { self.reactor.run() }

    /// Asks the loop to stop; safe from any thread, including completions.
    public func stop() { self.reactor.stop() }

    /// Stops the loop: every call still open, queued, waiting for a connection or for its next retry ends with
    /// UNAVAILABLE (its completion runs, on this loop's thread, before the loop finishes), connections send GOAWAY
    /// (and close_notify under TLS), and every fd closes. From a thread that is no loop's it waits for all of that;
    /// from the loop's own thread (a completion, a bus handler) it cannot wait for itself, so it returns at once and
    /// the loop finishes when the callback returns. From another loop's thread it returns at once too: that loop may
    /// be shutting this one down at the same moment, and two loops waiting for each other would never finish.
    public func shutdown() { self.reactor.stopAndWait() }

    /// True on the loop's thread.
    public var inEventLoop: Bool { self.reactor.inReactorThread }
}
