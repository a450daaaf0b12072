import Foundation
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMWire

/// The callback contract: user code runs on the reactor thread, never inside the library's I/O processing and never
/// inside the call that started it; from a callback the whole API is legal; every call ends exactly once, whatever
/// ends it.
@Suite("Callbacks on the reactor", .serialized)
struct CallbackContractTests {
    static func failFast() -> Configuration {
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        configuration.maxReconnectDelay = .milliseconds(200)
        return configuration
    }

    @Test("a call that fails at once completes on a later turn, never inside unary(); a closed loop of them cannot recurse")
    func failFastClosedLoopDoesNotRecurse() throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // Nothing listens here: every connection attempt is refused, so the channel is in TRANSIENT_FAILURE and
        // every fail-fast call fails at once.
        let channel = try GRPCChannel(target: "127.0.0.1:\(freePort())", configuration: Self.failFast(), eventLoop: loop)
        let probe = LoopProbe(channel: channel, calls: 50_000)
        probe.start()
        #expect(probe.waitUntilDone(seconds: 60), "the closed loop ran to its end")
        #expect(probe.completedInsideUnary.load(ordering: .relaxed) == 0, "no completion ran inside the unary() that started it")
        #expect(probe.completions.load(ordering: .relaxed) == 50_000)
        #expect(probe.nonUnavailable.load(ordering: .relaxed) == 0)
    }

    @Test("hundreds of channels closed from their own call's completion, with other streams in flight")
    func closeFromOwnCompletion() throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let ledger = CompletionLedger()
        let done = Atomic<Int>(0)
        let rounds = 300
        let perChannel = 8
        for round in 0..<rounds {
            let channel = try fixture.channel(Self.failFast())
            for index in 0..<perChannel {
                let id = round * perChannel + index
                channel.unary(path: "/echo.Echo/Get", request: [UInt8(index)]) { response in
                    ledger.record(id)
                    // The first completion closes the channel while its other streams are still in flight, and
                    // starts one more call on it, which must fail and complete too.
                    channel.close()
                    channel.unary(path: "/echo.Echo/Get", request: []) { late in
                        ledger.record(1_000_000 + id)
                        if late.status.code == .unavailable { done.add(1, ordering: .relaxed) }
                    }
                    _ = response
                }
            }
        }
        let expected = rounds * perChannel
        #expect(waitFor(seconds: 30) { ledger.completed == 2 * expected })
        #expect(ledger.duplicates == 0)
        #expect(done.load(ordering: .relaxed) == expected, "every call started on a closed channel ended UNAVAILABLE")
    }

    @Test("hundreds of channels whose last reference is released by their own completion")
    func releaseFromOwnCompletion() throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let ledger = CompletionLedger()
        let rounds = 300
        for round in 0..<rounds {
            let holder = ChannelHolder(try fixture.channel(Self.failFast()))
            for index in 0..<4 {
                holder.channel?.unary(path: "/echo.Echo/Get", request: [1, 2, 3]) { _ in
                    ledger.record(round * 4 + index)
                    holder.release()  // the completion held the last reference: the channel goes here
                }
            }
            holder.dropCallerReference()
        }
        #expect(waitFor(seconds: 30) { ledger.completed == rounds * 4 })
        #expect(ledger.duplicates == 0)
        #expect(waitFor(seconds: 5) { openFDCount() < 64 }, "the released channels closed their sockets")
    }

    @Test("run() on the caller's thread, stop() from a completion, then the channel is released on that thread")
    func runStopFromCompletionThenRelease() throws {
        let server = try EchoServer()
        defer { server.close() }
        let loop = try ReactorLoop()
        let finished = Atomic<Bool>(false)
        let status = PThreadLock<CallStatus?>(nil)
        let thread = Thread {
            var channel: GRPCChannel? = try? GRPCChannel(target: server.address, eventLoop: loop)
            channel?.unary(path: "/echo.Echo/Get", request: [7]) { response in
                status.withLock { $0 = response.status }
                loop.stop()
            }
            loop.run()
            // The loop has stopped; dropping the channel here (the loop's old thread) must not touch it.
            channel = nil
            // A call on a channel whose loop has stopped still completes, on a thread of its own.
            let late = Atomic<Bool>(false)
            if let again = try? GRPCChannel(target: server.address, eventLoop: loop) {
                again.unary(path: "/echo.Echo/Get", request: []) { response in
                    late.store(response.status.code == .unavailable, ordering: .releasing)
                }
            }
            while !late.load(ordering: .acquiring) { usleep(1000) }
            finished.store(true, ordering: .releasing)
        }
        thread.start()
        #expect(waitFor(seconds: 10) { finished.load(ordering: .acquiring) })
        #expect(status.withLock { $0 } == .ok)
    }

    @Test("shutdown() from a completion ends every other call of the loop, each once")
    func shutdownFromCompletion() throws {
        let server = try EchoServer()
        defer { server.close() }
        let loop = try ReactorLoop()
        loop.start()
        let channel = try GRPCChannel(target: server.address, configuration: Self.failFast(), eventLoop: loop)
        let ledger = CompletionLedger()
        let codes = PThreadLock<[StatusCode]>([])
        for id in 0..<10 {
            let sleep: CallMetadata = id == 0 ? [:] : ["x-sleep-ms": "5000"]
            channel.unary(path: "/echo.Echo/Get", request: [1], metadata: sleep) { response in
                ledger.record(id)
                codes.withLock { $0.append(response.status.code) }
                if id == 0 { loop.shutdown() }  // returns at once on the loop's own thread
            }
        }
        #expect(waitFor(seconds: 10) { ledger.completed == 10 })
        #expect(ledger.duplicates == 0)
        let all = codes.withLock { $0 }
        #expect(all.filter { $0 == .ok }.count == 1)
        #expect(all.filter { $0 == .unavailable }.count == 9)
    }

    @Test("two loops, from completions at the same moment, make channels on each other and shut each other down")
    func loopsActOnEachOtherFromCompletions() throws {
        let server = try EchoServer()
        defer { server.close() }
        let loops = [try ReactorLoop(), try ReactorLoop()]
        for loop in loops { loop.start() }
        // Both completions run at once: each waits here until the other has come (or a second has passed).
        let met = PThreadLock<[Int]>([0, 0])
        @Sendable func meet(_ step: Int) {
            met.withLock { $0[step] += 1 }
            let end = now() + 1
            while met.withLock({ $0[step] }) < 2 && now() < end { usleep(100) }
        }
        let finished = PThreadLock<[String]>([])
        var channels: [GRPCChannel] = []
        for (index, loop) in loops.enumerated() {
            let other = loops[1 - index]
            let channel = try GRPCChannel(target: server.address, configuration: Self.failFast(), eventLoop: loop)
            channels.append(channel)
            channel.unary(path: "/echo.Echo/Get", request: [1]) { _ in
                meet(0)
                // Its handlers subscribe on the other loop, busy in its own completion: waiting for it would wait
                // for ever, as the other does for this one.
                let made = try? GRPCChannel(target: server.address, configuration: Self.failFast(), eventLoop: other)
                meet(1)
                other.shutdown()  // likewise: returns at once on a loop's thread
                finished.withLock { $0.append("\(index): \(made != nil)") }
            }
        }
        #expect(waitFor(seconds: 10) { finished.withLock { $0.count } == 2 }, "\(finished.withLock { $0 })")
        #expect(finished.withLock { $0.sorted() } == ["0: true", "1: true"])
        #expect(waitFor(seconds: 10) { loops.allSatisfy { $0.reactor.isStopped } })
        channels.removeAll()
    }

    @Test("subscriptions from two threads to a loop not started yet all take effect once it runs")
    func subscribeBeforeTheLoopStarts() throws {
        let server = try EchoServer()
        defer { server.close() }
        let loop = try ReactorLoop()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: server.address, configuration: Self.failFast(), eventLoop: loop)
        let heard = PThreadLock<Int>(0)
        let subscribers = DispatchGroup()
        for _ in 0..<2 {
            DispatchQueue.global().async(group: subscribers) {
                for _ in 0..<200 {
                    channel.events.subscribe { event in
                        if case .callStarted = event { heard.withLock { $0 += 1 } }
                    }
                }
            }
        }
        subscribers.wait()
        loop.start()
        let ledger = CompletionLedger()
        channel.unary(path: "/echo.Echo/Get", request: [1]) { _ in ledger.record(0) }
        #expect(waitFor(seconds: 10) { ledger.completed == 1 })
        #expect(waitFor(seconds: 10) { heard.withLock { $0 } == 400 }, "\(heard.withLock { $0 }) of 400")
    }

    @Test("close() while calls wait in retry backoff ends them at once")
    func closeDuringRetryBackoff() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.retry.policy.initialBackoff = .seconds(3600)
        configuration.retry.policy.maxBackoff = .seconds(3600)
        // Backoffs are jittered over 0...3600 s: a retry before the close (some 50 ms after its scheduling) is
        // unlikely enough (about 1 in 4,000 runs for one of the 20) for its RESOURCE_EXHAUSTED to stay out of the
        // checks below. With two attempts at most, such a retry is the call's last and schedules no other.
        configuration.retry.policy.maxAttempts = 2
        configuration.retry.throttling = nil
        let channel = try fixture.channel(configuration)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        let ledger = CompletionLedger()
        let codes = PThreadLock<[StatusCode]>([])
        // RESOURCE_EXHAUSTED, retryable by the default policy: the calls end UNAVAILABLE all the same (they were
        // not answered so: the channel closed on their retries), the attempt's status in the message.
        let messages = PThreadLock<[String]>([])
        for id in 0..<20 {
            channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-fail-code": "8"]) { response in
                ledger.record(id)
                codes.withLock { $0.append(response.status.code) }
                messages.withLock { $0.append(response.status.message) }
            }
        }
        // Every call failed once and waits 0...30 s for its retry: now close.
        #expect(await eventually(timeout: 5) { recorder.count { if case .retryScheduled = $0 { return true }; return false } == 20 })
        let closedAt = now()
        channel.close()
        #expect(await eventually(timeout: 5) { ledger.completed == 20 })
        #expect(now() - closedAt < 2, "no call waited for its backoff")
        #expect(ledger.duplicates == 0)
        #expect(codes.withLock { $0 }.allSatisfy { $0 == .unavailable })
        #expect(messages.withLock { $0 }.allSatisfy { $0.contains("while waiting to retry after RESOURCE_EXHAUSTED") }, "\(messages.withLock { $0 }.first ?? "")")
        #expect(recorder.count { if case .retryScheduled = $0 { return true }; return false } == 20, "nothing was retried once closing")
    }

    @Test("ReactorLoop.shutdown() ends calls everywhere they wait: on a stream, over MAX_CONCURRENT_STREAMS, for a connection, in backoff, and submitted during the shutdown")
    func shutdownEndsCallsEverywhere() throws {
        let loop = try ReactorLoop()
        loop.start()
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 1
        let server = try EchoServer(options: options)  // on a loop of its own: it outlives ours
        defer { server.close() }
        let ledger = CompletionLedger()
        let codes = PThreadLock<[Int: StatusCode]>([:])
        @Sendable func record(_ id: Int) -> @Sendable (UnaryResponse) -> Void {
            { response in
                ledger.record(id)
                codes.withLock { $0[id] = response.status.code }
            }
        }
        var noRetry = Self.failFast()
        noRetry.maxReconnectDelay = .seconds(30)
        let busy = try GRPCChannel(target: server.address, configuration: noRetry, eventLoop: loop)
        // 1: open on the stream (the server sleeps); 2-5: queued behind MAX_CONCURRENT_STREAMS = 1.
        for id in 1...5 { busy.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "10000"], completion: record(id)) }
        // 6-8: waiting for a connection that cannot be made (wait-for-ready).
        let dead = try GRPCChannel(target: "127.0.0.1:\(freePort())", configuration: noRetry, eventLoop: loop)
        for id in 6...8 {
            dead.unary(path: "/echo.Echo/Get", request: [], options: RequestOptions(waitForReady: true), completion: record(id))
        }
        // 9: in retry backoff.
        var slowRetry = Configuration()
        slowRetry.enableCircuitBreaker = false
        slowRetry.retry.policy.initialBackoff = .seconds(30)
        slowRetry.retry.policy.maxBackoff = .seconds(30)
        let retrying = try GRPCChannel(target: server.address, configuration: slowRetry, eventLoop: loop)
        retrying.unary(path: "/echo.Echo/Get", request: [], metadata: ["x-fail-code": "14"], completion: record(9))
        #expect(waitFor(seconds: 5) {
            busy.openCount == 5 && busy.queuedCount == 4 && retrying.isBackingOff
        })
        // 10: submitted from a completion while the loop shuts down.
        let submittedDuringShutdown = Atomic<Bool>(false)
        loop.reactor.execute {
            busy.unary(path: "/echo.Echo/Get", request: []) { response in
                record(10)(response)
                submittedDuringShutdown.store(true, ordering: .releasing)
            }
        }
        loop.shutdown()
        #expect(ledger.completed == 10, "every call completed before shutdown() returned")
        #expect(ledger.duplicates == 0)
        let all = codes.withLock { $0 }
        #expect(all.values.allSatisfy { $0 == .unavailable }, "\(all)")
        let submittedInTime = submittedDuringShutdown.load(ordering: .acquiring)
        #expect(submittedInTime)
        #expect(openFDCount() < 64)
        withExtendedLifetime((busy, dead, retrying)) {}
    }

    @Test("calls and subscriptions from other threads while the loop shuts down: every call completes once")
    func otherThreadsRaceTheShutdown() async throws {
        // The shutdown once looked at its inbox, found it empty, and closed it later: a call submitted in between
        // was accepted and never run. Two threads keep starting calls (and changing subscriptions) across it.
        for round in 0..<30 {
            let loop = try ReactorLoop()
            loop.start()
            let channel = try GRPCChannel(target: "127.0.0.1:\(freePort())", configuration: Self.failFast(), eventLoop: loop)
            let ledger = CompletionLedger()
            let started = Atomic<Int>(0)
            let stop = Atomic<Bool>(false)
            let threads = (0..<2).map { thread in
                Thread {
                    // Bounded, and paced: after the shutdown every refused call ends on a thread of its own.
                    var count = 0
                    while !stop.load(ordering: .acquiring) && count < 400 {
                        let id = started.wrappingAdd(1, ordering: .relaxed).newValue
                        channel.unary(path: "/echo.Echo/Get", request: []) { _ in ledger.record(id) }
                        if thread == 1 { channel.events.unsubscribe(channel.events.subscribe { _ in }) }
                        count += 1
                        usleep(20)
                    }
                }
            }
            threads.forEach { $0.start() }
            try await Task.sleep(nanoseconds: UInt64(500_000 + round * 100_000))
            loop.shutdown()
            try await Task.sleep(nanoseconds: 2_000_000)
            stop.store(true, ordering: .releasing)
            let allEnded = await eventually(timeout: 10) {
                threads.allSatisfy(\.isFinished) && ledger.completed == started.load(ordering: .acquiring)
            }
            #expect(allEnded, "round \(round): \(ledger.completed) of \(started.load(ordering: .acquiring)) completed")
            #expect(ledger.duplicates == 0)
            withExtendedLifetime(channel) {}
        }
    }

    @Test("a subscription token belongs to its bus: two buses' tokens differ, and one bus's token removes nothing from another")
    func tokensBelongToTheirBus() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (a, b) = (try fixture.channel(), try fixture.channel())
        let heardOnB = PThreadLock(0)
        let tokenA = a.events.subscribe { _ in }
        let tokenB = b.events.subscribe { _ in heardOnB.withLock { $0 += 1 } }
        #expect(tokenA != tokenB, "a Set of both keeps both")
        b.events.unsubscribe(tokenA)  // not one of b's: b's handler still hears b's events
        #expect(await b.call([1], timeout: .seconds(5)).status == .ok)
        #expect(await eventually { heardOnB.withLock { $0 } > 0 })
    }

    @Test("after the loop stopped, threads that subscribe and unsubscribe at once change the lists one at a time")
    func subscriptionsAfterTheLoopStopped() async throws {
        let loop = try ReactorLoop()
        loop.start()
        let channel = try GRPCChannel(target: "127.0.0.1:\(freePort())", configuration: Self.failFast(), eventLoop: loop)
        loop.shutdown()
        let before = channel.environment.bus.subscriptionCount  // the library's own handlers
        let threads = (0..<4).map { _ in
            Thread {
                for _ in 0..<2_000 { channel.events.unsubscribe(channel.events.subscribe { _ in }) }
            }
        }
        threads.forEach { $0.start() }
        #expect(await eventually(timeout: 30) { threads.allSatisfy(\.isFinished) })
        // Every subscription went again: none left behind, none lost, by an update lost to another thread's.
        #expect(channel.environment.bus.subscriptionCount == before)
    }

    @Test("closeNow() while close(gracePeriod:) lets calls drain ends them now, and the graceful close returns")
    func closeNowDuringGracefulClose() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(configuration: Self.failFast(), eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let ended = PThreadLock<CallStatus?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "20000", "x-request-key": "slow"]) {
            response in ended.withLock { $0 = response.status }
        }
        // On the wire (a call still waiting for its connection would end at once, graceful close or not).
        #expect(await eventually { fixture.server.requestCount(key: "slow") == 1 })
        let graceful = Task { await manager.close(gracePeriod: .seconds(60)) }
        #expect(await eventually { manager.connectionCount == 0 }, "the graceful close began")
        manager.closeNow()  // a second SIGTERM, say: before, it found no channel and did nothing
        #expect(await eventually { ended.withLock { $0 } != nil })
        #expect(ended.withLock { $0 } == CallStatus(code: .unavailable, message: "the manager closed"))
        await graceful.value  // its calls have ended: it returns too
    }

    @Test("a manager's close(gracePeriod:) force-closes after the grace period: draining calls end too")
    func managerCloseForcesAfterGrace() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(configuration: Self.failFast(), eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(2)).status == .ok)
        let ledger = CompletionLedger()
        let statuses = PThreadLock<[CallStatus]>([])
        for id in 0..<5 {
            channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "20000"]) { response in
                ledger.record(id)
                statuses.withLock { $0.append(response.status) }
            }
        }
        #expect(await eventually { await manager.openCalls() == 5 })
        let started = now()
        await manager.close(gracePeriod: .milliseconds(200))
        #expect(await eventually { ledger.completed == 5 })
        #expect(now() - started < 3)
        #expect(ledger.duplicates == 0)
        #expect(statuses.withLock { $0 }.allSatisfy { $0 == CallStatus(code: .unavailable, message: "the manager closed") })
    }

    @Test("a call's events are dispatched before its completion runs: a stream whose messages and end come in one read, and a cancelled call with observers")
    func eventsBeforeCompletion() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        @Sendable func finishedEvents() -> Int { recorder.count { if case .callFinished = $0 { true } else { false } } }
        for round in 1...5 {
            // The echo server writes the headers, two messages and the trailers in one flush: the call is queued for
            // its messages before its end publishes the events.
            let seenAtFinish = await withCheckedContinuation { (continuation: CheckedContinuation<Int, Never>) in
                channel.serverStreaming(
                    path: "/raw.Raw/Expand", request: Array("a b".utf8),
                    callbacks: StreamingCallbacks(onMessage: { _ in }, onFinish: { _ in continuation.resume(returning: finishedEvents()) }))
            }
            #expect(seenAtFinish == round, "the callFinished event of stream \(round) was dispatched before its onFinish")
        }
        // A call with an observer (an interceptor's), cancelled on its loop: the observers' part was queued first.
        let observed = try GRPCChannel(
            target: fixture.target, configuration: .defaults,
            interceptors: [Observing(name: "o", log: SharedLog(), reactor: fixture.loop.reactor)], eventLoop: fixture.loop)
        let observedRecorder = EventRecorder()
        observed.events.subscribe { observedRecorder.record($0) }
        let seenAtCancel = await withCheckedContinuation { (continuation: CheckedContinuation<Int, Never>) in
            _ = fixture.loop.execute {
                let handle = observed.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "5000"]) { _ in
                    continuation.resume(returning: observedRecorder.count { if case .callFinished = $0 { true } else { false } })
                }
                handle.cancel()
            }
        }
        #expect(seenAtCancel == 1, "the cancelled call's callFinished was dispatched before its completion")
    }

    @Test("from a completion: subscribe, unsubscribe, start and await calls, close the manager")
    func wholeAPIFromCallbacks() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(configuration: Self.failFast(), eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let seen = Atomic<Int>(0)
        let chained = Atomic<Int>(0)
        let awaited = Atomic<Bool>(false)
        let closed = Atomic<Bool>(false)
        channel.unary(path: "/echo.Echo/Get", request: [1]) { _ in
            let token = channel.events.subscribe { event in
                if case .callFinished = event { seen.add(1, ordering: .relaxed) }
            }
            channel.unary(path: "/echo.Echo/Get", request: [2]) { second in
                if second.status.isOK { chained.add(1, ordering: .relaxed) }
                channel.events.unsubscribe(token)
                launch {
                    let third = await channel.unaryResult(path: "/echo.Echo/Get", request: [3])
                    awaited.store(third.status.isOK, ordering: .releasing)
                    channel.unary(path: "/echo.Echo/Get", request: [4]) { _ in
                        manager.closeNow()
                        closed.store(true, ordering: .releasing)
                    }
                }
            }
        }
        #expect(await eventually(timeout: 5) { closed.load(ordering: .acquiring) })
        #expect(chained.load(ordering: .relaxed) == 1)
        #expect(awaited.load(ordering: .acquiring) == true)
        #expect(seen.load(ordering: .relaxed) >= 1, "the handler subscribed from a completion saw the next call end")
        #expect(manager.connectionCount == 0)
    }
}

