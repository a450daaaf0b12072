import CReactor
import Foundation
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMWire

/// The loop as a host service uses it: its own fds, timers and closures beside gRPC traffic, another loop driving
/// ours, a group of loops, and every kind of misuse answered with an error or a documented no-op.
@Suite("Embedding the reactor", .serialized)
struct EmbeddingTests {
    @Test("10,000 user timers and 1,000 user fds interleaved with gRPC calls on one loop")
    func userWorkBesideCalls() async throws {
        raiseFileLimit()
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let loop = fixture.loop
        let channel = try fixture.channel()
        let timersFired = Atomic<Int>(0)
        let timersTwice = Atomic<Int>(0)
        let fdEvents = Atomic<Int>(0)
        // Timers from another thread, deadlines spread over 200 ms.
        let timerFlags = Flags(10_000)
        for index in 0..<10_000 {
            loop.scheduleTimer(after: .microseconds(index * 20)) {
                if timerFlags.set(index) { timersTwice.add(1, ordering: .relaxed) }
                timersFired.add(1, ordering: .relaxed)
            }
        }
        // 1,000 pipes, their read ends registered on the loop's thread; each is written once and read by its handler.
        var pipes: [(read: Int32, write: Int32)] = []
        for _ in 0..<1000 {
            var ends: [Int32] = [0, 0]
            #expect(pipe(&ends) == 0)
            _ = fcntl(ends[0], F_SETFL, O_NONBLOCK)
            pipes.append((ends[0], ends[1]))
        }
        let fds = pipes.map(\.read)
        defer { for end in pipes { close(end.read); close(end.write) } }
        let registrations = PThreadLock<[LoopRegistration]>([])
        let registered = Atomic<Bool>(false)
        loop.execute {
            for fd in fds {
                let registration = try? loop.register(fd: fd, interest: .readable) { events in
                    var value: UInt8 = 0
                    if events.contains(.readable), read(fd, &value, 1) == 1 { fdEvents.add(1, ordering: .relaxed) }
                }
                if let registration { registrations.withLock { $0.append(registration) } }
            }
            registered.store(true, ordering: .releasing)
        }
        #expect(await eventually(timeout: 5) { registered.load(ordering: .acquiring) })
        #expect(registrations.withLock { $0.count } == 1000)
        // Calls and fd signals at the same time.
        let ledger = CompletionLedger()
        let ok = Atomic<Int>(0)
        for id in 0..<2000 {
            channel.unary(path: "/echo.Echo/Get", request: [UInt8(id & 0xFF)]) { response in
                ledger.record(id)
                if response.status.isOK && response.message == [UInt8(id & 0xFF)] { ok.add(1, ordering: .relaxed) }
            }
            if id % 2 == 0 {
                var one: UInt8 = 1
                _ = write(pipes[id / 2].write, &one, 1)
            }
        }
        #expect(await eventually(timeout: 20) {
            ledger.completed == 2000 && timersFired.load(ordering: .relaxed) == 10_000
                && fdEvents.load(ordering: .relaxed) == 1000
        })
        #expect(ok.load(ordering: .relaxed) == 2000)
        #expect(ledger.duplicates == 0 && timersTwice.load(ordering: .relaxed) == 0)
        let removed = Atomic<Int>(0)
        loop.execute {
            for registration in registrations.withLock({ $0 }) where registration.deregister() { removed.add(1, ordering: .relaxed) }
        }
        #expect(await eventually(timeout: 5) { removed.load(ordering: .relaxed) == 1000 })
        #expect(fds.allSatisfy { fcntl($0, F_GETFD) >= 0 }, "the loop never closes a user's fd")
    }

    @Test("timers cancelled from other threads while they come due: each fires exactly once or not at all")
    func cancellationRaces() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let count = 10_000
        let fired = Flags(count)
        let timers = PThreadLock<[LoopTimer?]>(Array(repeating: nil, count: count))
        let scheduler = Thread {
            for index in 0..<count {
                let timer = loop.scheduleTimer(after: .microseconds((index % 100) * 10)) {
                    _ = fired.set(index)
                }
                timers.withLock { $0[index] = timer }
            }
        }
        scheduler.start()
        let cancelled = Flags(count)
        let cancellers = (0..<2).map { part in
            Thread {
                var index = part
                while index < count {
                    if let timer = timers.withLock({ $0[index] }) {
                        if timer.cancel() { _ = cancelled.set(index) }
                        index += 2
                    } else {
                        usleep(10)
                    }
                }
            }
        }
        for canceller in cancellers { canceller.start() }
        #expect(await eventually(timeout: 10) { (0..<count).allSatisfy { fired[$0] || cancelled[$0] } })
        try await Task.sleep(for: .milliseconds(50))
        let both = (0..<count).filter { fired[$0] && cancelled[$0] }
        #expect(both.isEmpty, "a cancelled timer fired: \(both.prefix(5))")
        let firedCount = (0..<count).filter { fired[$0] }.count
        #expect(firedCount > 0 && firedCount < count, "the race went both ways: \(firedCount) fired")
        #expect(timers.withLock { $0.allSatisfy { $0?.cancel() == false } }, "cancelling again is a no-op")
    }

    @Test("a foreign loop drives ours through its pollable descriptor: calls complete, timers fire")
    func foreignLoopDrivesOurs() throws {
        let server = try EchoServer()  // on a loop of its own
        defer { server.close() }
        let loop = try ReactorLoop()
        let done = Atomic<Bool>(false)
        let results = PThreadLock<[CallStatus]>([])
        let host = Thread {
            // The host's own epoll, watching our descriptor.
            let hostFD = epoll_create1(Int32(EPOLL_CLOEXEC))
            var event = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: 1))
            _ = epoll_ctl(hostFD, EPOLL_CTL_ADD, loop.pollableDescriptor, &event)
            var fired = [epoll_event](repeating: epoll_event(), count: 8)
            // The first turn makes this thread the loop's.
            _ = try? loop.runOnce(maxWait: .zero)
            guard let channel = try? GRPCChannel(target: server.address, eventLoop: loop) else { return }
            for index in 0..<100 {
                channel.unary(path: "/echo.Echo/Get", request: [UInt8(index)]) { response in
                    results.withLock { $0.append(response.status) }
                }
            }
            loop.scheduleTimer(after: .milliseconds(20)) { results.withLock { $0.append(CallStatus(code: .ok, message: "timer")) } }
            while results.withLock({ $0.count }) < 101 {
                let timeout = loop.nextTimeout.map { Int32(min($0.nanoseconds / 1_000_000, 100)) } ?? 100
                _ = epoll_wait(hostFD, &fired, 8, timeout)
                _ = try? loop.runOnce(maxWait: .zero)
            }
            loop.shutdown()  // on the driving thread: finishes at once
            close(hostFD)
            done.store(true, ordering: .releasing)
        }
        host.start()
        #expect(waitFor(seconds: 10) { done.load(ordering: .acquiring) })
        let all = results.withLock { $0 }
        #expect(all.count == 101)
        #expect(all.allSatisfy { $0.isOK })
        #expect(all.contains { $0.message == "timer" })
    }

    @Test("a driven loop: runOnce inside a turn is refused; shutdown between turns ends everything without another turn")
    func drivenLoopReentryAndShutdown() throws {
        let silent = try BadPeer(.silent)  // accepts, never answers: the call waits until something ends it
        defer { silent.stop() }
        let loop = try ReactorLoop()
        let reentry = PThreadLock<String?>(nil)
        let ended = PThreadLock<CallStatus?>(nil)
        let done = Atomic<Bool>(false)
        let host = Thread {
            _ = try? loop.runOnce(maxWait: .zero)
            guard let channel = try? GRPCChannel(target: "127.0.0.1:\(silent.port)", eventLoop: loop) else { return }
            channel.unary(path: "/echo.Echo/Get", request: [1]) { response in ended.withLock { $0 = response.status } }
            loop.scheduleTimer(after: .milliseconds(10)) {
                do {
                    _ = try loop.runOnce(maxWait: .zero)
                    reentry.withLock { $0 = "ran" }
                } catch {
                    reentry.withLock { $0 = "\(error)" }
                }
            }
            while reentry.withLock({ $0 }) == nil { _ = try? loop.runOnce(maxWait: .milliseconds(5)) }
            // Between turns, on the driving thread: the host stops polling after this.
            loop.shutdown()
            done.store(true, ordering: .releasing)
        }
        host.start()
        #expect(waitFor(seconds: 10) { done.load(ordering: .acquiring) })
        let refusal = reentry.withLock { $0 } ?? ""
        #expect(refusal.contains("inside a turn"), "\(refusal)")
        let status = ended.withLock { $0 }
        #expect(status?.code == .unavailable, "the waiting call ended with the shutdown: \(String(describing: status))")
    }

    @Test("a driven loop shut down between turns: a completion the shutdown runs may shut the loop down again")
    func drivenShutdownFromACompletionOfTheShutdown() throws {
        let silent = try BadPeer(.silent)  // accepts, never answers: only the shutdown ends the call
        defer { silent.stop() }
        let loop = try ReactorLoop()
        let endings = PThreadLock<[CallStatus]>([])
        let done = Atomic<Bool>(false)
        let host = Thread {
            _ = try? loop.runOnce(maxWait: .zero)
            guard let channel = try? GRPCChannel(target: "127.0.0.1:\(silent.port)", eventLoop: loop) else { return }
            channel.unary(path: "/echo.Echo/Get", request: [1]) { response in
                endings.withLock { $0.append(response.status) }
                // Inside the shutdown's own deferred phase, on the driving thread: legal, and a no-op by now.
                loop.shutdown()
            }
            // A few turns (the call connects, or waits to): wherever it waits, the shutdown ends it.
            for _ in 0..<20 { _ = try? loop.runOnce(maxWait: .milliseconds(2)) }
            loop.shutdown()
            done.store(true, ordering: .releasing)
        }
        host.start()
        #expect(waitFor(seconds: 10) { done.load(ordering: .acquiring) })
        let all = endings.withLock { $0 }
        #expect(all.count == 1, "the call ended exactly once: \(all)")
        #expect(all.first?.code == .unavailable, "\(all)")
    }

    @Test("a group of 2 loops: connections on both, every call completes once, a completion's next call stays on its loop")
    func groupOfTwo() async throws {
        let server = try EchoServer()
        defer { server.close() }
        let group = try ReactorGroup(loopCount: 2)
        defer { group.shutdown() }
        let manager = try ConnectionManager(configuration: .defaults, group: group)
        // Subscribe before the channel exists: each loop's bus learns of the handler by a hop to that loop, and a
        // connection made first would be missed.
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: server.address)
        let ledger = CompletionLedger()
        let stayed = Atomic<Int>(0)
        let moved = Atomic<Int>(0)
        for id in 0..<1000 {
            channel.unary(path: "/echo.Echo/Get", request: [1]) { first in
                ledger.record(id)
                // From the completion: the next call starts, and completes, on this same loop.
                let here = group.current
                channel.unary(path: "/echo.Echo/Get", request: [2]) { second in
                    ledger.record(100_000 + id)
                    if let here, here.inEventLoop, second.status.isOK { stayed.add(1, ordering: .relaxed) } else { moved.add(1, ordering: .relaxed) }
                }
                _ = first
            }
        }
        #expect(await eventually(timeout: 20) { ledger.completed == 2000 })
        #expect(ledger.duplicates == 0)
        #expect(stayed.load(ordering: .relaxed) == 1000 && moved.load(ordering: .relaxed) == 0)
        let connections = Set(recorder.all.compactMap { event -> Int? in
            if case .connectAttemptSucceeded(_, let id, _) = event { return id }
            return nil
        })
        #expect(connections.count == 2, "one connection per loop: \(connections)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a driven loop let go of without shutdown() leaves its thread free to wait for other loops")
    func droppedDrivenLoop() async throws {
        let other = try ReactorLoop()
        other.start()
        let outcome = PThreadLock<(servedAfterDrop: Bool, otherFinished: Bool)?>(nil)
        // A thread of its own: the count is per thread, and a test's task may move between the pool's threads.
        let thread = Thread {
            do {
                let driven = try ReactorLoop()
                _ = try driven.runOnce(maxWait: .zero)
            } catch {
                Issue.record("\(error)")
            }
            let served = Reactor.servesALoop
            // From a thread that serves no loop, shutdown() waits until the loop has finished.
            other.shutdown()
            outcome.withLock { $0 = (served, other.reactor.pollableDescriptor == -1) }
        }
        thread.start()
        #expect(await eventually(timeout: 10) { outcome.withLock { $0 } != nil })
        #expect(outcome.withLock { $0 }?.servedAfterDrop == false)
        #expect(outcome.withLock { $0 }?.otherFinished == true, "shutdown() waited for the other loop to finish")
    }

    @Test("pollableDescriptor is read from another thread throughout a shutdown, and reads -1 once the loop has finished")
    func pollableDescriptorDuringShutdown() async throws {
        let loop = try ReactorLoop()
        loop.start()
        let reads = Atomic<Int>(0)
        let reader = Thread {
            // Until the loop has finished: -1.
            while loop.pollableDescriptor >= 0 { reads.add(1, ordering: .relaxed) }
            reads.add(1, ordering: .relaxed)
        }
        reader.start()
        #expect(await eventually(timeout: 10) { reads.load(ordering: .relaxed) > 100 })
        loop.shutdown()
        #expect(await eventually(timeout: 10) { loop.pollableDescriptor == -1 })
    }

    @Test("a driven loop let go of without shutdown() releases its fd watchers, and what their closures hold")
    func droppedDrivenLoopReleasesWatchers() async throws {
        final class Tracked: Sendable {}
        let released = PThreadLock<Bool?>(nil)
        // A thread of its own: it drives the loop, and a driven loop's thread is its thread for good.
        let thread = Thread {
            var fds: [Int32] = [0, 0]
            guard pipe(&fds) == 0 else {
                released.withLock { $0 = false }
                return
            }
            defer {
                close(fds[0])
                close(fds[1])
            }
            weak var weakTracked: Tracked?
            do {
                let driven = try ReactorLoop()
                _ = try driven.runOnce(maxWait: .zero)
                let tracked = Tracked()
                weakTracked = tracked
                _ = try driven.register(fd: fds[0], interest: .readable) { _ in _ = tracked }
            } catch {
                Issue.record("\(error)")
            }
            released.withLock { $0 = weakTracked == nil }
        }
        thread.start()
        #expect(await eventually(timeout: 10) { released.withLock { $0 } != nil })
        #expect(released.withLock { $0 } == true, "the watcher's closure (and what it captured) was released with the loop")
    }

    @Test("a driven loop between turns: work queued on its thread wakes the descriptor the host polls")
    func drivenLoopWakesForWorkBetweenTurns() throws {
        let loop = try ReactorLoop()
        defer { loop.shutdown() }
        _ = try loop.runOnce()  // this thread drives it now
        #expect(loop.nextTimeout == nil, "nothing to do: a host would poll the descriptor without a timeout")
        // One of the host's own callbacks, on this thread between turns, arms a timer (or starts a call).
        let fired = Atomic<Bool>(false)
        loop.scheduleTimer(after: .milliseconds(20)) { fired.store(true, ordering: .releasing) }
        var descriptor = pollfd(fd: loop.pollableDescriptor, events: Int16(POLLIN), revents: 0)
        #expect(poll(&descriptor, 1, 2000) == 1, "the host's poll wakes to take the new deadline")
        for _ in 0..<200 where !fired.load(ordering: .acquiring) {
            _ = try loop.runOnce(maxWait: loop.nextTimeout ?? .milliseconds(10))
        }
        let didFire = fired.load(ordering: .acquiring)
        #expect(didFire)
    }

    @Test("a timer or registration outliving its loop: cancel() says false, the rest refuses, nothing crashes")
    func handlesOutliveTheirLoop() async throws {
        let timer: LoopTimer
        let registration = PThreadLock<LoopRegistration?>(nil)
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        let fd = ends[0]
        do {
            let loop = try ReactorLoop()
            loop.start()
            timer = loop.scheduleTimer(after: .seconds(60)) {}
            let registered = Atomic<Bool>(false)
            loop.execute {
                registration.withLock { $0 = try? loop.register(fd: fd, interest: .readable) { _ in } }
                registered.store(true, ordering: .releasing)
            }
            #expect(await eventually { registered.load(ordering: .acquiring) })
            loop.shutdown()
            #expect(!timer.cancel(), "the loop stopped first: the timer will never fire, so nothing was cancelled")
        }
        // The loop is gone (or going): the handles still answer.
        #expect(!timer.cancel())
        #expect(!timer.hasFired)
        #expect(registration.withLock { $0 }?.deregister() == false)
        #expect(throws: ReactorError.self) { try registration.withLock { $0 }?.setInterest(.writable) }
    }

    @Test("a cancelled timer and a deregistered fd let go of what their closures captured")
    func closuresAreLetGo() async throws {
        final class Captured: Sendable {}
        final class Weak: @unchecked Sendable {
            // `@unchecked`: set before the closures run, read after; weak loads are atomic.
            weak var timerCapture: Captured?
            weak var watcherCapture: Captured?
        }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let weak = Weak()
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        let fd = ends[0]
        let timer: LoopTimer = {
            let captured = Captured()
            weak.timerCapture = captured
            return loop.scheduleTimer(after: .seconds(60)) { _ = captured }
        }()
        #expect(timer.cancel())
        let deregistered = Atomic<Bool>(false)
        let registration = PThreadLock<LoopRegistration?>(nil)
        loop.execute {
            let captured = Captured()
            weak.watcherCapture = captured
            registration.withLock { $0 = try? loop.register(fd: fd, interest: .readable) { _ in _ = captured } }
            deregistered.store(registration.withLock { $0 }?.deregister() == true, ordering: .releasing)
        }
        #expect(await eventually { deregistered.load(ordering: .acquiring) })
        // The handles are still held here; what their closures captured is not.
        #expect(await eventually { weak.timerCapture == nil })
        #expect(weak.watcherCapture == nil)
        #expect(registration.withLock { $0 } != nil)
        _ = timer
    }

    @Test("a registration another handler paused, or switched to writing, earlier in the same turn gets only what it still asks for")
    func interestChangedEarlierInTheTurn() throws {
        // Two sockets with a byte to read each: both are in the turn's batch of events, and whichever handler runs
        // first changes the other's interest to `next` before the other's turn in the batch comes.
        func firstTurn(switchingTheOtherTo next: LoopInterest) throws -> [(name: String, events: LoopEvents)] {
            let loop = try ReactorLoop()
            defer { loop.shutdown() }
            _ = try loop.runOnce(maxWait: .zero)  // this thread drives the loop
            let (first, firstPeer) = try #require(streamSocketPair())
            let (second, secondPeer) = try #require(streamSocketPair())
            defer { for fd in [first, firstPeer, second, secondPeer] { close(fd) } }
            var byte: UInt8 = 1
            #expect(write(firstPeer, &byte, 1) == 1 && write(secondPeer, &byte, 1) == 1)
            let seen = PThreadLock<[(name: String, events: LoopEvents)]>([])
            let registrations = PThreadLock<[String: LoopRegistration]>([:])
            for (name, fd, other) in [("first", first, "second"), ("second", second, "first")] {
                let registration = try loop.register(fd: fd, interest: .readable) { events in
                    seen.withLock { $0.append((name, events)) }
                    _ = try? registrations.withLock { $0[other] }?.setInterest(next)
                }
                registrations.withLock { $0[name] = registration }
            }
            _ = try loop.runOnce(maxWait: .milliseconds(1000))
            let turns = [seen.withLock { $0 }]
            _ = try loop.runOnce(maxWait: .milliseconds(1000))
            for registration in registrations.withLock({ Array($0.values) }) { registration.deregister() }
            return turns[0] + [("next turn", [])] + seen.withLock { Array($0.dropFirst(turns[0].count)) }
        }
        // Paused: out of epoll, so not called at all (it was, with the readable event epoll had already fetched).
        let paused = try firstTurn(switchingTheOtherTo: [])
        let called = paused.map(\.name).filter { $0 != "next turn" }
        #expect(called.count == 2 && Set(called).count == 1, "only the handler that ran first, in each turn: \(paused)")
        // Switched to writing: never called with the readable event it no longer asks for; writable from the next turn.
        let switched = try firstTurn(switchingTheOtherTo: .writable)
        let first = try #require(switched.first?.name)
        let other = first == "first" ? "second" : "first"
        #expect(switched.filter { $0.name == other }.allSatisfy { $0.events == .writable }, "\(switched)")
        #expect(switched.contains { $0.name == other }, "\(switched)")
        #expect(switched.firstIndex { $0.name == other }! > switched.firstIndex { $0.name == "next turn" }!)
    }

    @Test("a paused registration (no interest) is not woken by its peer's reset: the loop sleeps")
    func pausedRegistrationSleeps() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let (watched, peer) = try #require(streamSocketPair())
        defer { close(watched) }
        let calls = Atomic<Int>(0)
        let registration = PThreadLock<LoopRegistration?>(nil)
        let ready = Atomic<Bool>(false)
        loop.execute {
            registration.withLock {
                $0 = try? loop.register(fd: watched, interest: .readable) { _ in calls.add(1, ordering: .relaxed) }
            }
            try? registration.withLock { $0 }?.setInterest([])
            ready.store(true, ordering: .releasing)
        }
        #expect(await eventually { ready.load(ordering: .acquiring) })
        close(peer)  // the peer goes: EPOLLHUP, which epoll reports whatever the mask
        // A turn of the loop after the hang-up (a closure submitted now runs after it).
        for _ in 0..<3 {
            let turned = Atomic<Bool>(false)
            loop.execute { turned.store(true, ordering: .releasing) }
            #expect(await eventually { turned.load(ordering: .acquiring) })
        }
        let callsWhilePaused = calls.load(ordering: .relaxed)
        #expect(callsWhilePaused == 0, "a paused registration is not called, let alone every turn")
        // Resumed, it learns of the hang-up at once.
        loop.execute { try? registration.withLock { $0 }?.setInterest(.readable) }
        #expect(await eventually { calls.load(ordering: .relaxed) > 0 })
        loop.execute { _ = registration.withLock { $0 }?.deregister() }
    }

    @Test("misuse gets a clear error or a documented no-op, never a crash")
    func misuse() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // Loop-only calls from another thread.
        #expect(throws: ReactorError.self) { try loop.register(fd: 0, interest: .readable) { _ in } }
        #expect(throws: ReactorError.self) { try loop.runOnce() }
        loop.start()  // twice: nothing happens
        let outcomes = PThreadLock<[String]>([])
        let done = Atomic<Bool>(false)
        loop.execute {
            // A closed fd.
            var pair: [Int32] = [0, 0]
            _ = pipe(&pair)
            close(pair[0])
            close(pair[1])
            do {
                _ = try loop.register(fd: pair[0], interest: .readable) { _ in }
                outcomes.withLock { $0.append("closed fd accepted") }
            } catch {
                outcomes.withLock { $0.append((error as? ReactorError)?.errno == EBADF ? "EBADF" : "other \(error)") }
            }
            // Deregistering twice.
            var ends: [Int32] = [0, 0]
            _ = pipe(&ends)
            let fd = ends[0]
            defer { close(ends[1]) }
            if let registration = try? loop.register(fd: fd, interest: .readable, { _ in }) {
                let first = registration.deregister()
                let second = registration.deregister()
                outcomes.withLock { $0.append("deregister \(first) \(second)") }
                do {
                    try registration.setInterest(.writable)
                    outcomes.withLock { $0.append("setInterest after deregister accepted") }
                } catch {
                    outcomes.withLock { $0.append("setInterest \((error as? ReactorError)?.errno == ENOENT ? "ENOENT" : "other")") }
                }
            }
            close(fd)
            done.store(true, ordering: .releasing)
        }
        #expect(await eventually(timeout: 5) { done.load(ordering: .acquiring) })
        #expect(outcomes.withLock { $0 } == ["EBADF", "deregister true false", "setInterest ENOENT"])
        // Cancelling a timer that already fired.
        let fired = Atomic<Bool>(false)
        let timer = loop.scheduleTimer(after: .zero) { fired.store(true, ordering: .releasing) }
        #expect(await eventually(timeout: 5) { fired.load(ordering: .acquiring) })
        #expect(timer.hasFired)
        #expect(!timer.cancel())
        // Work after the loop has stopped is refused, not lost silently.
        loop.shutdown()
        #expect(!loop.execute {})
        let late = loop.scheduleTimer(after: .zero) {}
        #expect(!late.cancel(), "a timer on a stopped loop never fires, so there is nothing to cancel")
        #expect(loop.pollableDescriptor == -1)
        loop.run()  // after the end: nothing happens
    }

    @Test("runOnce with a wait near Duration's end waits for the next event instead of trapping")
    func runOnceWithTheLongestWait() throws {
        let loop = try ReactorLoop()
        defer { loop.shutdown() }
        let fired = Atomic<Bool>(false)
        _ = loop.scheduleTimer(after: .milliseconds(1)) { fired.store(true, ordering: .releasing) }
        var turns = 0
        while !fired.load(ordering: .acquiring) && turns < 100 {
            _ = try loop.runOnce(maxWait: .seconds(Int64.max))
            turns += 1
        }
        let didFire = fired.load(ordering: .acquiring)
        #expect(didFire)
    }
}

/// Raises the soft limit on open files to the hard one (tests that open a thousand fds).
func raiseFileLimit() {
    var limit = rlimit()
    if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 {
        limit.rlim_cur = limit.rlim_max
        setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    }
}

/// A thousand flags many threads set (a lock: these are tests, not a hot path).
final class Flags: Sendable {
    private let values: PThreadLock<[Bool]>

    init(_ count: Int) { self.values = PThreadLock(Array(repeating: false, count: count)) }

    /// Sets flag `index`; true when it was set already.
    func set(_ index: Int) -> Bool {
        self.values.withLock { values in
            defer { values[index] = true }
            return values[index]
        }
    }

    subscript(index: Int) -> Bool { self.values.withLock { $0[index] } }
}
