import CReactor
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Something the reactor calls back: an fd owner, a timer owner, a submitted job, or a connection that flushes its
/// coalesced output at the end of a loop turn.
///
/// Subclasses are reached from C through `Unmanaged<ReactorHandler>` and a class vtable call, which costs a few
/// nanoseconds per crossing (no existential, no retain on the hot path).
///
/// It is `open` (behind the `Reactor` SPI) only so that the embedded server module can subclass it; a `package`
/// base class trips a Swift 6.3 false "infinite recursion" warning on every subclass initializer.
///
/// `@unchecked Sendable`: every method below is called on the reactor thread only, and a subclass's state is touched
/// only there. Handing an instance to `Reactor.submit(_:)` from another thread transfers it to the reactor; the
/// submitter must not touch its mutable state afterwards.
@_spi(Reactor)
open class ReactorHandler: @unchecked Sendable {
    public init() {}

    /// An fd registered with this handler is ready. `events` is a mask of `Reactor.Events`.
    open func reactorFDReady(_ events: UInt32) {}
    /// A timer armed with this handler expired.
    open func reactorTimerFired(tag: UInt64) {}
    /// This handler was submitted with `Reactor.submit(_:)` and now runs on the reactor thread.
    open func reactorRunSubmitted() {}
    /// End of a loop turn, after `Reactor.scheduleFlush(_:)`: write what was produced in this turn.
    open func reactorFlush() {}
}