/// Starts `calls` calls one after another, each from the previous one's completion, and watches whether a
/// completion ever runs inside the `unary()` that started its call.
final class LoopProbe: @unchecked Sendable {
    // `@unchecked`: `insideUnary` and `remaining` are touched on the reactor thread only; the atomics anywhere.
    let channel: GRPCChannel
    var remaining: Int
    var insideUnary = false
    let completions = Atomic<Int>(0)
    let completedInsideUnary = Atomic<Int>(0)
    let nonUnavailable = Atomic<Int>(0)
    let done = Atomic<Bool>(false)

    init(channel: GRPCChannel, calls: Int) {
        self.channel = channel
        self.remaining = calls
    }

    func start() {
        self.channel.reactor.execute { self.next() }
    }

    private func next() {
        guard self.remaining > 0 else {
            self.done.store(true, ordering: .releasing)
            return
        }
        self.remaining -= 1
        self.insideUnary = true
        self.channel.unary(path: "/echo.Echo/Get", request: []) { response in
            if self.insideUnary { self.completedInsideUnary.add(1, ordering: .relaxed) }
            if response.status.code != .unavailable { self.nonUnavailable.add(1, ordering: .relaxed) }
            self.completions.add(1, ordering: .relaxed)
            self.next()
        }
        self.insideUnary = false
    }

