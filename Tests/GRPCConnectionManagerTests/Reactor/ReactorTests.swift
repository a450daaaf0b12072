import Foundation
import Synchronization
import Testing

@_spi(Reactor) @testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// Runs `body` on the reactor thread and returns its result.
func onReactor<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let accepted = reactor.execute { continuation.resume(returning: body()) }
        precondition(accepted, "reactor stopped")
    }
}

/// State that only the reactor thread touches.
final class ReactorBox<Value>: @unchecked Sendable {
    // `@unchecked`: read and written on the reactor thread only (tests read it through onReactor).
    var value: Value
    init(_ value: Value) { self.value = value }
}

@Suite("Reactor")
struct ReactorTests {
    @Test("timers fire in deadline order, ties in insertion order, and cancelled ones never fire")
    func timersFireInOrderAndCancel() async throws {
        try await Self.checkTimers(count: 2_000, cancelEvery: 3) { index in UInt64((index * 7919) % 97) * 100_000 }
    }

    @Test("timers armed mostly in deadline order (as call deadlines are), some a few places back, some far back: all fire in order, cancelled ones never")
    func timersArmedMostlyInOrder() async throws {
        try await Self.checkTimers(count: 3_000, cancelEvery: 7) { index in
            let step: Int
            switch index % 10 {
            case 9: step = index / 2  // far earlier than the last few: behind hundreds
            case 4: step = index - 3  // due with the one three before: goes behind two
            case 2, 7: step = index - 1  // due with the one before: a tie, fired after it
            default: step = index
            }
            return UInt64(step) * 10_000
        }
    }

    @Test("a timer cancelled by another's callback in the same batch never fires; timers left armed at stop let go of their handlers")
    func timerBatchCancelAndStop() async throws {
        let reactor = try Reactor()
        reactor.start()
        let fired = ReactorBox<[Int]>([])
        let cancelled = ReactorBox<Bool>(false)
        final class Held: ReactorHandler, @unchecked Sendable {}
        final class Watched: @unchecked Sendable {
            // Set on the loop, read after it stopped.
            weak var listed: Held?
            weak var heaped: Held?
        }
        let watched = Watched()
        await onReactor(reactor) {
            let due = Reactor.clock() + 2_000_000
            let second = ReactorBox<Reactor.TimerID>(0)
            _ = reactor.scheduleTimer(at: due, handler: ClosureTimer {
                fired.value.append(1)
                cancelled.value = reactor.cancelTimer(second.value)
            })
            second.value = reactor.scheduleTimer(at: due, handler: ClosureTimer { fired.value.append(2) })
            _ = reactor.scheduleTimer(at: due + 1_000_000, handler: ClosureTimer { fired.value.append(3) })
            // Far ahead, still armed when the loop stops: one in order (the list), one before several (the heap).
            let far = Reactor.clock() + 3_600_000_000_000
            for _ in 0..<6 { _ = reactor.scheduleTimer(at: far + 1, handler: ClosureTimer {}) }
            let inOrder = Held()
            let early = Held()
            watched.listed = inOrder
            watched.heaped = early
            _ = reactor.scheduleTimer(at: far + 2, handler: inOrder)
            _ = reactor.scheduleTimer(at: far, handler: early)
        }
        while await onReactor(reactor, { fired.value.count }) < 2 { try await Task.sleep(nanoseconds: 2_000_000) }
        #expect(await onReactor(reactor) { fired.value } == [1, 3])
        #expect(await onReactor(reactor) { cancelled.value }, "the second was still pending in the batch: cancelled")
        reactor.stopAndWait()
        #expect(watched.listed == nil && watched.heaped == nil, "stopping released the handlers of timers still armed")
    }

