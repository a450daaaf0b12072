import CReactor
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Putting your own work on the loop your gRPC clients use: closures, timers and file descriptors, and driving the
/// loop from an event loop of your own.
///
/// Threading rules, in short:
/// - `execute`, `scheduleTimer` and `LoopTimer.cancel()` are safe from any thread.
/// - `register(fd:interest:_:)`, `LoopRegistration.setInterest(_:)` and `deregister()` belong to the loop's thread;
///   from another they throw `ReactorError` (or, for `deregister`, return false) instead of racing the loop.
/// - `runOnce(maxWait:)` makes the first thread that calls it the loop's own; it throws `ReactorError` on a loop
///   that runs on a thread of its own or is driven by another thread. `nextTimeout` is nil off the driving thread.
/// - Your closures run on the loop's thread, outside the library's socket, TLS and HTTP/2 processing, and never
///   inside the call that scheduled them: `execute` bodies and timer bodies in the turn's deferred phase, fd
///   handlers when epoll reports the fd. From any of them the whole API is legal. They must not block.
extension ReactorLoop {
    /// Runs `body` on the loop's thread, in the deferred phase of the current turn (when called from the loop's
    /// thread outside the deferred phase) or of a later one. Safe from any thread.
    /// - Returns: false when the loop has stopped and `body` will never run.
    @discardableResult
    public func execute(_ body: @escaping @Sendable () -> Void) -> Bool {
        self.reactor.executeDeferred(body)
    }