    func waitUntilDone(seconds: Double) -> Bool {
        waitFor(seconds: seconds) { self.done.load(ordering: .acquiring) }
    }
}

/// A channel whose only long-lived reference is handed to its calls' completions.
final class ChannelHolder: @unchecked Sendable {
    // `@unchecked`: `channel` is set in init, read by the test thread before `dropCallerReference`, then only
    // released by completions under the lock.
    private let lock = PThreadLock<GRPCChannel?>(nil)
    private(set) var channel: GRPCChannel?

    init(_ channel: GRPCChannel) {
        self.channel = channel
        self.lock.withLock { $0 = channel }
    }

    /// The test's own reference goes; the lock's stays until a completion releases it.
    func dropCallerReference() { self.channel = nil }

    func release() { self.lock.withLock { $0 = nil } }
}

/// Starts a task from synchronous code (a completion) without capturing anything that is not `Sendable`.
func launch(_ body: @escaping @Sendable () async -> Void) {
    Task(operation: body)
}

/// Polls `condition` every millisecond until it holds or `seconds` pass (for tests that are not async).
func waitFor(seconds: Double, _ condition: () -> Bool) -> Bool {
    let end = now() + seconds
    while now() < end {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

extension GRPCChannel {
    /// Reads the pool's reactor-thread state on the reactor thread and waits for the answer.
    func inspect<T: Sendable>(_ body: @escaping @Sendable (ServicePool) -> T) -> T {
        let result = PThreadLock<T?>(nil)
        let pool = self.pool
        self.reactor.execute { let value = body(pool); result.withLock { $0 = value } }
        _ = waitFor(seconds: 5) { result.withLock { $0 } != nil }
        return result.withLock { $0 }!
    }

    var queuedCount: Int { self.inspect { $0.queuedCallCount } }
    var openCount: Int { self.inspect { $0.openCallCount } }
    var isBackingOff: Bool { self.inspect { $0.backingOffCallCount } > 0 }
}

extension ConnectionManager {
    /// Calls started and not yet ended, over every channel (reactor-thread state, read through the inbox).
    func openCalls() async -> Int {
        let pools = self.registry.withLock { Array($0.channels.values) }.map(\.pool)
        return await withCheckedContinuation { continuation in
            self.reactor.execute { continuation.resume(returning: pools.reduce(0) { $0 + $1.openCallCount }) }
        }
    }
}
