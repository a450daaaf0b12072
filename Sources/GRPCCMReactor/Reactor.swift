import CReactor
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The event loop: one thread, one epoll instance (see `reactor.c`).
///
/// All socket I/O, timers and call state run on the reactor thread. Other threads reach it only through
/// `execute(_:)`/`submit(_:)`, which append to a lock-protected inbox and wake the loop through its eventfd.
///
/// One turn of the loop, and where user code may run in it:
///
/// ```
///   epoll_wait ─▶ fd events (sockets: nghttp2, TLS)  ─▶ expired timers ─▶ deferred work ─▶ flush
///                 wake-up: the inbox (submitted jobs)                    (user callbacks)  (one write per
///                                                                                          connection)
/// ```
///
/// The library never calls user code from an fd event or a timer: whatever it has for the user (a completion, a
/// stream message, a bus event) is queued with `enqueueDeferred(_:)` and runs in the deferred phase, where the whole
/// public API is legal again (start a call, close a channel, drop it, stop the loop). Work queued *during* the
/// deferred phase runs in the next turn, which then polls without sleeping: a completion that starts a call that
/// fails at once cannot recurse, and a closed loop of such calls cannot starve I/O or timers.
///
/// The reactor runs either on a thread it creates (`start()`) or on the caller's thread (`run()`, for embedding).
///
/// `@unchecked Sendable`: the loop pointer, the registration, deferred and flush lists are touched only on the reactor
/// thread (or, once it has stopped, by nobody); the inbox is behind a pthread mutex; `cr_loop_wake` is thread-safe.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
///
/// Objects that live on a loop (a connection, its socket, a pool) hold their reactor `unowned`, and keep an
/// `Unmanaged` copy too for the reads on the loop's own paths (its callbacks, its turns, routing a call), where the
/// reactor is necessarily alive: a read through `unowned` is a strong retain and a release (about 40 instructions),
/// and those paths run for every call. Elsewhere the `unowned` reference still traps on misuse.
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
    @exclusivity(unchecked)
    private var loop: OpaquePointer?
    @exclusivity(unchecked)
    private var flushList: [ReactorHandler] = []
    /// `flushList`'s other buffer, empty between runs (see `take`).
    @exclusivity(unchecked)
    private var flushSpare: [ReactorHandler] = []
    @exclusivity(unchecked)
    private var drained: [ReactorHandler] = []
    @exclusivity(unchecked)
    private var deferred: [ReactorHandler] = []
    /// `finishShutdown` has begun (reactor thread only).
    @exclusivity(unchecked)
    private var finishingShutdown = false
    /// `deferred`'s other buffer, empty between runs (see `take`).
    @exclusivity(unchecked)
    private var deferredSpare: [ReactorHandler] = []
    /// Called on the reactor thread when the loop is about to stop, before fds are closed (owners close theirs).
    @exclusivity(unchecked)
    private var shutdownHooks: [ObjectIdentifier: ReactorHandler] = [:]
    /// State that modules above keep once per reactor (see `shared(_:)`).
    @exclusivity(unchecked)
    private var sharedState: [ObjectIdentifier: AnyObject] = [:]

    /// One read buffer for every connection: only one handler reads at a time on this thread.
    package let readBuffer: UnsafeMutableBufferPointer<UInt8> = .allocate(capacity: 64 << 10)
    /// Decrypted bytes on their way to nghttp2 (TLS connections; one at a time on this thread).
    package let plaintextBuffer: UnsafeMutableBufferPointer<UInt8> = .allocate(capacity: 64 << 10)

    // Cross-thread state.
    private let inbox = PThreadLock<[ReactorHandler]>([])
    /// Submissions are refused: the shutdown found the inbox empty and will not look again. Under the inbox lock.
    @exclusivity(unchecked)
    private var inboxClosed = false
    /// Submitters between taking the loop from under the inbox lock and writing its eventfd (outside the lock): the
    /// loop is destroyed only once none is left.
    private let wakers = Atomic<Int>(0)
    private let life = Atomic<UInt8>(LifeState.created.rawValue)
    /// The thread running the loop; 0 before it runs and again once it has finished.
    private let reactorThread = Atomic<UInt>(0)
    private let finished = PThreadLock<Bool>(false)

    /// Creates the epoll instance and the eventfd.
    /// - Throws: `ReactorError` if the kernel refuses either.
    package init() throws {
        // SIGPIPE is left as the application set it: every socket write passes MSG_NOSIGNAL (`cr_write`), and a
        // library that set it to ignored for the whole process would change what the host's children inherit.
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
        self.flushSpare.reserveCapacity(64)
        self.drained.reserveCapacity(64)
        self.deferred.reserveCapacity(64)
        self.deferredSpare.reserveCapacity(64)
    }

    deinit {
        if let loop = self.loop {
            // Never ran, or a host drove it and let it go without shutting it down: release what timers and fd
            // registrations still hold (a user's fd watcher and what its closure captured), then close the fds.
            _ = Self.releaseArmedTimers(loop)
            while let target = cr_fd_pop_any(loop) { Unmanaged<ReactorHandler>.fromOpaque(target).release() }
            cr_loop_destroy(loop)
            // That host's thread serves this loop no longer (else it would never again wait for a loop to stop, or
            // for a subscription to apply). Let go of elsewhere, the count on the driving thread cannot be reached.
            if self.inReactorThread { cr_thread_loop_count_add(-1) }
        }
        self.readBuffer.deallocate()
        self.plaintextBuffer.deallocate()
    }

    // MARK: running

    /// Starts the loop on a new thread and returns once that thread runs. A loop that runs, or ran, already is left
    /// as it is. Traps when no thread can be created (`startThread` throws instead).
    package func start() {
        do {
            try self.startThread()
        } catch {
            preconditionFailure("\(error)")
        }
    }

    /// `start()`, throwing when no thread can be created (the process or the system is at its thread limit).
    package func startThread() throws(ReactorError) {
        guard self.life.load(ordering: .acquiring) == LifeState.created.rawValue else { return }
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            let reactor = Unmanaged<Reactor>.fromOpaque(arg!).takeRetainedValue()
            reactor.run()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Reactor>.fromOpaque(box).release()
            throw ReactorError(operation: "pthread_create for the loop's thread", errno: rc)
        }
        pthread_detach(thread)
        while self.life.load(ordering: .acquiring) == LifeState.created.rawValue {
            sched_yield()
        }
    }

    /// Runs the loop on the calling thread until `stop()`.
    package func run() {
        let started = self.life.compareExchange(
            expected: LifeState.created.rawValue, desired: LifeState.running.rawValue, ordering: .acquiringAndReleasing
        ).exchanged
        // Stopped before it ran, or already running (on its own thread, or driven by a host): nothing to do here.
        guard started else { return }
        self.becomeLoopThread()
        while self.life.load(ordering: .acquiring) == LifeState.running.rawValue {
            let rc = cr_loop_run_once(self.loop!, self.deferred.isEmpty ? 1 : 0)
            precondition(rc >= 0, "epoll_wait failed: errno \(-rc)")
        }
        self.finishShutdown()
    }

    /// Runs one turn on the calling thread, waiting at most `maxWaitMilliseconds` (-1: until something happens), for a
    /// host loop that drives this one. The first call makes the calling thread the loop's; every later call must come
    /// from it. Once `stop()` was called, the turn after finishes the shutdown.
    /// - Returns: false once the loop has finished (nothing will ever run on it again).
    /// - Throws: `ReactorError` when the loop runs on a thread of its own, or another thread drives it.
    package func runOnce(maxWaitMilliseconds: Int32) throws(ReactorError) -> Bool {
        if self.life.load(ordering: .acquiring) == LifeState.created.rawValue {
            let started = self.life.compareExchange(
                expected: LifeState.created.rawValue, desired: LifeState.running.rawValue,
                ordering: .acquiringAndReleasing
            ).exchanged
            if started {
                self.becomeLoopThread()
                self.driven.store(true, ordering: .releasing)
            }
        }
        if self.isStopped { return false }
        guard self.driven.load(ordering: .acquiring), self.inReactorThread else {
            throw ReactorError(operation: "runOnce: the loop runs on a thread of its own, or another thread drives it", errno: EPERM)
        }
        // A callback of this turn asking for another turn (a host's "wait until done" helper) would run the C loop
        // inside itself, over the events it is still dispatching.
        guard !self.inDrivenTurn else {
            throw ReactorError(operation: "runOnce: called from inside a turn of the same loop", errno: EDEADLK)
        }
        if self.life.load(ordering: .acquiring) == LifeState.running.rawValue {
            // Work already queued (deferred bodies, output to flush) must not wait for the poll's timeout.
            let wait = self.deferred.isEmpty && self.flushList.isEmpty ? maxWaitMilliseconds : 0
            self.inDrivenTurn = true
            self.betweenDrivenTurns = false
            let rc = cr_loop_run_once_for(self.loop!, wait)
            self.inDrivenTurn = false
            self.betweenDrivenTurns = true
            precondition(rc >= 0, "epoll_wait failed: errno \(-rc)")
        }
        if self.life.load(ordering: .acquiring) == LifeState.stopping.rawValue {
            self.finishShutdown()
            return false
        }
        return true
    }

    /// Whether a host loop drives this one through `runOnce` (read by whichever thread calls it).
    private let driven = Atomic<Bool>(false)

    /// Whether a host loop drives this one (`runOnce`): such a loop turns, and finishes stopping, only when its host
    /// turns it.
    package var isDriven: Bool { self.driven.load(ordering: .acquiring) }
    /// True while `runOnce` runs a turn (driving thread only).
    @exclusivity(unchecked)
    private var inDrivenTurn = false
    /// True on a driven loop from the end of one turn to the start of the next (driving thread only). Work queued
    /// then on the driving thread (a call started, a timer armed, from the host's own callbacks) wakes the
    /// pollable descriptor: the host may have read `nextTimeout` before it, and would otherwise sleep through it.
    @exclusivity(unchecked)
    private var betweenDrivenTurns = false

    /// A driven loop between turns got work on its own thread: make its descriptor readable, once per gap.
    @inline(never)
    private func wakeDrivingHost() {
        self.betweenDrivenTurns = false
        if let loop = self.loop { cr_loop_wake(loop) }
    }

    /// The epoll fd: readable whenever the loop has something to do (-1 once it has finished).
    /// Any thread: read under the inbox lock, under which the shutdown lets the loop go.
    package var pollableDescriptor: Int32 { self.inbox.withLock { _ in self.loop.map { cr_loop_fd($0) } ?? -1 } }

    /// Milliseconds until the loop needs a turn for its timers or deferred work: 0 when now, -1 when only an fd event
    /// or a wake-up (which make `pollableDescriptor` readable) can give it work. Loop thread only.
    package var nextTimeoutMilliseconds: Int32 {
        guard let loop = self.loop else { return -1 }
        if !self.deferred.isEmpty || !self.flushList.isEmpty { return 0 }
        return cr_loop_next_timer_ms(loop)
    }

    /// Asks the loop to stop. Owners registered with `addShutdownHook` close their fds on the reactor thread first.
    /// Safe from any thread, including the reactor thread.
    package func stop() {
        // Running or not yet: whichever it is when the exchange happens (a thread may start it in between, so try
        // again with what the exchange found). Stopping or stopped already: nothing to do.
        var from = LifeState.running.rawValue
        while true {
            let (exchanged, found) = self.life.compareExchange(
                expected: from, desired: LifeState.stopping.rawValue, ordering: .acquiringAndReleasing)
            if exchanged { break }
            guard found == LifeState.created.rawValue || found == LifeState.running.rawValue else { return }
            from = found
        }
        if from == LifeState.created.rawValue {
            // Never ran: what was submitted still has to end (a call's completion, say). This thread stands in for
            // the loop's for the shutdown, which is safe because no loop thread exists to race with it.
            self.becomeLoopThread()
            self.finishShutdown()
            return
        }
        self.inbox.withLock { _ in
            if let loop = self.loop { cr_loop_wake(loop) }
        }
    }

    /// Stops the loop and waits until it has closed everything. On the reactor thread it cannot wait for itself:
    /// it only stops, and the loop finishes once the current callback returns. On another loop's thread it only
    /// stops too: that loop may be shutting this one's down at the same moment, and two loops waiting for each
    /// other would never finish.
    package func stopAndWait() {
        self.stop()
        if self.inReactorThread {
            // Driven and between turns: no turn will come unless the host polls again, and a host that stopped the
            // loop stops polling it. Finish here, now.
            if self.driven.load(ordering: .acquiring) && !self.inDrivenTurn
                && self.life.load(ordering: .acquiring) == LifeState.stopping.rawValue
            {
                self.finishShutdown()
            }
            return
        }
        if Self.servesALoop { return }
        while !self.isFinished {
            usleep(1000)
        }
    }

    /// The calling thread becomes the loop's (it runs it, drives it, or stands in for it to shut it down) until
    /// `finishShutdown` ends.
    private func becomeLoopThread() {
        self.reactorThread.store(UInt(bitPattern: Int(bitPattern: pthread_self())), ordering: .releasing)
        cr_thread_loop_count_add(1)
    }

    /// True on a thread that serves a loop, any loop: such a thread must never wait for another loop, which may be
    /// waiting for it.
    package static var servesALoop: Bool { cr_thread_loop_count() > 0 }

    /// True on the reactor thread while the loop runs (and while it shuts down).
    package var inReactorThread: Bool {
        self.reactorThread.load(ordering: .relaxed) == UInt(bitPattern: Int(bitPattern: pthread_self()))
    }

    private var isFinished: Bool { self.finished.withLock { $0 } }

    private func markFinished() {
        self.finished.withLock { $0 = true }
    }

    private func finishShutdown() {
        // A callback this runs may ask for the shutdown again (`ReactorLoop.shutdown()` from a completion, on a
        // driven loop's thread between turns): the run under way finishes it.
        if self.finishingShutdown { return }
        self.finishingShutdown = true
        // Let owners close their fds (they deregister and fail their calls), run what was submitted meanwhile and
        // the completions all that produced, then stop. Each round may produce more (a completion that starts a call
        // on the stopping loop fails it, which queues another completion), so repeat until nothing is left.
        let loop = self.loop!
        var rounds = 0
        while true {
            let hooks = self.shutdownHooks.values.sorted { ObjectIdentifier($0) < ObjectIdentifier($1) }
            self.shutdownHooks.removeAll()
            for hook in hooks { hook.reactorRunSubmitted() }
            self.drainInbox()
            self.runDeferred()
            self.runFlushes()
            rounds += 1
            if rounds > 10_000 { break }  // work that makes more work forever: what is left is dropped
            guard self.shutdownHooks.isEmpty && self.deferred.isEmpty else { continue }
            // A release may end an object whose deinit defers or submits work (a channel closing its pool): another
            // round runs it.
            if Self.releaseArmedTimers(loop) { continue }
            // The inbox is found empty and closed in one step under its lock: a submission from another thread
            // either lands before (and the next round runs it) or is refused (and its caller ends the work itself).
            // Checked apart, a call submitted in between was accepted and then dropped, its completion never run.
            let closed = self.inbox.withLock { inbox -> Bool in
                guard inbox.isEmpty else { return false }
                self.inboxClosed = true
                return true
            }
            if closed { break }
        }
        _ = Self.releaseArmedTimers(loop)  // after the bail-out above, what is still armed
        self.sharedState.removeAll()
        // Close the epoll fd and the eventfd now, so that every fd is closed when stopAndWait() returns. The state
        // becomes `stopped` under the inbox lock: from here on the refusing paths do the work themselves.
        self.inbox.withLock { inbox in
            self.inboxClosed = true
            self.life.store(LifeState.stopped.rawValue, ordering: .releasing)
            // A submitter that took the loop before the inbox closed may still be writing its eventfd.
            while self.wakers.load(ordering: .acquiring) > 0 { sched_yield() }
            cr_loop_destroy(loop)
            self.loop = nil
            inbox.removeAll()
        }
        // This thread is the loop's no longer: what it does next (drop a channel, say) goes through the refusing
        // paths above instead of touching a loop that is gone.
        self.reactorThread.store(0, ordering: .releasing)
        cr_thread_loop_count_add(-1)
        self.markFinished()
    }

    /// Timers still armed hold a retain on their handler: releases them. Returns whether there were any.
    private static func releaseArmedTimers(_ loop: OpaquePointer) -> Bool {
        var released = false
        while let target = cr_timer_pop_any(loop) {
            let handler = Unmanaged<ReactorHandler>.fromOpaque(target)
            handler._withUnsafeGuaranteedRef { $0.reactorTimerDropped() }
            handler.release()
            released = true
        }
        return released
    }

    /// Registers `handler.reactorRunSubmitted()` to run once when the reactor stops. Reactor thread only.
    package func addShutdownHook(_ handler: ReactorHandler) {
        self.shutdownHooks[ObjectIdentifier(handler)] = handler
    }

    /// Removes a hook added with `addShutdownHook`. Reactor thread only.
    package func removeShutdownHook(_ handler: ReactorHandler) {
        self.shutdownHooks.removeValue(forKey: ObjectIdentifier(handler))
    }

    /// Hooks registered (tests: what a closed owner must not leave behind). Reactor thread only.
    package var shutdownHookCount: Int { self.shutdownHooks.count }

    /// True while the loop runs (after `run()`/`start()`, before `stop()`).
    package var isRunning: Bool {
        self.life.load(ordering: .acquiring) == LifeState.running.rawValue
    }

    /// True once `stop()` was called.
    package var isStopping: Bool {
        self.life.load(ordering: .acquiring) >= LifeState.stopping.rawValue
    }

    /// True once the loop has finished and closed its fds: nothing will ever run on it again.
    package var isStopped: Bool {
        self.life.load(ordering: .acquiring) == LifeState.stopped.rawValue
    }

    /// State that a module above keeps once per reactor (a scratch buffer, say), made on first use. Reactor thread
    /// only; look it up once and keep it, not on a hot path.
    package func shared<T: AnyObject>(_ make: () -> T) -> T {
        let key = ObjectIdentifier(T.self)
        if let existing = self.sharedState[key] { return existing as! T }
        let made = make()
        self.sharedState[key] = made
        return made
    }

    // MARK: cross-thread submission

    /// Runs `handler.reactorRunSubmitted()` on the reactor thread. Safe from any thread.
    /// - Returns: false when the reactor has stopped and the handler will never run.
    @discardableResult
    package func submit(_ handler: ReactorHandler) -> Bool {
        // Only the submission that finds the inbox empty wakes the loop: one already there has its wake-up coming,
        // and the drain it brings takes the whole inbox. The eventfd is written after the lock is let go: written
        // under it, the loop thread it woke (on the same core, say) ran at once, found the lock taken and slept on
        // it, and every submission cost two more context switches (the open-loop benchmark spent half its CPU so).
        // `wakers` keeps the loop from being destroyed in between.
        let wake = self.inbox.withLock { inbox -> OpaquePointer?? in
            guard let loop = self.loop, !self.inboxClosed else { return .none }
            let first = inbox.isEmpty
            inbox.append(handler)
            guard first else { return .some(nil) }
            self.wakers.add(1, ordering: .relaxed)
            return .some(loop)
        }
        guard let wake else { return false }
        if let loop = wake {
            cr_loop_wake(loop)
            self.wakers.subtract(1, ordering: .releasing)
        }
        return true
    }

    /// Runs `body` on the reactor thread. Safe from any thread.
    /// - Returns: false when the reactor has stopped and `body` will never run.
    @discardableResult
    package func execute(_ body: @escaping @Sendable () -> Void) -> Bool {
        self.submit(ClosureJob(body))
    }

    /// Runs `body` on the reactor thread in a deferred phase, where user code may run (`execute` runs it in the
    /// turn's fd phase): the current turn's when called on the reactor thread outside that phase, else a later one's.
    /// Safe from any thread.
    /// - Returns: false when the reactor has stopped and `body` will never run.
    @discardableResult
    package func executeDeferred(_ body: @escaping @Sendable () -> Void) -> Bool {
        let job = DeferredJob(reactor: self, body)
        // `inboxClosed` is written on this thread only, so this thread reads it without the lock.
        if self.inReactorThread && !self.inboxClosed {
            self.enqueueDeferred(job)
            return true
        }
        return self.submit(job)
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

    // MARK: deferred work (reactor thread only)

    /// Runs `handler.reactorRunDeferred()` in this turn's deferred phase, after I/O and timers; when called from the
    /// deferred phase itself, in the next turn. The caller keeps a flag so that it queues once until it has run.
    package func enqueueDeferred(_ handler: ReactorHandler) {
        self.deferred.append(handler)
        if self.betweenDrivenTurns { self.wakeDrivingHost() }
    }

    /// True while something waits for the deferred phase.
    package var hasDeferredWork: Bool { !self.deferred.isEmpty }

    fileprivate func runDeferred() {
        guard !self.deferred.isEmpty else { return }
        // What these queue goes to `deferred`: the next turn.
        var running = Self.take(&self.deferred, spare: &self.deferredSpare)
        self.inDeferredPhase = true
        for index in running.indices {
            Unmanaged.passUnretained(running[index])._withUnsafeGuaranteedRef { $0.reactorRunDeferred() }
        }
        self.inDeferredPhase = false
        Self.giveBack(&running, spare: &self.deferredSpare)
    }

    /// True while the deferred phase runs: where user code runs (tests check that it runs nowhere else).
    @exclusivity(unchecked)
    package private(set) var inDeferredPhase = false

    // MARK: fds (reactor thread only)

    /// A live fd registration.
    package struct Registration: Sendable, Equatable {
        package let id: Int64
    }

    /// Registers `fd` with `handler`, which is retained until `deregister`.
    /// - Throws: `ReactorError` when epoll refuses the fd (EBADF for a closed one) or the loop has stopped.
    package func register(fd: Int32, interest: UInt32, handler: ReactorHandler) throws(ReactorError) -> Registration {
        guard let loop = self.loop else { throw ReactorError(operation: "register: the event loop has stopped", errno: ESHUTDOWN) }
        let target = Unmanaged.passRetained(handler).toOpaque()
        let id = cr_fd_register(loop, fd, interest, target)
        if id < 0 {
            Unmanaged<ReactorHandler>.fromOpaque(target).release()
            throw ReactorError(operation: "epoll_ctl(ADD)", errno: Int32(-id))
        }
        return Registration(id: id)
    }

    /// Changes what `registration` waits for. Returns false when it is no longer registered.
    @discardableResult
    package func setInterest(_ registration: Registration, _ interest: UInt32) -> Bool {
        guard let loop = self.loop else { return false }
        return cr_fd_set_interest(loop, registration.id, interest) == 0
    }

    /// Removes `registration` and releases its handler. Does not close the fd. Returns false when it was not
    /// registered (removed before, or the loop has stopped).
    @discardableResult
    package func deregister(_ registration: Registration, handler: ReactorHandler) -> Bool {
        guard let loop = self.loop else { return false }
        if cr_fd_deregister(loop, registration.id) != -ENOENT {
            Unmanaged.passUnretained(handler).release()
            return true
        }
        return false
    }

    /// Tests only: the generation the next registration in `slot` gets.
    package func setRegistrationGenerationForTesting(slot: UInt32, generation: UInt32) {
        if let loop = self.loop { cr_fd_set_generation_for_testing(loop, slot, generation) }
    }

    /// Live fd registrations (the eventfd is not counted).
    package var registrationCount: Int { self.loop.map { cr_fd_count($0) } ?? 0 }

    // MARK: timers (reactor thread only)

    /// A pending timer. `0` means none.
    package typealias TimerID = UInt64

    /// The loop's cached monotonic time in nanoseconds (refreshed once per turn).
    package var now: UInt64 { self.loop.map { cr_loop_now($0) } ?? cr_clock_now() }

    /// A fresh monotonic reading in nanoseconds.
    package static func clock() -> UInt64 { cr_clock_now() }

    /// Arms a timer at the absolute deadline `deadline` (nanoseconds on the monotonic clock); `handler` is retained
    /// until the timer fires or is cancelled. Returns 0 (no timer) once the loop has stopped.
    package func scheduleTimer(at deadline: UInt64, handler: ReactorHandler, tag: UInt64 = 0) -> TimerID {
        guard let loop = self.loop else { return 0 }
        let target = Unmanaged.passRetained(handler).toOpaque()
        let id = cr_timer_add(loop, deadline, target, tag)
        precondition(id != 0, "out of memory arming a timer")
        if self.betweenDrivenTurns { self.wakeDrivingHost() }
        return id
    }

    /// Runs `body` on the reactor thread after `nanoseconds`. Reactor thread only.
    @discardableResult
    package func schedule(afterNanoseconds nanoseconds: UInt64, _ body: @escaping () -> Void) -> TimerID {
        self.scheduleTimer(at: cr_clock_now() &+ nanoseconds, handler: ClosureTimer(body))
    }

    /// Cancels `timer` if it is armed (not 0), and marks it unarmed. Reactor thread only.
    package func disarm(_ timer: inout TimerID) {
        if timer != 0 { self.cancelTimer(timer) }
        timer = 0
    }

    /// Cancels a pending timer; releases its handler. Returns true if it had not fired yet.
    @discardableResult
    package func cancelTimer(_ id: TimerID) -> Bool {
        guard id != 0, let loop = self.loop else { return false }
        var target: UnsafeMutableRawPointer? = nil
        guard cr_timer_cancel(loop, id, &target) == 1 else { return false }
        if let target { Unmanaged<ReactorHandler>.fromOpaque(target).release() }
        return true
    }

    /// Pending timers.
    package var timerCount: Int { self.loop.map { cr_timer_count($0) } ?? 0 }

    // MARK: end-of-turn flush (reactor thread only)

    /// Calls `handler.reactorFlush()` once at the end of this loop turn. The caller keeps a flag so that it asks
    /// once per turn.
    package func scheduleFlush(_ handler: ReactorHandler) {
        self.flushList.append(handler)
        if self.betweenDrivenTurns { self.wakeDrivingHost() }
    }

    /// Runs what a turn ends with (the deferred phase, then the flushes) on the calling thread. For tests that drive
    /// reactor-thread objects without running the loop.
    package func runEndOfTurnForTesting() {
        self.endOfTurn()
    }

    fileprivate func endOfTurn() {
        self.runDeferred()
        self.runFlushes()
    }

    fileprivate func runFlushes() {
        while !self.flushList.isEmpty {
            var flushing = Self.take(&self.flushList, spare: &self.flushSpare)
            for index in flushing.indices {
                Unmanaged.passUnretained(flushing[index])._withUnsafeGuaranteedRef { $0.reactorFlush() }
            }
            Self.giveBack(&flushing, spare: &self.flushSpare)
        }
    }

    /// Takes a turn's handlers out of `list` for a run, leaving it `spare`'s storage (each list has two buffers that
    /// trade places, so neither is reallocated turn after turn). The run holds them in its own local array and calls
    /// them unretained (a `for` over the array retained and released each): a handler that re-enters the reactor
    /// (a shutdown from a completion runs the deferred phase again) finds no list holding this run's handlers, so
    /// it can neither run nor free one of them a second time.
    @inline(__always)
    private static func take(_ list: inout [ReactorHandler], spare: inout [ReactorHandler]) -> [ReactorHandler] {
        var taken: [ReactorHandler] = []
        swap(&taken, &spare)
        swap(&taken, &list)
        return taken
    }

    /// Lets go of a run's handlers and keeps the storage as the list's spare (unless a re-entrant run put one back).
    @inline(__always)
    private static func giveBack(_ taken: inout [ReactorHandler], spare: inout [ReactorHandler]) {
        Self.empty(&taken)
        if spare.capacity == 0 { swap(&taken, &spare) }
    }

    /// Empties a turn's list of handlers and keeps its capacity. `removeAll(keepingCapacity:)` goes through the
    /// generic `replaceSubrange` and the array's destroy, about 150 instructions; a turn with one call in flight has
    /// one handler in each list, and `removeLast` releases it for about 30.
    @inline(__always)
    private static func empty(_ list: inout [ReactorHandler]) {
        if list.count == 1 {
            list.removeLast()
        } else {
            list.removeAll(keepingCapacity: true)
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
    Unmanaged<Reactor>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.endOfTurn() }
}

/// A submitted closure.
final class ClosureJob: ReactorHandler, @unchecked Sendable {
    private let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    override func reactorRunSubmitted() { self.body() }
}

/// A closure for the deferred phase (`executeDeferred`), submitted from any thread.
private final class DeferredJob: ReactorHandler, @unchecked Sendable {
    // `@unchecked`: immutable; the object is handed to the loop whole.
    private unowned let reactor: Reactor
    private let body: @Sendable () -> Void

    init(reactor: Reactor, _ body: @escaping @Sendable () -> Void) {
        self.reactor = reactor
        self.body = body
    }

    /// Arrived through the inbox: wait for the deferred phase.
    override func reactorRunSubmitted() { self.reactor.enqueueDeferred(self) }

    override func reactorRunDeferred() { self.body() }
}

/// A closure run by a timer.
final class ClosureTimer: ReactorHandler, @unchecked Sendable {
    private let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
    override func reactorTimerFired(tag: UInt64) { self.body() }
}
