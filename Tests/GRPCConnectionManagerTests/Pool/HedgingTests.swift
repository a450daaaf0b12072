import Foundation
import GRPCEchoServer
import Logging
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// Hedging (gRFC A6) against grpcio backends: a slow one, a failing one, a fast one.
@Suite("Hedging", .serialized)
struct HedgingTests {
    static func channel(
        _ peers: [PythonPeer], loop: ReactorLoop, policy: CallHedgingPolicy, throttling: RetryThrottling? = RetryThrottling(),
        interceptors: [any CallInterceptor] = [], adjust: (inout Configuration) -> Void = { _ in }
    ) throws -> (GRPCChannel, EventRecorder) {
        var configuration = Configuration()
        configuration.retry.throttling = throttling
        configuration.enableCircuitBreaker = false
        configuration.loadBalancingPolicy = .roundRobin
        configuration.hedging["echo.Echo"] = policy
        adjust(&configuration)
        let channel = try GRPCChannel(
            target: "hedge.test:50051", configuration: configuration,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), metricsFactory: nil,
            interceptors: interceptors, loops: [loop.reactor],
            resolver: ScriptedResolver([peers.map { NetworkAddress(ip: "127.0.0.1", port: $0.port)! }]))
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        return (channel, recorder)
    }

    /// A backend that answers after 5 s and one that answers at once, and a running loop, for `body`.
    static func withSlowAndFast(_ body: (PythonPeer, PythonPeer, ReactorLoop) async throws -> Void) async throws {
        let slow = try PythonPeer(name: "slow", sleepMilliseconds: 5000)
        let fast = try PythonPeer(name: "fast")
        defer {
            slow.stop()
            fast.stop()
        }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        try await body(slow, fast, loop)
    }

    /// A backend that fails every call UNAVAILABLE (non-fatal), one that answers, and a running loop, for `body`.
    static func withBrokenAndGood(_ body: (PythonPeer, PythonPeer, ReactorLoop) async throws -> Void) async throws {
        let broken = try PythonPeer(name: "broken", failCode: 14)
        let good = try PythonPeer(name: "good")
        defer {
            broken.stop()
            good.stop()
        }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        try await body(broken, good, loop)
    }

    @Test("a slow first backend: the hedge to the fast one answers, the slow attempt is cancelled")
    func slowBackendIsHedged() async throws {
        try await Self.withSlowAndFast { slow, fast, loop in
            let (channel, recorder) = try Self.channel(
                [slow, fast], loop: loop, policy: CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50)))
            channel.connect()
            #expect(await eventually { await channel.connectivity().state == .ready })
            // Round robin sends every other first attempt to the slow backend: each of those is answered by its hedge.
            for _ in 0..<6 {
                let response = try await channel.unary(path: "/echo.Echo/Get", request: [7])
                #expect(response.message == [7])
                #expect(response.initialMetadata["x-peer"] == "fast")
            }
            // The losers' attempts end as their calls complete, and the bus delivers that a moment later.
            let lost = {
                recorder.count {
                    if case .attemptFinished(_, _, let status, let attempt) = $0 {
                        return attempt == 1 && status.message == "another hedged attempt won"
                    }
                    return false
                }
            }
            #expect(await eventually { lost() >= 2 }, "the slow first attempts were cancelled: \(lost())")
            let finishedAttempts = {
                recorder.all.compactMap { event -> Int? in
                    if case .callFinished(_, _, let status, _, let attempts, _, _) = event, status.isOK { return attempts }
                    return nil
                }
            }
            #expect(await eventually { finishedAttempts().count == 6 }, "one call each, however many attempts")
            let finished = finishedAttempts()
            #expect(finished.contains(2))
        }
    }

    @Test("a non-fatal failure sends the next attempt at once; a fatal one ends the call")
    func nonFatalAndFatal() async throws {
        try await Self.withBrokenAndGood { broken, good, loop in
            // A long delay: only a non-fatal failure can bring the second attempt in time.
            let (channel, _) = try Self.channel(
                [broken, good], loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30)))
            channel.connect()
            #expect(await eventually { await channel.connectivity().state == .ready })
            for _ in 0..<4 {
                let response = try await channel.unary(
                    path: "/echo.Echo/Get", request: [1], options: RequestOptions(timeout: .seconds(10)))
                #expect(response.initialMetadata["x-peer"] == "good")
            }

            let fatal = try PythonPeer(name: "fatal", failCode: 3)  // INVALID_ARGUMENT: not in nonFatalStatusCodes
            defer { fatal.stop() }
            // A long delay again: a fatal code must not bring the next attempt (a non-fatal one would, at once).
            let (strict, recorder) = try Self.channel(
                [fatal], loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30)))
            let response = await strict.unaryResult(path: "/echo.Echo/Get", request: [1])
            #expect(response.status.code == .invalidArgument)
            #expect(await eventually {
                recorder.all.contains { if case .callFinished(_, _, _, _, 1, _, _) = $0 { true } else { false } }
            })
        }
    }

    /// One call's entries of an `Observing` log: the attempts' ends, in the order heard, then the call's end; checks
    /// that each attempt is heard once, before the end, and that one ended OK.
    static func attemptsOfEachCall(_ entries: [String]) -> [[String]] {
        var calls: [[String]] = []
        var current: [String] = []
        for entry in entries {
            if entry.hasPrefix("o end ") {
                #expect(entry == "o end OK loop=true")
                let numbers = current.map { $0.split(separator: " ")[2] }
                #expect(numbers.sorted() == (1...current.count).map { Substring(String($0)) }, "\(current)")
                // One OK at least: both attempts on one backend may both answer in the read that commits one.
                #expect(current.contains { $0.contains(" OK ") }, "\(current)")
                calls.append(current)
                current = []
            } else {
                #expect(entry.hasPrefix("o attempt ") && entry.hasSuffix("loop=true"), "\(entry)")
                current.append(entry)
            }
        }
        #expect(current.isEmpty, "attempts heard after their call's end: \(current)")
        return calls
    }

    @Test("interceptors' observers hear each hedged attempt's end, then the call's: a failed one, a cancelled loser, the winner")
    func observersHearHedgedAttempts() async throws {
        let log = SharedLog()
        // A non-fatal failure with a long delay: the second attempt goes at once, and follows the first.
        try await Self.withBrokenAndGood { broken, good, loop in
            let (channel, _) = try Self.channel(
                [broken, good], loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30)),
                interceptors: [Observing(name: "o", log: log, reactor: loop.reactor)])
            channel.connect()
            // Round robin: once both connections are up, one call of two goes to the broken backend first.
            for _ in 0..<10 {
                let response = try await channel.unary(path: "/echo.Echo/Get", request: [1])
                #expect(response.initialMetadata["x-peer"] == "good")
                if log.entries.contains("o attempt 1 UNAVAILABLE retry=true loop=true") { break }
            }
            // The call's end is delivered after its attempts'; the last call's may still be on its way.
            #expect(await eventually { log.entries.last?.hasPrefix("o end ") == true })
            // Each call: a failure (with the next attempt following) per attempt the broken backend took, then the good
            // one's answer; one call at least went to the broken one first.
            let calls = Self.attemptsOfEachCall(log.entries)
            #expect(calls.contains { $0.count >= 2 }, "\(calls)")
            for attempts in calls {
                let failures = (1..<attempts.count).map { "o attempt \($0) UNAVAILABLE retry=true loop=true" }
                #expect(attempts == failures + ["o attempt \(attempts.count) OK retry=false loop=true"], "\(attempts)")
            }
        }

        // A slow first attempt that the fast hedge beats: cancelled, heard before the call's end (the winner's
        // headers and trailers usually come in one read: the loser's end is then still on its way at the call's).
        let slowLog = SharedLog()
        try await Self.withSlowAndFast { slow, fast, loop in
            let (channel, _) = try Self.channel(
                [slow, fast], loop: loop, policy: CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50)),
                interceptors: [Observing(name: "o", log: slowLog, reactor: loop.reactor)])
            channel.connect()
            for _ in 0..<10 {
                let response = try await channel.unary(path: "/echo.Echo/Get", request: [7])
                #expect(response.initialMetadata["x-peer"] == "fast")
                if slowLog.entries.contains(where: { $0.contains("CANCELLED") }) { break }
            }
            #expect(await eventually { slowLog.entries.last?.hasPrefix("o end ") == true })
            let calls = Self.attemptsOfEachCall(slowLog.entries)
            let hedged = calls.filter { $0.count == 2 }
            #expect(!hedged.isEmpty, "\(calls)")
            for attempts in hedged {
                #expect(attempts.contains { $0.hasSuffix("CANCELLED retry=false loop=true") }, "\(attempts)")
            }
        }
    }

    @Test("a method with a retry policy of its own is not hedged by its service's hedging (the most specific entry wins)")
    func methodRetryEntryOptsOutOfServiceHedging() async throws {
        try await Self.withBrokenAndGood { broken, good, loop in
            var once = CallRetryPolicy()
            once.maxAttempts = 1
            let (channel, recorder) = try Self.channel(
                [broken, good], loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30))
            ) { $0.retry.perMethod["/echo.Echo/Get"] = once }
            channel.connect()
            // Both connections up: round robin then sends every other call to each backend.
            #expect(await eventually {
                recorder.count { if case .connectAttemptSucceeded = $0 { true } else { false } } == 2
            })
            // Hedged, a call that went to the broken backend would be sent again to the good one at once: never here.
            var codes: [StatusCode] = []
            for _ in 0..<6 { codes.append(await channel.unaryResult(path: "/echo.Echo/Get", request: [1]).status.code) }
            #expect(codes.contains(.unavailable), "\(codes)")
            #expect(codes.contains(.ok), "\(codes)")
            #expect(await eventually {
                recorder.all.compactMap { if case .callFinished(_, _, _, _, let attempts, _, _) = $0 { attempts } else { nil } }
                    == Array(repeating: 1, count: 6)
            }, "one attempt each")
        }
    }

    @Test("an attempt that receives response headers commits the call: no more hedges, and its failure is the call's")
    func responseHeadersCommit() async throws {
        // Headers at once, then UNAVAILABLE (non-fatal) 1 s later: uncommitted, hedges would go out every 250 ms
        // and the failure would send yet another. Connected first: the hedge delay starts with the call.
        let peer = try ScriptedPeer("headers-then-status", ["14", "1000"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try Self.hedgedChannel(
            peer.target, loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .milliseconds(250)))
        #expect(await channel.ready())
        let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(response.status.code == .unavailable, "\(response.status)")
        #expect(peer.headerBlocks() == 1, "one attempt: committed at its headers")
    }

    @Test("a retry policy's per-attempt timeout does not end hedged attempts: the slow one may still answer")
    func perAttemptTimeoutLeavesHedges() async throws {
        let slow = try PythonPeer(name: "slow", sleepMilliseconds: 300)
        defer { slow.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try Self.hedgedChannel(
            slow.target, loop: loop, policy: CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50))
        ) { $0.retry.policy.perAttemptTimeout = .milliseconds(100) }
        // Both attempts reach the one slow backend; whichever answers first (about 300 ms) is the call's.
        let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [3])
        #expect(response.status == .ok, "\(response.status)")
        #expect(response.message == [3])
    }

    @Test("a call whose interceptor works asynchronously is hedged all the same; its deadline runs meanwhile")
    func asyncInterceptorsKeepHedging() async throws {
        /// Adds a header after an await, every time.
        struct AlwaysAsync: CallInterceptor {
            func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
                .proceedAfter {
                    await Task.yield()
                    return ["x-token": "async"]
                }
            }
        }
        try await Self.withSlowAndFast { slow, fast, loop in
            let policy = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50))
            let (channel, _) = try Self.channel([slow, fast], loop: loop, policy: policy, interceptors: [AlwaysAsync()])
            channel.connect()
            #expect(await eventually { await channel.connectivity().state == .ready })
            // Every other first attempt goes to the slow backend: a hedge answers each within the 2 s deadline.
            for _ in 0..<4 {
                let response = await channel.unaryResult(
                    path: "/echo.Echo/Get", request: [7], options: RequestOptions(timeout: .seconds(2)))
                #expect(response.status == .ok, "\(response.status)")
                #expect(response.initialMetadata["x-peer"] == "fast")
            }
            // Work that never finishes: the deadline ends the hedged call, and the work is cancelled.
            let stuck = SlowTokenSource()
            let (waiting, _) = try Self.channel([slow, fast], loop: loop, policy: policy, interceptors: [stuck])
            let late = await waiting.unaryResult(
                path: "/echo.Echo/Get", request: [8], options: RequestOptions(timeout: .milliseconds(100)))
            #expect(late.status.code == .deadlineExceeded)
            #expect(await eventually { stuck.cancelled.load(ordering: .relaxed) == 1 })
        }
    }

    @Test("hedging shares the retry throttle: once failures spend its tokens, no further attempt goes out")
    func throttleGatesHedges() async throws {
        let broken = try PythonPeer(name: "broken", failCode: 14)
        defer { broken.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // Each UNAVAILABLE costs a token; with 2 tokens the first failure leaves the throttle at its threshold.
        var throttling = RetryThrottling()
        throttling.maxTokens = 2
        let policy = CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30))
        for (throttle, expected) in [(throttling as RetryThrottling?, 1), (nil, 3)] {
            let (channel, recorder) = try Self.channel([broken], loop: loop, policy: policy, throttling: throttle)
            let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1])
            #expect(response.status.code == .unavailable)
            #expect(
                await eventually {
                    recorder.all.contains { if case .callFinished(_, _, _, _, expected, _, _) = $0 { true } else { false } }
                }, "attempts with throttle \(String(describing: throttle))")
        }
    }

    /// A channel to `target` on `loop`, `policy` hedging `service`, the circuit breaker off.
    static func hedgedChannel(
        _ target: String, loop: ReactorLoop, service: String = "echo.Echo", policy: CallHedgingPolicy,
        interceptors: [any CallInterceptor] = [], adjust: (inout Configuration) -> Void = { _ in }
    ) throws -> GRPCChannel {
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.hedging[service] = policy
        adjust(&configuration)
        return try GRPCChannel(target: target, configuration: configuration, interceptors: interceptors, eventLoop: loop)
    }

    /// The embedded server's channel with `policy` for echo.Echo, and the attempts each finished call made.
    static func embeddedChannel(
        _ fixture: LoopbackFixture, policy: CallHedgingPolicy, interceptors: [any CallInterceptor] = [],
        adjust: (inout Configuration) -> Void = { _ in }
    ) throws -> (GRPCChannel, @Sendable () -> [Int]) {
        let channel = try Self.hedgedChannel(
            fixture.target, loop: fixture.loop, policy: policy, interceptors: interceptors, adjust: adjust)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        return (channel, {
            recorder.all.compactMap { event -> Int? in
                if case .callFinished(_, _, _, _, let attempts, _, _) = event { return attempts }
                return nil
            }
        })
    }

    @Test("a server's pushback: 'do not retry' sends no further hedge, a delay defers the next one (gRFC A6)")
    func pushbackRules() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (channel, attempts) = try Self.embeddedChannel(
            fixture, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30)))
        let stopped = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1],
            metadata: ["x-fail-code": "14", "x-pushback-ms": "-1", "x-request-key": "stop"])
        #expect(stopped.status.code == .unavailable)
        #expect(fixture.server.requestCount(key: "stop") == 1, "no hedge after 'do not retry'")
        #expect(await eventually { attempts() == [1] })
        // The first attempt fails, pushing back 300 ms: the second goes then, not at once.
        let started = ContinuousClock.now
        let deferred = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [2],
            metadata: ["x-fail-first": "1", "x-pushback-ms": "300", "x-request-key": "later"])
        #expect(deferred.status == .ok, "\(deferred.status)")
        #expect(ContinuousClock.now - started >= .milliseconds(290))
        #expect(fixture.server.requestCount(key: "later") == 2)
    }

    @Test("a pushback past the call's deadline sends no hedge: the call ends with the failure, not at the pushback")
    func pushbackPastTheDeadline() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (channel, _) = try Self.embeddedChannel(
            fixture, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30)))
        let started = ContinuousClock.now
        let response = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1], metadata: ["x-fail-code": "14", "x-pushback-ms": "60000"],
            options: RequestOptions(timeout: .seconds(1)))
        #expect(response.status.code == .unavailable, "\(response.status)")
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    @Test("'do not retry' from one attempt, then a delay from the next: the call ends with the last failure, not its deadline")
    func stopThenDelay() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (channel, _) = try Self.embeddedChannel(
            fixture, policy: CallHedgingPolicy(maxAttempts: 5, hedgingDelay: .milliseconds(300)))
        // Every attempt fails 400 ms after it arrives. The first (sent at 0) says "do not retry" while the second (sent
        // at 300 ms) is out, 200 ms before a third would go; the second then pushes back 300 ms. Nothing more may be
        // sent, and with nothing left out the call must end there, with the server's answer.
        // The attempts carry the deadline, and none is out: before the fix the call waited for ever. Waited for here
        // with a bound, then cancelled, so that such a regression fails this test instead of hanging the suite.
        let ended = PThreadLock<UnaryResponse?>(nil)
        let handle = channel.unary(
            path: "/echo.Echo/Get", request: [1],
            metadata: ["x-fail-code": "14", "x-sleep-ms": "400", "x-pushback-ms": "-1,300", "x-request-key": "mixed"],
            options: RequestOptions(timeout: .seconds(10))
        ) { response in ended.withLock { $0 = response } }
        #expect(await eventually { ended.withLock { $0 } != nil }, "the call ended within 5 s")
        handle.cancel()
        let status = ended.withLock { $0 }?.status
        #expect(status?.code == .unavailable, "\(String(describing: status))")
        #expect((2...3).contains(fixture.server.requestCount(key: "mixed")), "no hedge after 'do not retry'")
    }

    @Test("a hedged call with no attempt out when its loop stops (an interceptor still working) ends, UNAVAILABLE")
    func loopStopsWhilePreparing() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let stuck = SlowTokenSource()
        let (channel, _) = try Self.embeddedChannel(
            fixture, policy: CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50)), interceptors: [stuck])
        let ended = PThreadLock<UnaryResponse?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [1]) { response in ended.withLock { $0 = response } }
        try await Task.sleep(for: .milliseconds(50))
        fixture.loop.shutdown()
        #expect(await eventually { ended.withLock { $0 } != nil }, "the call ended")
        #expect(ended.withLock { $0 }?.status.code == .unavailable)
        #expect(await eventually { stuck.cancelled.load(ordering: .relaxed) == 1 }, "its interceptor's work was cancelled")
    }

    @Test(
        "closing the channel ends a hedged call with no attempt out: one waiting out a pushback, or for its interceptors",
        arguments: [false, true])
    func closeEndsCallWithNoAttemptOut(preparing: Bool) async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let stuck = SlowTokenSource()
        let policy = CallHedgingPolicy(
            maxAttempts: 3, hedgingDelay: .seconds(30), nonFatalStatusCodes: [.unavailable, .resourceExhausted])
        let (channel, _) = try Self.embeddedChannel(fixture, policy: policy, interceptors: preparing ? [stuck] : [])
        let ended = PThreadLock<UnaryResponse?>(nil)
        let key = "pushed-\(preparing)"
        // No deadline. The first attempt fails (RESOURCE_EXHAUSTED, non-fatal here), and the server asks for the next
        // one in a minute.
        channel.unary(
            path: "/echo.Echo/Get", request: [1],
            metadata: ["x-fail-code": "8", "x-pushback-ms": "60000", "x-request-key": key]
        ) { response in ended.withLock { $0 = response } }
        if !preparing {
            #expect(await eventually { fixture.server.requestCount(key: key) == 1 })
        }
        // (Preparing: the close reaches the loop after the call's start, through the same inbox.)
        channel.close()
        #expect(await eventually(timeout: 5) { ended.withLock { $0 } != nil }, "the call ended at the close")
        // The close's status, as a single call waiting between attempts gets, with the failure in its message.
        #expect(ended.withLock { $0 }?.status.code == .unavailable, "\(String(describing: ended.withLock { $0 }?.status))")
        if preparing {
            #expect(await eventually { stuck.cancelled.load(ordering: .relaxed) == 1 }, "its interceptor's work was cancelled")
            #expect(fixture.server.requestCount(key: key) == 0)
        } else {
            #expect(fixture.server.requestCount(key: key) == 1, "no attempt after the close")
            #expect(ended.withLock { $0 }?.status.message.contains("while waiting to retry after RESOURCE_EXHAUSTED") == true)
        }
    }

    @Test("a hedge refused by a full wait queue is no close: a later hedge still goes, and the call ends with its answer")
    func refusedHedgeIsNoClose() async throws {
        // Two streams on the server. A (3 s) and the hedged call's first attempt (5 s, then UNAVAILABLE) hold both; B
        // waits. The hedge at 2 s finds the queue full and is refused; the one at 4 s finds a stream (A's and B's done)
        // and answers. The refusal was taken for the channel's close: no later hedge went, and the call ended with the
        // first attempt's UNAVAILABLE. (A second of margin each side.)
        try await Self.withOneQueuePlace(streams: 2) { server, channel in
            let hedged = Task {
                await channel.call(
                    "/echo.Echo/Get", [2], metadata: ["x-sleep-ms": "5000", "x-fail-first": "1", "x-request-key": "refused"],
                    timeout: .seconds(20))
            }
            #expect(await eventually { server.requestCount(key: "refused") == 1 })
            let waiting = Task { await channel.call("/test.Raw/Get", [3], timeout: .seconds(20)) }
            #expect(await eventually { channel.queuedCount == 1 }, "B waits for a stream before the first hedge")
            let response = await hedged.value
            #expect(response.status == .ok, "\(response.status)")
            #expect(server.requestCount(key: "refused") == 2, "the first attempt and the third")
            #expect(await waiting.value.status == .ok)
        }
    }

    @Test("a hedged call refused with no hedge due before its deadline ends at once, RESOURCE_EXHAUSTED, sending nothing")
    func refusedHedgePastDeadlineEnds() async throws {
        // One stream on the server, held by A; B waits, filling the one place in the queue. The hedged call's first
        // attempt is refused, and its next hedge (in 2 s) would start past its 1 s deadline: it ends now. It waited,
        // and sent an attempt after its deadline.
        try await Self.withOneQueuePlace(streams: 1) { server, channel in
            let waiting = Task { await channel.call("/test.Raw/Get", [2], timeout: .seconds(20)) }
            #expect(await eventually { channel.queuedCount == 1 })
            let began = ContinuousClock.now
            let response = await channel.call("/echo.Echo/Get", [3], metadata: ["x-request-key": "late"], timeout: .seconds(1))
            #expect(response.status.code == .resourceExhausted, "\(response.status)")
            #expect(ContinuousClock.now - began < .milliseconds(900), "ended at the refusal, not at or after the deadline")
            #expect(await waiting.value.status == .ok)
            #expect(server.requestCount(key: "late") == 0, "no attempt reached the server")
        }
    }

    /// The embedded server with `streams` streams, and a channel hedging echo.Echo (3 attempts, 2 s apart, the
    /// throttle off) that lets one call wait for a stream. A, a 3 s call of another method, holds a stream when
    /// `body` runs, and ends OK after.
    private static func withOneQueuePlace(
        streams: Int, _ body: (EchoServer, GRPCChannel) async throws -> Void
    ) async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = streams
        let server = try EchoServer(options: options)
        defer { server.close() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try Self.hedgedChannel(
            server.address, loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(2))
        ) { configuration in
            configuration.maxQueuedCalls = 1
            configuration.retry.throttling = nil
        }
        let held = Task {
            await channel.call("/test.Raw/Get", [1], metadata: ["x-sleep-ms": "3000", "x-request-key": "a"], timeout: .seconds(20))
        }
        #expect(await eventually { server.requestCount(key: "a") == 1 })
        try await body(server, channel)
        #expect(await held.value.status == .ok)
    }

    @Test("the throttle counts a hedge's failure by the hedging policy's codes, with retries off too")
    func throttleCountsHedgingCodes() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        // INTERNAL is non-fatal for this hedging policy (not retryable for the default retry policy): each one
        // costs a token, and with 2 tokens the first leaves the throttle at its threshold.
        let policy = CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .seconds(30), nonFatalStatusCodes: [.unavailable, .internal])
        for retries in [true, false] {
            let (channel, attempts) = try Self.embeddedChannel(fixture, policy: policy) {
                $0.enableRetry = retries
                $0.retry.throttling?.maxTokens = 2
            }
            let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1], metadata: ["x-fail-code": "13"])
            #expect(response.status.code == .internal)
            #expect(await eventually { attempts() == [1] }, "retries \(retries): \(attempts())")
        }
    }

    @Test("a graceful close while a hedged call waits for its next hedge: the attempt out finishes, none is added")
    func gracefulCloseSendsNoHedge() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        // UNAVAILABLE (what a closing channel refuses with) is fatal here: a refused hedge would end the call.
        configuration.hedging["echo.Echo"] = CallHedgingPolicy(
            maxAttempts: 3, hedgingDelay: .seconds(1), nonFatalStatusCodes: [.internal])
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        // Connected first, so that the close comes well within the hedge's second, on a slow machine too; the
        // attempt takes 3 s, so the hedge timer fires during the grace period.
        #expect(await channel.unaryResult(path: "/echo.Echo/Get", request: [0]).status == .ok)
        async let response = channel.unaryResult(
            path: "/echo.Echo/Get", request: [5], metadata: ["x-sleep-ms": "3000", "x-request-key": "closing"])
        #expect(await eventually { fixture.server.requestCount(key: "closing") == 1 })
        await manager.close(gracePeriod: .seconds(5))
        let answer = await response
        #expect(answer.status == .ok, "\(answer.status)")
        #expect(answer.message == [5])
        #expect(fixture.server.requestCount(key: "closing") == 1)
    }

    @Test("close(gracePeriod:) returns once a hedged call's completion has run (a turn after its attempt's end)")
    func closeReturnsAfterTheCompletion() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.hedging["echo.Echo"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .seconds(30))
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let ended = PThreadLock<UnaryResponse?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "5000", "x-request-key": "hedged"]) {
            response in ended.withLock { $0 = response }
        }
        #expect(await eventually { fixture.server.requestCount(key: "hedged") == 1 })
        await manager.close(gracePeriod: .zero)
        #expect(ended.withLock { $0 }?.status.code == .unavailable, "\(String(describing: ended.withLock { $0 }?.status))")
    }

    @Test("a hedged call in flight when its loop shuts down ends once, UNAVAILABLE")
    func loopShutdown() async throws {
        let slow = try PythonPeer(name: "slow", sleepMilliseconds: 5000)
        defer { slow.stop() }
        let loop = try ReactorLoop()
        loop.start()
        let (channel, recorder) = try Self.channel(
            [slow], loop: loop, policy: CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(20)))
        let ledger = CompletionLedger()
        let task = Task { await channel.call("/echo.Echo/Get", [1], ledger: ledger, id: 1) }
        #expect(await eventually {
            recorder.count { if case .connectAttemptSucceeded = $0 { true } else { false } } == 1
        })
        loop.shutdown()
        let response = await task.value
        #expect(response.status.code == .unavailable)
        #expect(ledger.completed == 1 && ledger.duplicates == 0)
    }

    @Test("cancelling a hedged call cancels every attempt; hedging settings are validated")
    func cancelAndValidate() async throws {
        let slow = try PythonPeer(name: "slow", sleepMilliseconds: 5000)
        defer { slow.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let (channel, recorder) = try Self.channel(
            [slow], loop: loop, policy: CallHedgingPolicy(maxAttempts: 3, hedgingDelay: .milliseconds(20)))
        let task = Task { await channel.unaryResult(path: "/echo.Echo/Get", request: [1]) }
        #expect(await eventually {
            recorder.count { if case .connectAttemptSucceeded = $0 { true } else { false } } == 1
        })
        try await Task.sleep(for: .milliseconds(500))  // let the hedges go out (20 ms apart; the peer answers in 5 s)
        task.cancel()
        let response = await task.value
        #expect(response.status.code == .cancelled)
        #expect(await eventually {
            recorder.count {
                if case .attemptFinished(_, _, let status, _) = $0 { return status.code == .cancelled } else { return false }
            } == 3
        })
        for (field, policy) in [
            ("maxAttempts", CallHedgingPolicy(maxAttempts: 1)), ("maxAttempts", CallHedgingPolicy(maxAttempts: 6)),
            ("hedgingDelay", CallHedgingPolicy(hedgingDelay: .milliseconds(-1))),
        ] {
            var configuration = Configuration()
            configuration.hedging["/a.B/C"] = policy
            #expect(throws: ConfigurationError.self, "\(field)") { try configuration.validate() }
        }
    }

    @Test("a close between the winning attempt's response headers and its commit still ends the hedged call")
    func closeBeforeCommitEnds() async throws {
        let peer = try ScriptedPeer("observe")  // answers nothing
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try Self.hedgedChannel(
            peer.target, loop: loop, service: "test.Hedge", policy: CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .zero))
        let ended = PThreadLock<UnaryResponse?>(nil)
        let handle = channel.unary(path: "/test.Hedge/Get", request: [1], options: RequestOptions(timeout: .seconds(20))) {
            response in ended.withLock { $0 = response }
        }
        #expect(await eventually(timeout: 10) { peer.headerBlocks() == 2 })
        guard let hedged = handle.hedged else {
            Issue.record("the call was not hedged")
            return
        }
        // In one turn: the channel closes (both attempts end here; their completions wait for the deferred phase),
        // then the second attempt's commit, as when its response headers were read earlier in the same turn (the
        // commit runs in the deferred phase, ahead of those completions). The call used to wait for ever.
        _ = loop.execute {
            channel.close()
            hedged.responseHeadersReceived(2)
        }
        #expect(await eventually(timeout: 10) { ended.withLock { $0 } != nil })
        let status = ended.withLock { $0 }?.status
        #expect(status?.code == .unavailable, "\(String(describing: status))")
    }
}