/// The event loop: one thread, one epoll instance (see `reactor.c`).
///
/// All socket I/O, timers and call state run on the reactor thread. Other threads reach it only through
/// `execute(_:)`/`submit(_:)`, which append to a lock-protected inbox and wake the loop through its eventfd.
///
/// The reactor runs either on a thread it creates (`start()`) or on the caller's thread (`run()`, for embedding).
///
/// `@unchecked Sendable`: the loop pointer, the registration and flush lists are touched only on the reactor thread;
/// the inbox is behind a pthread mutex; `cr_loop_wake` is thread-safe.
package final class Reactor: @unchecked Sendable {
    /// Readiness bits, as in `CReactor.h`.
    package enum Events {
        package static let read = UInt32(CR_READ)
        package static let write = UInt32(CR_WRITE)
        package static let error = UInt32(CR_ERROR)
        package static let hangup = UInt32(CR_HUP)
    }

    /// Reactor lifecycle.
    private enum LifeState: UInt8 {
        case created, running, stopping, stopped
    }

    // Reactor-thread state.
    /// nil once the loop has stopped and closed its fds; read off-thread only under the inbox lock.
    private var loop: OpaquePointer!
    private var flushList: [ReactorHandler] = []
    private var flushing: [ReactorHandler] = []
    private var drained: [ReactorHandler] = []
    /// Called on the reactor thread when the loop is about to stop, before fds are closed (owners close theirs).
    private var shutdownHooks: [ReactorHandler] = []

    /// One read buffer for every connection: only one handler reads at a time on this thread.
    package let readBuffer: UnsafeMutableBufferPointer<UInt8> = .allocate(capacity: 64 << 10)
    /// Where every connection of this reactor builds a call's request headers (reactor thread only).
    var headerScratch = HeaderScratch()
    /// Decrypted bytes on their way to nghttp2 (TLS connections; one at a time on this thread).
    package let plaintextBuffer: UnsafeMutableBufferPointer<UInt8> = .allocate(capacity: 64 << 10)

    // Cross-thread state.
    private let inbox = PThreadLock<[ReactorHandler]>([])
    private let life = Atomic<UInt8>(LifeState.created.rawValue)
    private let reactorThread = Atomic<UInt>(0)
    private let finished = PThreadLock<Bool>(false)

    /// Creates the epoll instance and the eventfd.
    /// - Throws: `ReactorError` if the kernel refuses either.
    package init() throws {
        cr_ignore_sigpipe()
        let callbacks = cr_callbacks(
            on_fd: reactorOnFD,
            on_timer: reactorOnTimer,
            on_wake: reactorOnWake,
            after_turn: reactorAfterTurn
        )
        guard let loop = cr_loop_create(nil, callbacks) else {
            throw ReactorError(operation: "epoll_create1/eventfd", errno: errno)
        }
        self.loop = loop
        // The reactor outlives its loop (deinit destroys it), so an unretained context is safe.
        cr_loop_set_context(loop, Unmanaged.passUnretained(self).toOpaque())
        self.flushList.reserveCapacity(64)
        self.flushing.reserveCapacity(64)
        self.drained.reserveCapacity(64)
    }

    deinit {
        if let loop = self.loop {
            cr_loop_destroy(loop)
        }
        self.readBuffer.deallocate()
        self.plaintextBuffer.deallocate()
    }

    // MARK: running

    /// Starts the loop on a new thread and returns once that thread runs.
    package func start() {
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            let reactor = Unmanaged<Reactor>.fromOpaque(arg!).takeRetainedValue()
            reactor.run()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        pthread_detach(thread)
        while self.reactorThread.load(ordering: .acquiring) == 0 && !self.isFinished {
            sched_yield()
        }
    }

    /// Runs the loop on the calling thread until `stop()`.
    package func run() {
        let started = self.life.compareExchange(
            expected: LifeState.created.rawValue, desired: LifeState.running.rawValue, ordering: .acquiringAndReleasing
        ).exchanged
        precondition(started, "a reactor runs once")
        self.reactorThread.store(UInt(bitPattern: Int(bitPattern: pthread_self())), ordering: .releasing)
        while self.life.load(ordering: .acquiring) == LifeState.running.rawValue {
            let rc = cr_loop_run_once(self.loop, 1)
            precondition(rc >= 0, "epoll_wait failed: errno \(-rc)")
        }
        self.finishShutdown()
    }

    /// Asks the loop to stop. Owners registered with `addShutdownHook` close their fds on the reactor thread first.
    /// Safe from any thread, including the reactor thread.
    package func stop() {
        let stopping = self.life.compareExchange(
            expected: LifeState.running.rawValue, desired: LifeState.stopping.rawValue, ordering: .acquiringAndReleasing
        ).exchanged
        if !stopping {
            // Never ran: nothing to drain.
            _ = self.life.compareExchange(
                expected: LifeState.created.rawValue, desired: LifeState.stopped.rawValue,
                ordering: .acquiringAndReleasing)
            self.markFinished()
            return
        }
        self.inbox.withLock { _ in
            if let loop = self.loop { cr_loop_wake(loop) }
        }
    }

    /// Stops the loop and waits until it has closed everything. Must not be called on the reactor thread.
    package func stopAndWait() {
        precondition(!self.inReactorThread, "stopAndWait() would deadlock on the reactor thread")
        self.stop()
        while !self.isFinished {
            usleep(1000)
        }
    }

    /// True on the reactor thread.
    package var inReactorThread: Bool {
        self.reactorThread.load(ordering: .relaxed) == UInt(bitPattern: Int(bitPattern: pthread_self()))
    }

    private var isFinished: Bool { self.finished.withLock { $0 } }

    private func markFinished() {
        self.finished.withLock { $0 = true }
    }

    private func finishShutdown() {
        // Let owners close their fds (they deregister), run what was submitted meanwhile, then stop.
        for _ in 0..<3 {
            let hooks = self.shutdownHooks
            self.shutdownHooks.removeAll()
            for hook in hooks { hook.reactorRunSubmitted() }
            self.drainInbox()
            self.runFlushes()
            if self.shutdownHooks.isEmpty && self.inbox.withLock({ $0.isEmpty }) { break }
        }
        // Timers still armed hold a retain on their handler: release them.
        while let target = cr_timer_pop_any(self.loop) {
            Unmanaged<ReactorHandler>.fromOpaque(target).release()
        }
        // Close the epoll fd and the eventfd now, so that every fd is closed when stopAndWait() returns.
        self.inbox.withLock { inbox in
            self.life.store(LifeState.stopped.rawValue, ordering: .releasing)
            cr_loop_destroy(self.loop)
            self.loop = nil
            inbox.removeAll()
        }
        self.markFinished()
    }

    /// Registers `handler.reactorRunSubmitted()` to run once when the reactor stops. Reactor thread only.
    package func addShutdownHook(_ handler: ReactorHandler) {
        self.shutdownHooks.append(handler)
    }

    /// Removes a hook added with `addShutdownHook`. Reactor thread only.
    package func removeShutdownHook(_ handler: ReactorHandler) {
        self.shutdownHooks.removeAll { $0 === handler }
    }

    /// True while the loop runs (after `run()`/`start()`, before `stop()`).
    package var isRunning: Bool {
        self.life.load(ordering: .acquiring) == LifeState.running.rawValue
    }

    /// True once `stop()` was called.
    package var isStopping: Bool {
        self.life.load(ordering: .acquiring) >= LifeState.stopping.rawValue
    }

    // MARK: cross-thread submission

    /// Runs `handler.reactorRunSubmitted()` on the reactor thread. Safe from any thread.
    /// - Returns: false when the reactor has stopped and the handler will never run.
    @discardableResult
    package func submit(_ handler: ReactorHandler) -> Bool {
        // The wake-up happens under the inbox lock so that it can never race with the loop being destroyed.
        self.inbox.withLock { inbox -> Bool in
            guard let loop = self.loop, self.life.load(ordering: .acquiring) != LifeState.stopped.rawValue else {
                return false
            }
            inbox.append(handler)
            cr_loop_wake(loop)
            return true
        }
    }

    /// Runs `body` on the reactor thread. Safe from any thread.
    /// - Returns: false when the reactor has stopped and `body` will never run.
    @discardableResult
    package func execute(_ body: @escaping @Sendable () -> Void) -> Bool {
        self.submit(ClosureJob(body))
    }

    fileprivate func drainInbox() {
        self.inbox.withLock { inbox in
            swap(&inbox, &self.drained)
        }
        for job in self.drained {
            job.reactorRunSubmitted()
        }
        self.drained.removeAll(keepingCapacity: true)
    }

    // MARK: fds (reactor thread only)

    /// A live fd registration.
    package struct Registration: Sendable, Equatable {
        package let id: Int64
    }

    /// Registers `fd` with `handler`, which is retained until `deregister`.
    package func register(fd: Int32, interest: UInt32, handler: ReactorHandler) throws -> Registration {
        let target = Unmanaged.passRetained(handler).toOpaque()
        let id = cr_fd_register(self.loop, fd, interest, target)
        if id < 0 {
            Unmanaged<ReactorHandler>.fromOpaque(target).release()
            throw ReactorError(operation: "epoll_ctl(ADD)", errno: Int32(-id))
        }
        return Registration(id: id)
    }

    /// Changes what `registration` waits for.
    package func setInterest(_ registration: Registration, _ interest: UInt32) {
        _ = cr_fd_set_interest(self.loop, registration.id, interest)
    }

    /// Removes `registration` and releases its handler. Does not close the fd.
    package func deregister(_ registration: Registration, handler: ReactorHandler) {
        if cr_fd_deregister(self.loop, registration.id) != -ENOENT {
            Unmanaged.passUnretained(handler).release()
        }
    }

    /// Live fd registrations (the eventfd is not counted).
    package var registrationCount: Int { cr_fd_count(self.loop) }

    // MARK: timers (reactor thread only)

    /// A pending timer. `0` means none.
    package typealias TimerID = UInt64

    /// The loop's cached monotonic time in nanoseconds (refreshed once per turn).
    package var now: UInt64 { cr_loop_now(self.loop) }

    /// A fresh monotonic reading in nanoseconds.
    package static func clock() -> UInt64 { cr_clock_now() }

    /// Arms a timer at the absolute deadline `deadline` (nanoseconds on the monotonic clock); `handler` is retained
    /// until the timer fires or is cancelled.
    package func scheduleTimer(at deadline: UInt64, handler: ReactorHandler, tag: UInt64 = 0) -> TimerID {
        let target = Unmanaged.passRetained(handler).toOpaque()
        let id = cr_timer_add(self.loop, deadline, target, tag)
        precondition(id != 0, "out of memory arming a timer")
        return id
    }

    /// Runs `body` on the reactor thread after `nanoseconds`. Reactor thread only.
    @discardableResult
    package func schedule(afterNanoseconds nanoseconds: UInt64, _ body: @escaping () -> Void) -> TimerID {
        self.scheduleTimer(at: cr_clock_now() &+ nanoseconds, handler: ClosureTimer(body))
    }

    /// Cancels a pending timer; releases its handler. Returns true if it had not fired yet.
    @discardableResult
    package func cancelTimer(_ id: TimerID) -> Bool {
        guard id != 0 else { return false }
        var target: UnsafeMutableRawPointer? = nil
        guard cr_timer_cancel(self.loop, id, &target) == 1 else { return false }
        if let target { Unmanaged<ReactorHandler>.fromOpaque(target).release() }
        return true
    }

    /// Pending timers.
    package var timerCount: Int { cr_timer_count(self.loop) }

    // MARK: end-of-turn flush (reactor thread only)

    /// Calls `handler.reactorFlush()` once at the end of this loop turn. The caller keeps a flag so that it asks
    /// once per turn.
    package func scheduleFlush(_ handler: ReactorHandler) {
        self.flushList.append(handler)
    }

    fileprivate func runFlushes() {
        while !self.flushList.isEmpty {
            swap(&self.flushList, &self.flushing)
            for handler in self.flushing { handler.reactorFlush() }
            self.flushing.removeAll(keepingCapacity: true)
        }
    }
}