    /// Runs `body` once on the loop's thread after `delay`, unless the returned timer is cancelled first. Safe from
    /// any thread. A timer fires exactly once or not at all; one still pending when the loop stops never fires.
    @discardableResult
    public func scheduleTimer(after delay: Duration, _ body: @escaping @Sendable () -> Void) -> LoopTimer {
        let deadline = Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0))
        return self.scheduleTimer(atMonotonicNanoseconds: deadline, body)
    }

    /// Runs `body` once on the loop's thread at `deadline` (right away when it has passed), unless the returned timer
    /// is cancelled first. Safe from any thread.
    ///
    /// The loop's timers run on the monotonic clock (`CLOCK_MONOTONIC`, as epoll's timeout does), which stands still
    /// while the system is suspended; `ContinuousClock` does not. The deadline is taken as the time left until it, so
    /// a suspension after this call delays the timer by as long as the system slept.
    @discardableResult
    public func scheduleTimer(at deadline: ContinuousClock.Instant, _ body: @escaping @Sendable () -> Void) -> LoopTimer {
        let remaining = ContinuousClock.now.duration(to: deadline)
        return self.scheduleTimer(after: remaining, body)
    }

    private func scheduleTimer(atMonotonicNanoseconds deadline: UInt64, _ body: @escaping @Sendable () -> Void) -> LoopTimer {
        let timer = UserTimer(reactor: self.reactor, deadline: deadline, body: body)
        if self.reactor.inReactorThread {
            timer.arm()
        } else if !self.reactor.submit(timer) {
            timer.abandon()
        }
        return LoopTimer(timer: timer)
    }

    /// Watches `fd` (yours: the loop never closes it) for `interest`; `handler` runs on the loop's thread with the
    /// readiness epoll reported, until you deregister. Level-triggered: while the fd stays readable (or writable
    /// with that interest), the handler runs every turn; read what you need and return. Loop thread only.
    ///
    /// Deregister before you close the fd. epoll removes a registration by fd number: once the fd is closed, the
    /// number may already belong to another socket of the loop (one of its gRPC connections), and deregistering
    /// would then remove that one's entry. The kernel drops a closed fd's entry only when the last descriptor of its
    /// file closes: if the fd was duplicated (`dup`, or inherited by a child process), the entry outlives your
    /// `close`, keeps reporting (level-triggered) events that reach nobody, and only deregistering first removes it.
    /// A registration with no interest (`setInterest([])`) is out of epoll until interest returns.
    /// - Throws: `ReactorError` off the loop's thread, for an fd epoll refuses (a closed one: EBADF; one already
    ///   registered: EEXIST), or once the loop has stopped.
    public func register(
        fd: Int32, interest: LoopInterest, _ handler: @escaping @Sendable (LoopEvents) -> Void
    ) throws(ReactorError) -> LoopRegistration {
        guard self.reactor.inReactorThread else {
            throw ReactorError(operation: "register(fd:): not on the event loop's thread", errno: EPERM)
        }
        let watcher = UserFDWatcher(reactor: self.reactor, fd: fd, handler: handler)
        try watcher.register(interest)
        return LoopRegistration(watcher: watcher)
    }

    /// Traps, in debug builds only, unless called on the loop's thread: put it at the top of your loop-only code.
    public func preconditionInEventLoop(file: StaticString = #fileID, line: UInt = #line) {
        assert(self.inEventLoop, "called off the event loop's thread", file: file, line: line)
    }

    // MARK: driving the loop from another

    /// The loop's epoll fd. It becomes readable whenever the loop has fd events, a wake-up (work submitted from
    /// another thread) or a stop to process: add it to your own poller (epoll, libuv's `uv_poll_t`, a SwiftNIO
    /// selector) and call `runOnce(maxWait: .zero)` when it is readable, and when `nextTimeout` passes. This is
    /// libcurl's multi-socket idea: your loop, our work, no thread of ours. -1 once the loop has finished.
    public var pollableDescriptor: Int32 { self.reactor.pollableDescriptor }

    /// How long the loop can wait before its next timer or deferred work needs a turn: `.zero` means now, nil means
    /// until `pollableDescriptor` becomes readable. Loop thread (the driving thread) only; nil elsewhere.
    public var nextTimeout: Duration? {
        guard self.reactor.inReactorThread else { return nil }
        let milliseconds = self.reactor.nextTimeoutMilliseconds
        return milliseconds < 0 ? nil : .milliseconds(Int(milliseconds))
    }

    /// Runs one turn of the loop on the calling thread, waiting at most `maxWait` for something to happen (nil:
    /// until it does). The first call makes the calling thread the loop's own, for good: drive a loop from one
    /// thread only, and do not also `start()` or `run()` it. After `stop()` (from anywhere) the next turn finishes
    /// the shutdown; `shutdown()` on the driving thread does it at once.
    /// - Returns: false once the loop has finished.
    /// - Throws: `ReactorError` when the loop runs on a thread of its own or another thread drives it.
    @discardableResult
    public func runOnce(maxWait: Duration? = .zero) throws(ReactorError) -> Bool {
        let milliseconds: Int32
        if let maxWait {
            // Round up: a sub-millisecond wait must not become a busy poll.
            // Saturating: `nanoseconds` is Int64.max for a wait near Duration's end, and adding to it would trap.
            let nanos = max(maxWait.nanoseconds, 0)
            milliseconds = Int32(clamping: nanos / 1_000_000 + (nanos % 1_000_000 == 0 ? 0 : 1))
        } else {
            milliseconds = -1
        }
        return try self.reactor.runOnce(maxWaitMilliseconds: milliseconds)
    }
}

/// What a registered fd waits for.
public struct LoopInterest: OptionSet, Sendable, Hashable {
    /// The reactor's bits (`CR_READ`, `CR_WRITE`).
    public let rawValue: UInt32
    /// Interest from the reactor's bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Report the fd when it is readable (or hung up).
    public static let readable = LoopInterest(rawValue: UInt32(CR_READ))
    /// Report the fd when it is writable.
    public static let writable = LoopInterest(rawValue: UInt32(CR_WRITE))
}