    /// Arms `count` timers on a running reactor, timer `index` due `offset(index)` nanoseconds after a common start
    /// 5 ms ahead; cancels every `cancelEvery`th (the first included); then checks that the others all fire, each
    /// once, in deadline order (ties in the order they were armed), and that none is left.
    private static func checkTimers(count: Int, cancelEvery: Int, offset: @escaping @Sendable (Int) -> UInt64) async throws {
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        let fired = ReactorBox<[(UInt64, Int)]>([])
        let expected = count - (count + cancelEvery - 1) / cancelEvery
        await onReactor(reactor) {
            let base = Reactor.clock() + 5_000_000
            var ids: [Reactor.TimerID] = []
            for index in 0..<count {
                let deadline = base + offset(index)
                ids.append(reactor.scheduleTimer(at: deadline, handler: ClosureTimer { fired.value.append((deadline, index)) }))
            }
            #expect(reactor.timerCount == count)
            for index in stride(from: 0, to: count, by: cancelEvery) { #expect(reactor.cancelTimer(ids[index])) }
            #expect(!reactor.cancelTimer(ids[0]), "a cancelled timer cannot be cancelled twice")
            #expect(reactor.timerCount == expected)
        }
        while await onReactor(reactor, { fired.value.count }) < expected {
            try await Task.sleep(nanoseconds: 5_000_000)
        }
        let result = await onReactor(reactor) { fired.value }
        #expect(result.count == expected)
        #expect(result.allSatisfy { $0.1 % cancelEvery != 0 })
        for (a, b) in zip(result, result.dropFirst()) {
            #expect(a.0 < b.0 || (a.0 == b.0 && a.1 < b.1), "out of order: \(a) then \(b)")
        }
        #expect(await onReactor(reactor) { reactor.timerCount } == 0)
    }

    @Test("100,000 timers: add, cancel half, the other half fire")
    func hundredThousandTimers() async throws {
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        let fired = ReactorBox<Int>(0)
        let count = 100_000
        await onReactor(reactor) {
            let base = Reactor.clock() + 20_000_000
            var ids: [Reactor.TimerID] = []
            ids.reserveCapacity(count)
            let handler = ClosureTimer { fired.value += 1 }
            for index in 0..<count {
                ids.append(reactor.scheduleTimer(at: base + UInt64(index % 1000) * 10_000, handler: handler))
            }
            #expect(reactor.timerCount == count)
            for index in stride(from: 1, to: count, by: 2) { reactor.cancelTimer(ids[index]) }
            #expect(reactor.timerCount == count / 2)
        }
        while await onReactor(reactor, { fired.value }) < count / 2 {
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        #expect(await onReactor(reactor) { fired.value } == count / 2)
        #expect(await onReactor(reactor) { reactor.timerCount } == 0)
    }

    @Test("2 threads x 100,000 submissions: none lost, none run twice, each thread's in order")
    func crossThreadSubmission() async throws {
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        let perThread = 100_000
        let seen = ReactorBox<[[Int]]>([[], []])
        let done = Atomic<Int>(0)
        for thread in 0..<2 {
            Thread.detachNewThread {
                for index in 0..<perThread {
                    reactor.execute { seen.value[thread].append(index) }
                }
                done.add(1, ordering: .releasing)
            }
        }
        while done.load(ordering: .acquiring) < 2 { try await Task.sleep(nanoseconds: 5_000_000) }
        let result = await onReactor(reactor) { seen.value }
        for thread in 0..<2 {
            #expect(result[thread].count == perThread)
            #expect(result[thread] == Array(0..<perThread))
        }
    }

    @Test("4 threads submit in small bursts, each waiting for its burst to run: the idle loop wakes for every one")
    func noLostWakeUps() async throws {
        // Only a submission that finds the inbox empty wakes the loop, and outside the inbox lock. Each thread waits
        // for its burst to run before the next, so the loop sleeps in between with nothing else to wake it: a
        // wake-up lost would leave a burst (and every later submission) in the inbox, and the wait would time out.
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        let threads = 4
        let rounds = 3_000
        final class Ran: Sendable { let count = Atomic<Int>(0) }
        let ran = (0..<threads).map { _ in Ran() }
        let stuck = Atomic<Int>(0)
        let finished = Atomic<Int>(0)
        for thread in 0..<threads {
            Thread.detachNewThread {
                var expected = 0
                rounds: for round in 0..<rounds {
                    let burst = 1 + (round + thread) % 3
                    for _ in 0..<burst { reactor.execute { ran[thread].count.add(1, ordering: .releasing) } }
                    expected += burst
                    let deadline = ContinuousClock.now + .seconds(10)
                    while ran[thread].count.load(ordering: .acquiring) < expected {
                        if ContinuousClock.now > deadline {
                            stuck.add(1, ordering: .relaxed)
                            break rounds
                        }
                        if round % 2 == 0 { sched_yield() } else { usleep(20) }
                    }
                }
                finished.add(1, ordering: .releasing)
            }
        }
        while finished.load(ordering: .acquiring) < threads { try await Task.sleep(nanoseconds: 5_000_000) }
        #expect(stuck.load(ordering: .relaxed) == 0, "bursts that waited 10 s for a wake-up")
        for thread in 0..<threads {
            #expect(ran[thread].count.load(ordering: .acquiring) == (0..<rounds).reduce(0) { $0 + 1 + ($1 + thread) % 3 })
        }
    }

    @Test("a readable fd is reported to its handler")
    func fdReadiness() async throws {
        final class Reader: ReactorHandler, @unchecked Sendable {
            var events: [UInt32] = []
            var bytes: [UInt8] = []
            let fd: Int32
            init(fd: Int32) { self.fd = fd }
            override func reactorFDReady(_ events: UInt32) {
                self.events.append(events)
                var buffer = [UInt8](repeating: 0, count: 16)
                let n = buffer.withUnsafeMutableBytes { read(self.fd, $0.baseAddress, 16) }
                if n > 0 { self.bytes.append(contentsOf: buffer[0..<n]) }
            }
        }
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        defer {
            close(fds[0])
            close(fds[1])
        }
        let reader = Reader(fd: fds[0])
        let registration = await onReactor(reactor) {
            try! reactor.register(fd: reader.fd, interest: Reactor.Events.read, handler: reader)
        }
        #expect(await onReactor(reactor) { reader.events.isEmpty })
        let payload: [UInt8] = [1, 2, 3]
        #expect(payload.withUnsafeBytes { write(fds[1], $0.baseAddress, 3) } == 3)
        while await onReactor(reactor, { reader.bytes.count }) < 3 { try await Task.sleep(nanoseconds: 1_000_000) }
        #expect(await onReactor(reactor) { reader.bytes } == payload)
        #expect(await onReactor(reactor) { reader.events.allSatisfy { $0 & Reactor.Events.read != 0 } })
        await onReactor(reactor) { reactor.deregister(registration, handler: reader) }
        #expect(await onReactor(reactor) { reactor.registrationCount } == 0)
    }

    final class Counter: ReactorHandler, @unchecked Sendable {
        // `@unchecked`: touched on the reactor thread only.
        var events = 0
        let onDeinit: (@Sendable () -> Void)?
        init(onDeinit: (@Sendable () -> Void)? = nil) { self.onDeinit = onDeinit }
        override func reactorFDReady(_ events: UInt32) { self.events += 1 }
        deinit { self.onDeinit?() }
    }

    @Test("a writer whose peer shut down its side is not woken every turn; an fd closed first still gives its handler back")
    func halfClosedWriterAndLateDeregister() async throws {
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        _ = fcntl(pair[0], F_SETFL, O_NONBLOCK)
        defer { close(pair[1]) }
        // Fill pair[0]'s send buffer so that it is not writable, then the peer stops sending.
        let chunk = [UInt8](repeating: 7, count: 65536)
        while chunk.withUnsafeBytes({ write(pair[0], $0.baseAddress, $0.count) }) > 0 {}
        shutdown(pair[1], Int32(SHUT_WR))
        let released = Atomic<Bool>(false)
        let writer = Counter(onDeinit: { released.store(true, ordering: .releasing) })
        let fd = pair[0]
        let registration = await onReactor(reactor) {
            try! reactor.register(fd: fd, interest: Reactor.Events.write, handler: writer)
        }
        try await Task.sleep(for: .milliseconds(100))
        // The half-close (RDHUP) is a reader's news: with write interest only it woke this handler every turn.
        #expect(await onReactor(reactor) { writer.events } == 0)
        // Closed before it is deregistered: the registration still ends, and the handler is released.
        close(fd)
        let deregistered = await onReactor(reactor) { reactor.deregister(registration, handler: writer) }
        #expect(deregistered)
        #expect(await onReactor(reactor) { reactor.registrationCount } == 0)
        _ = consume writer
        let gone = released.load(ordering: .acquiring)
        #expect(gone, "the handler was released")
    }

    @Test("registration ids stay positive when a slot's generation wraps past 2^31")
    func registrationGenerationWraps() async throws {
        let reactor = try Reactor()
        reactor.start()
        defer { reactor.stopAndWait() }
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer {
            close(fds[0])
            close(fds[1])
        }
        let handler = Counter()
        let readEnd = fds[0]
        let ids = await onReactor(reactor) { () -> [Int64] in
            var ids: [Int64] = []
            // The slot the next registration takes (freed slots are reused last in, first out).
            let probe = try! reactor.register(fd: readEnd, interest: Reactor.Events.read, handler: handler)
            reactor.deregister(probe, handler: handler)
            // The last generation a 31-bit id can carry, then the wrap.
            reactor.setRegistrationGenerationForTesting(slot: UInt32(truncatingIfNeeded: probe.id), generation: 0x7fff_ffff)
            for _ in 0..<2 {
                let registration = try! reactor.register(fd: readEnd, interest: Reactor.Events.read, handler: handler)
                ids.append(registration.id)
                reactor.deregister(registration, handler: handler)
            }
            return ids
        }
        #expect(ids.count == 2 && ids.allSatisfy { $0 > 0 }, "\(ids)")
        #expect(ids.last.map { $0 >> 32 } == 1, "generation 0x7fffffff is followed by 1")
    }

    @Test("a loop run on the caller's thread stops when asked")
    func runsOnCallersThread() async throws {
        let reactor = try Reactor()
        let runner = Atomic<UInt>(0)  // pthread_self() of the thread that called run()
        let ranOn = Atomic<UInt>(0)  // ... and of the thread the closure ran on
        let finished = Atomic<Bool>(false)
        Thread.detachNewThread {
            runner.store(UInt(pthread_self()), ordering: .releasing)
            reactor.run()
            finished.store(true, ordering: .releasing)
        }
        while !reactor.execute({
            ranOn.store(UInt(pthread_self()), ordering: .releasing)
        }) {
            try await Task.sleep(nanoseconds: 1_000_000)
        }
        #expect(await eventually(timeout: 5) { ranOn.load(ordering: .acquiring) != 0 })
        let (worker, caller) = (ranOn.load(ordering: .acquiring), runner.load(ordering: .acquiring))
        #expect(worker == caller, "work runs on run()'s caller")
        let returnedEarly = finished.load(ordering: .acquiring)
        #expect(!returnedEarly, "run() returns only when stopped")
        reactor.stopAndWait()
        #expect(await eventually(timeout: 5) { finished.load(ordering: .acquiring) }, "stop makes run() return")
        #expect(!reactor.execute {}, "a stopped reactor refuses work")
    }

    @Test("a stop from another thread while run() starts the loop is never lost: every round's loop finishes")
    func stopRacingTheStart() async throws {
        // stop() found the loop neither running (not yet) nor created (run() had just taken it): it did nothing, and
        // stopAndWait waited for ever. The stop lands at a random moment around the runner's start.
        let rounds = 1_000
        let finished = Atomic<Int>(0)
        Thread.detachNewThread {
            for _ in 0..<rounds {
                guard let reactor = try? Reactor() else { return }
                Thread.detachNewThread { reactor.run() }
                let until = ContinuousClock.now + .microseconds(Int.random(in: 0..<80))
                while ContinuousClock.now < until {}
                reactor.stopAndWait()
                finished.add(1, ordering: .releasing)
            }
        }
        #expect(await eventually(timeout: 60) { finished.load(ordering: .acquiring) == rounds })
    }
}

@Suite("Duration in nanoseconds")
struct DurationNanosecondsTests {
    /// What `nanoseconds` must give, computed the long way (`components`), saturating.
    static func expected(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        let (scaled, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        let (total, overflowAdding) = scaled.addingReportingOverflow(attoseconds / 1_000_000_000)
        if overflowAdding { return seconds < 0 ? .min : .max }
        return total
    }

    @Test("from the attoseconds in one division: as through components, truncated toward zero, saturating")
    func matchesComponents() {
        var durations: [Duration] = [
            .zero, .nanoseconds(1), .nanoseconds(-1), .seconds(30), .milliseconds(-1_500), .nanoseconds(Int64.max),
            .nanoseconds(Int64.min), .seconds(Int64.max), .seconds(Int64.min), .seconds(9_223_372_036),
            .seconds(9_223_372_037), .seconds(-9_223_372_037), Duration(secondsComponent: 0, attosecondsComponent: 999_999_999),
            Duration(secondsComponent: -2, attosecondsComponent: -999_999_999), Duration(secondsComponent: 0, attosecondsComponent: 1),
        ]
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<5_000 {
            durations.append(.nanoseconds(Int64.random(in: .min ... .max, using: &generator)))
            durations.append(.seconds(Double.random(in: -1e12...1e12, using: &generator)))
            durations.append(
                Duration(
                    secondsComponent: Int64.random(in: .min ... .max, using: &generator),
                    attosecondsComponent: Int64.random(in: -999_999_999_999_999_999...999_999_999_999_999_999, using: &generator)))
        }
        for duration in durations {
            #expect(duration.nanoseconds == Self.expected(duration), "\(duration)")
        }
        #expect(Duration.seconds(30).nanoseconds == 30_000_000_000)
        #expect(Duration.milliseconds(-1_500).nanoseconds == -1_500_000_000)
        #expect(Duration(secondsComponent: 0, attosecondsComponent: -999_999_999).nanoseconds == 0)
    }
}