// MARK: C callbacks (top-level, nonisolated: see swift-notes "Gotchas" 1 and 2)

private func reactorOnFD(_ ctx: UnsafeMutableRawPointer?, _ target: UnsafeMutableRawPointer?, _ events: UInt32) {
    // A strong reference for the duration of the callback, not `_withUnsafeGuaranteedRef`: a handler may close
    // itself here, dropping the registration's retain and its owner's, and must survive until it returns.
    // The cost is one retain/release pair per readiness event, not per frame.
    let handler = Unmanaged<ReactorHandler>.fromOpaque(target!).takeUnretainedValue()
    handler.reactorFDReady(events)
}

private func reactorOnTimer(_ ctx: UnsafeMutableRawPointer?, _ target: UnsafeMutableRawPointer?, _ tag: UInt64) {
    // The timer is gone from the heap: balance the retain taken in scheduleTimer.
    let handler = Unmanaged<ReactorHandler>.fromOpaque(target!).takeRetainedValue()
    handler.reactorTimerFired(tag: tag)
}

private func reactorOnWake(_ ctx: UnsafeMutableRawPointer?) {
    Unmanaged<Reactor>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.drainInbox() }
}

private func reactorAfterTurn(_ ctx: UnsafeMutableRawPointer?) {
    Unmanaged<Reactor>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.runFlushes() }
}

/// A submitted closure.
final class ClosureJob: ReactorHandler, @unchecked Sendable {
    private let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    override func reactorRunSubmitted() { self.body() }
}

/// A closure run by a timer.
final class ClosureTimer: ReactorHandler, @unchecked Sendable {
    private let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
    override func reactorTimerFired(tag: UInt64) { self.body() }
}