/// What epoll reported for a registered fd.
public struct LoopEvents: OptionSet, Sendable, Hashable {
    /// The reactor's bits (`CR_READ`, `CR_WRITE`, `CR_ERROR`, `CR_HUP`).
    public let rawValue: UInt32
    /// Events from the reactor's bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Readable, or the peer hung up (a read then returns 0).
    public static let readable = LoopEvents(rawValue: UInt32(CR_READ))
    /// Writable.
    public static let writable = LoopEvents(rawValue: UInt32(CR_WRITE))
    /// An error is pending (SO_ERROR, or the next read or write reports it).
    public static let error = LoopEvents(rawValue: UInt32(CR_ERROR))
    /// The peer hung up (EPOLLHUP or EPOLLRDHUP).
    public static let hangup = LoopEvents(rawValue: UInt32(CR_HUP))
}

/// A timer from `ReactorLoop.scheduleTimer`. Cancel it from any thread.
public struct LoopTimer: Sendable {
    fileprivate let timer: UserTimer

    /// Makes sure the body never runs, unless it already has (or is running).
    /// - Returns: true when this call stopped it; false when it had fired, was cancelled before, or the loop
    ///   stopped first (cancelling again is a harmless no-op).
    @discardableResult
    public func cancel() -> Bool { self.timer.cancel() }

    /// True once the body has run.
    public var hasFired: Bool { self.timer.state.load(ordering: .acquiring) == UserTimer.fired }
}

/// A file descriptor watched by a loop (`ReactorLoop.register(fd:interest:_:)`). Loop thread only.
public final class LoopRegistration: Sendable {
    fileprivate let watcher: UserFDWatcher

    fileprivate init(watcher: UserFDWatcher) {
        self.watcher = watcher
    }

    /// The fd (still yours: the loop never closes it).
    public var fd: Int32 { self.watcher.fd }

    /// Changes what the fd waits for. Loop thread only.
    /// - Throws: `ReactorError` off the loop's thread, or when the fd is no longer registered (deregistered, or
    ///   the loop stopped).
    public func setInterest(_ interest: LoopInterest) throws(ReactorError) {
        try self.watcher.setInterest(interest)
    }

    /// Stops watching the fd; its handler never runs again. Loop thread only; deregistering twice is a no-op.
    /// - Returns: true when this call removed it; false when it was not registered any more, or off the loop's thread
    ///   (nothing changes then).
    @discardableResult
    public func deregister() -> Bool {
        self.watcher.deregister()
    }
}


/// A user timer: armed on the loop's thread; fires (in the deferred phase) or is cancelled, exactly one of them.
final class UserTimer: ReactorHandler, @unchecked Sendable {
    // `@unchecked`: `state` is atomic and decides between firing and cancelling; `timerID` and `body` are touched
    // on the loop's thread only (`body` also by `deinit`); `reactor` is written in `init` only (a weak read is
    // atomic); the rest is immutable.
    static let pending: UInt8 = 0
    static let fired: UInt8 = 1
    static let cancelled: UInt8 = 2

    let state = Atomic<UInt8>(UserTimer.pending)
    /// Weak: a `LoopTimer` may outlive its loop, and `cancel()` then has nothing to tell it.
    private weak var reactor: Reactor?
    private let deadline: UInt64
    /// Let go of once it has run or been cancelled: what it captures (often the `LoopTimer` itself) goes with it.
    @exclusivity(unchecked)
    private var body: (@Sendable () -> Void)?
    @exclusivity(unchecked)
    private var timerID: Reactor.TimerID = 0

    init(reactor: Reactor, deadline: UInt64, body: @escaping @Sendable () -> Void) {
        self.reactor = reactor
        self.deadline = deadline
        self.body = body
    }

    /// On the loop's thread: into the heap, unless it was cancelled on its way here.
    func arm() {
        guard self.state.load(ordering: .acquiring) == Self.pending, let reactor = self.reactor else { return }
        self.timerID = reactor.scheduleTimer(at: self.deadline, handler: self)
        if self.timerID == 0 { self.abandon() }  // the loop has stopped
    }

    /// The loop stopped before the timer could be armed: it never fires.
    func abandon() {
        _ = self.state.compareExchange(expected: Self.pending, desired: Self.cancelled, ordering: .acquiringAndReleasing)
    }

    override func reactorRunSubmitted() { self.arm() }

    override func reactorTimerFired(tag: UInt64) {
        self.timerID = 0
        // User code waits for the deferred phase, like every other callback.
        self.reactor?.enqueueDeferred(self)
    }

    /// The loop stopped with this timer armed: it will never fire, so `cancel()` must say false.
    override func reactorTimerDropped() {
        self.timerID = 0
        self.abandon()
        self.body = nil
    }

    override func reactorRunDeferred() {
        guard self.state.compareExchange(expected: Self.pending, desired: Self.fired, ordering: .acquiringAndReleasing).exchanged
        else { return }
        let body = self.body
        self.body = nil
        body?()
    }

    func cancel() -> Bool {
        guard self.state.compareExchange(expected: Self.pending, desired: Self.cancelled, ordering: .acquiringAndReleasing).exchanged
        else { return false }
        // Free the heap slot and the body now rather than at the deadline (best effort: the state above already
        // decided).
        guard let reactor = self.reactor else { return true }
        if reactor.inReactorThread {
            self.release(on: reactor)
        } else {
            reactor.execute { self.release(on: reactor) }
        }
        return true
    }

    /// Cancelled: out of the heap, and the body let go of. Loop thread.
    private func release(on reactor: Reactor) {
        if self.timerID != 0 { reactor.cancelTimer(self.timerID) }
        self.timerID = 0
        self.body = nil
    }
}

/// A user fd's registration. `@unchecked Sendable` (through `ReactorHandler`): touched on the loop's thread only
/// (every mutating entry point checks that first); `fd` and `handler` are immutable.
final class UserFDWatcher: ReactorHandler, @unchecked Sendable {
    /// Weak: a `LoopRegistration` may outlive its loop (written in `init` only; a weak read is atomic).
    private weak var reactor: Reactor?
    let fd: Int32
    /// Let go of at `deregister()`: what it captures (often the registration itself) goes with it.
    @exclusivity(unchecked)
    private var handler: (@Sendable (LoopEvents) -> Void)?
    @exclusivity(unchecked)
    private var registration: Reactor.Registration?

    init(reactor: Reactor, fd: Int32, handler: @escaping @Sendable (LoopEvents) -> Void) {
        self.reactor = reactor
        self.fd = fd
        self.handler = handler
    }

    func register(_ interest: LoopInterest) throws(ReactorError) {
        guard let reactor = self.reactor else { throw ReactorError(operation: "register(fd:): the loop is gone", errno: ENOENT) }
        self.registration = try reactor.register(fd: self.fd, interest: interest.rawValue, handler: self)
        // When the loop stops, the registration goes (the fd stays open: it is the user's).
        reactor.addShutdownHook(self)
    }

    func setInterest(_ interest: LoopInterest) throws(ReactorError) {
        guard let reactor = self.reactor, reactor.inReactorThread else {
            throw ReactorError(operation: "setInterest: not on the event loop's thread", errno: EPERM)
        }
        guard let registration = self.registration, reactor.setInterest(registration, interest.rawValue) else {
            throw ReactorError(operation: "setInterest: fd \(self.fd) is not registered", errno: ENOENT)
        }
    }

    func deregister() -> Bool {
        guard let reactor = self.reactor, reactor.inReactorThread, let registration = self.registration else { return false }
        self.registration = nil
        self.handler = nil
        reactor.removeShutdownHook(self)
        return reactor.deregister(registration, handler: self)
    }

    override func reactorFDReady(_ events: UInt32) {
        self.handler?(LoopEvents(rawValue: events))
    }

    /// The loop is stopping.
    override func reactorRunSubmitted() {
        _ = self.deregister()
    }
}
