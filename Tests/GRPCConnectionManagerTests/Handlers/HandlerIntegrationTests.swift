import Foundation
import GRPCConnectionManagerPrometheus
import GRPCEchoServer
import InMemoryLogging
import Logging
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// Retry, breaker, metrics and logging against the embedded server, each checked through what it produces.
@Suite("Handlers against the embedded server", .serialized)
struct HandlerIntegrationTests {
    static func failFirst(_ count: Int, key: String, code: Int? = nil, pushback: String? = nil) -> CallMetadata {
        var metadata = CallMetadata()
        metadata.add("x-fail-first", String(count))
        metadata.add("x-request-key", key)
        if let code { metadata.add("x-fail-code", String(code)) }
        if let pushback { metadata.add("x-pushback-ms", pushback) }
        return metadata
    }

    static func attempts(_ recorder: EventRecorder, path: String = "/echo.Echo/Get") -> [Int] {
        recorder.all.compactMap {
            if case .callFinished(_, path, _, _, let attempts, _, _) = $0 { return attempts }
            return nil
        }
    }

    func makeManager(_ fixture: LoopbackFixture, _ adjust: (inout Configuration) -> Void = { _ in })
        throws -> (ConnectionManager, GRPCChannel, EventRecorder)
    {
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        adjust(&configuration)
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        return (manager, try manager.connection(service: "echo", address: fixture.target), recorder)
    }

    @Test("retry succeeds on attempt N+1 within maxAttempts, with grpc-previous-rpc-attempts")
    func retrySucceeds() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture)
        let response = await channel.call([1], metadata: Self.failFirst(2, key: "a"), timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.initialMetadata["grpc-previous-rpc-attempts"] == "2")
        #expect(await eventually { Self.attempts(recorder) == [3] })
        #expect(recorder.story.filter { $0 == "retry" }.count == 2)
        // Three failures exhaust the default 3 attempts.
        let exhausted = await channel.call([1], metadata: Self.failFirst(3, key: "b"), timeout: .seconds(5))
        #expect(exhausted.status.code == .unavailable)
        #expect(await eventually { Self.attempts(recorder) == [3, 3] })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a server's DEADLINE_EXCEEDED (its upstream timed out) is retried while the call's deadline is far, as the Go original retries it")
    func serverDeadlineExceededIsRetried() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture)
        let response = await channel.call([1], metadata: Self.failFirst(1, key: "de", code: 4), timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(await eventually { Self.attempts(recorder) == [2] })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("non-retryable codes are tried once; enableRetry false tries once")
    func nonRetryable() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture)
        let response = await channel.call([1], metadata: Self.failFirst(1, key: "c", code: 3), timeout: .seconds(5))
        #expect(response.status.code == .invalidArgument)
        #expect(await eventually { Self.attempts(recorder) == [1] })
        await manager.close(gracePeriod: .seconds(1))

        let (off, offChannel, offRecorder) = try self.makeManager(fixture) { $0.enableRetry = false }
        #expect(await offChannel.call([1], metadata: Self.failFirst(1, key: "d"), timeout: .seconds(5)).status.code == .unavailable)
        #expect(await eventually { Self.attempts(offRecorder) == [1] })
        await off.close(gracePeriod: .seconds(1))
    }

    @Test("server pushback sets the wait; a negative pushback stops retrying")
    func pushback() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture)
        let started = now()
        let response = await channel.call([1], metadata: Self.failFirst(1, key: "e", pushback: "300"), timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(now() - started >= 0.3)
        let delays = recorder.all.compactMap { event -> Duration? in
            if case .retryScheduled(_, _, _, let delay, _) = event { return delay }
            return nil
        }
        #expect(delays == [.milliseconds(300)])
        let stopped = await channel.call([1], metadata: Self.failFirst(1, key: "f", pushback: "-1"), timeout: .seconds(5))
        #expect(stopped.status.code == .unavailable)
        #expect(await eventually { Self.attempts(recorder) == [2, 1] })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("after a retry the server's pushback timed, the backoff starts over at the initial delay")
    func backoffAfterPushback() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture) {
            // 1 s, then 1,000 s: a second retry counted from the first attempt could not start before the deadline.
            $0.retry.policy.initialBackoff = .seconds(1)
            $0.retry.policy.backoffMultiplier = 1000
            $0.retry.policy.maxBackoff = .seconds(1000)
        }
        // The first attempt fails with a 10 ms pushback, the second without one, the third answers.
        let response = await channel.call([1], metadata: Self.failFirst(2, key: "reset", pushback: "10,"), timeout: .seconds(5))
        #expect(response.status == .ok, "\(response.status)")
        let delays = recorder.all.compactMap { event -> Duration? in
            if case .retryScheduled(_, _, _, let delay, _) = event { return delay }
            return nil
        }
        #expect(delays.count == 2 && delays.first == .milliseconds(10) && delays.last! < .seconds(1), "\(delays)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("throttling stops retries after a burst of failures and lets them resume")
    func throttling() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture)
        for index in 0..<4 {
            _ = await channel.call([1], metadata: Self.failFirst(100, key: "burst\(index)"), timeout: .seconds(5))
        }
        // 10 tokens, -1 per failed attempt: retries stop once no more than half are left.
        #expect(await eventually { Self.attempts(recorder).count == 4 })
        let burst = Self.attempts(recorder)
        #expect(burst.first == 3)
        #expect(burst.last == 1)
        #expect(burst.reduce(0, +) <= 7)
        // 3 tokens are left. Successes refill the bucket (+0.1 each). A failed attempt costs its token before the
        // retry decision (as in grpc-go), so retries come back once more than 6 are left.
        for _ in 0..<35 { #expect(await channel.call([2], timeout: .seconds(5)).status == .ok) }
        let tokens = await onReactor(fixture.loop.reactor) { manager.pipeline.retry?.throttleTokens(service: "echo") }
        #expect(tokens == 6_500, "3 tokens after the burst, plus 35 x 0.1")
        let resumed = await channel.call([3], metadata: Self.failFirst(1, key: "after"), timeout: .seconds(5))
        #expect(resumed.status == .ok)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a server's \"do not retry\" pushback costs a throttle token whatever the code, as in grpc-go (gRFC A6)")
    func refusingPushbackChargesTheThrottle() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, _) = try self.makeManager(fixture)
        let tokens = { await onReactor(fixture.loop.reactor) { manager.pipeline.retry?.throttleTokens(service: "echo") } }
        // INTERNAL, which the policy does not retry: alone it costs nothing; with a pushback of -1 it costs a token.
        let plain = await channel.call([1], metadata: ["x-fail-code": "13"], timeout: .seconds(5))
        #expect(plain.status.code == .internal)
        #expect(await tokens() == 10_000)
        for index in 0..<3 {
            let refused = await channel.call(
                [1], metadata: Self.failFirst(1, key: "refused\(index)", code: 13, pushback: "-1"), timeout: .seconds(5))
            #expect(refused.status.code == .internal)
        }
        #expect(await tokens() == 7_000, "one token for each refusal")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("calls refused because the client's own wait queue is full count for neither the breaker nor the throttle")
    func queueFullIsNotTheServers() async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 1
        let fixture = try LoopbackFixture(options: options)
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.maxQueuedCalls = 1
        configuration.circuitBreaker.failureThreshold = 2
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([0], timeout: .seconds(5)).status == .ok)  // connected: one stream at a time
        let tokens = { await onReactor(fixture.loop.reactor) { manager.pipeline.retry?.throttleTokens(service: "echo") } }
        let before = await tokens()
        // One call holds the only stream, one waits in the queue, two more find the queue full.
        // The slow call's 3 s are the window for the rest, on a loaded machine too.
        async let slow = channel.call([1], metadata: ["x-sleep-ms": "3000", "x-request-key": "slow"], timeout: .seconds(10))
        #expect(await eventually { fixture.server.requestCount(key: "slow") == 1 })
        async let queued = channel.call([2], timeout: .seconds(10))
        #expect(await eventually { channel.queuedCount == 1 })
        for index in 3...4 {
            let refused = await channel.call([UInt8(index)], timeout: .seconds(5))
            #expect(refused.status.code == .resourceExhausted, "\(refused.status)")
        }
        #expect(await slow.status == .ok)
        #expect(await queued.status == .ok)
        #expect(await tokens() == before, "the throttle lost no token")
        let after = await channel.call([5], timeout: .seconds(5))
        #expect(after.status == .ok, "the breaker stayed closed: \(after.status)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a retry never runs past the caller's deadline")
    func retryRespectsDeadline() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, _) = try self.makeManager(fixture) {
            $0.retry.policy.initialBackoff = .milliseconds(200)
            $0.retry.policy.maxAttempts = 10
        }
        let started = now()
        let response = await channel.call([1], metadata: Self.failFirst(100, key: "g"), timeout: .milliseconds(250))
        let elapsed = now() - started
        #expect(response.status.code == .unavailable || response.status.code == .deadlineExceeded)
        // Backoffs that ignored the deadline would take seconds (200 ms, then growing, up to nine times); the slack
        // over the 250 ms is for a loaded machine.
        #expect(elapsed < 0.25 + 1.25)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a per-attempt timeout retries a slow attempt; the caller's deadline is still final")
    func perAttemptTimeout() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture) {
            $0.retry.policy.perAttemptTimeout = .milliseconds(100)
        }
        let response = await channel.call([1], metadata: ["x-sleep-ms": "1000"], timeout: .seconds(5))
        #expect(response.status.code == .deadlineExceeded)
        #expect(await eventually { Self.attempts(recorder) == [3] })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a per-attempt timeout never ends what it cannot retry: a stream of requests, a committed response")
    func perAttemptTimeoutOnlyWhereRetried() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, _) = try self.makeManager(fixture) {
            $0.retry.policy.perAttemptTimeout = .milliseconds(100)
        }
        // Streamed requests are never retried by policy: the stream outlives the attempt timeout.
        let bidi = channel.bidirectionalStreaming(path: "/test.Stream/Update")
        var echoes = bidi.responses.makeAsyncIterator()
        try await bidi.write([1])
        #expect(try await echoes.next() == [1])
        try await Task.sleep(for: .milliseconds(300))
        try await bidi.write([2])
        #expect(try await echoes.next() == [2])
        bidi.closeSend()
        #expect(try await echoes.next() == nil)
        #expect(await bidi.result().status.code == .ok)
        await manager.close(gracePeriod: .seconds(1))

        // Response headers commit a call: no retry can follow, so the status that comes 3 s later is the call's.
        // Connected first: the per-attempt timer starts with the call, and the headers must beat it.
        let peer = try ScriptedPeer("headers-then-status", ["5", "3000"])
        defer { peer.stop() }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.retry.policy.perAttemptTimeout = .seconds(1)
        let committed = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: fixture.loop)
        #expect(await committed.ready())
        let response = await committed.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(response.status.code == .notFound, "\(response.status)")
        #expect(peer.headerBlocks() == 1)
    }

    /// A manager whose breaker opens at the first failure, retry off (so each call is one outcome).
    func makeTrippingManager(_ fixture: LoopbackFixture, _ adjust: (inout Configuration) -> Void = { _ in })
        throws -> (ConnectionManager, GRPCChannel, EventRecorder)
    {
        try self.makeManager(fixture) {
            $0.enableCircuitBreaker = true
            $0.enableRetry = false
            $0.circuitBreaker.failureThreshold = 1
            adjust(&$0)
        }
    }

    @Test("the breaker opens after 5 failures, refuses without a network call, and closes after 2 probes")
    func breakerOpensAndCloses() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeManager(fixture) {
            $0.enableCircuitBreaker = true
            $0.enableRetry = false
            $0.circuitBreaker.timeout = .seconds(1)  // the refusal below must come within it, on a loaded machine too
        }
        for index in 0..<5 {
            #expect(await channel.call([1], metadata: ["x-fail-code": "14"], timeout: .seconds(5)).status.code == .unavailable, "\(index)")
        }
        let refused = await channel.call([1], timeout: .seconds(5))
        #expect(refused.status == CallStatus(code: .unavailable, message: "circuit breaker is open"))
        #expect(await eventually { Self.attempts(recorder).last == 0 }, "no attempt was made")
        try await Task.sleep(for: .milliseconds(1050))  // past the open time
        #expect(await channel.call([2], timeout: .seconds(5)).status == .ok)
        #expect(await channel.call([3], timeout: .seconds(5)).status == .ok)
        #expect(await eventually {
            recorder.story.filter { $0.hasPrefix("breaker:") }
                == ["breaker:CLOSED>OPEN", "breaker:OPEN>HALF_OPEN", "breaker:HALF_OPEN>CLOSED"]
        })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a stream's breaker outcome is the server's answer: a long-lived probe does not keep its method refused")
    func streamingProbeSettlesWithHeaders() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        // Open for a second: the refusal below must come within it. (At 100 ms, a loaded machine let that stream be
        // the half-open probe, an open stream nobody ended: the test waited for it for ever.)
        let (manager, channel, recorder) = try self.makeTrippingManager(fixture) {
            $0.circuitBreaker.timeout = .seconds(1)
        }
        let path = "/raw.Raw/Update"  // raw bytes echoed as they come, until the client half-closes
        let failing = channel.bidirectionalStreaming(path: path, metadata: ["x-fail-code": "14"])
        failing.closeSend()  // the server answers (UNAVAILABLE) once the requests end
        #expect(await failing.result().status.code == .unavailable)
        // A deadline all the same: were it admitted after all, the test fails instead of waiting for ever.
        let refused = channel.bidirectionalStreaming(path: path, options: RequestOptions(timeout: .seconds(5)))
        #expect(await refused.result().status == CallStatus(code: .unavailable, message: "circuit breaker is open"))
        try await Task.sleep(for: .milliseconds(1050))  // past the open time, on the clock the breaker reads
        // The probe, a watch that stays open: its echo came, so the server answered with headers.
        let probe = channel.bidirectionalStreaming(path: path)
        try await probe.write([1])
        var probeResponses = probe.responses.makeAsyncIterator()
        #expect(try await probeResponses.next() == [1])
        // Held to the probe's end, the one probe slot would refuse this stream, and every other call of the method.
        let next = channel.bidirectionalStreaming(path: path)
        try await next.write([2])
        var nextResponses = next.responses.makeAsyncIterator()
        #expect(try await nextResponses.next() == [2])
        #expect(await eventually {
            recorder.story.filter { $0.hasPrefix("breaker:") }
                == ["breaker:CLOSED>OPEN", "breaker:OPEN>HALF_OPEN", "breaker:HALF_OPEN>CLOSED"]
        })
        probe.closeSend()
        next.closeSend()
        #expect(await probe.result().status == .ok)
        #expect(await next.result().status == .ok)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test(
        "a call cancelled on its loop before its submitted start runs takes no breaker permit, nor reports a start",
        arguments: [false, true])
    func cancelledBeforeItsStartTakesNoPermit(hedged: Bool) async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeTrippingManager(fixture) {
            $0.circuitBreaker.timeout = .milliseconds(1)
            if hedged { $0.hedging["echo.Echo"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .seconds(10)) }
        }
        let cancelled = PThreadLock<UnaryResponse?>(nil)
        let first = await withCheckedContinuation { (continuation: CheckedContinuation<UnaryResponse, Never>) in
            channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-fail-code": "14"]) { first in
                // On the loop, the breaker open: another thread starts a call, which is submitted to this loop (busy
                // here), and this thread cancels it before the loop takes the submission.
                let handle = PThreadLock<CallHandle?>(nil)
                let started = DispatchSemaphore(value: 0)
                Thread {
                    let call = channel.unary(path: "/echo.Echo/Get", request: [2]) { response in
                        cancelled.withLock { $0 = response }
                    }
                    handle.withLock { $0 = call }
                    started.signal()
                }.start()
                started.wait()
                usleep(2_000)  // past the 1 ms open time: the start, had it run, would be the half-open probe
                handle.withLock { $0 }!.cancel()
                continuation.resume(returning: first)
            }
        }
        #expect(first.status.code == .unavailable)
        #expect(await eventually { cancelled.withLock { $0 }?.status.code == .cancelled })
        // A permit taken by the cancelled call would be a probe nothing gives back: this call would be refused.
        let probe = await channel.call([3], timeout: .seconds(5))
        #expect(probe.status == .ok, "\(probe.status)")
        let starts = recorder.count { if case .callStarted = $0 { true } else { false } }
        let ends = recorder.count { if case .callFinished = $0 { true } else { false } }
        #expect(starts == 2 && ends == 2, "started \(starts), finished \(ends)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("metrics: a service connected before any call, its loop then stopped, leaves no connection-state series at 1")
    func connectionStateAfterLoopStops() async throws {
        let fixture = try LoopbackFixture()  // the server, on a loop of its own
        defer { fixture.shutdown() }
        let clientLoop = try ReactorLoop()
        clientLoop.start()
        var configuration = Configuration()
        configuration.enableMetrics = true
        let manager = try ConnectionManager(
            configuration: configuration, metricsFactory: PrometheusMetrics(), eventLoop: clientLoop)
        _ = try manager.connection(service: "echo", address: fixture.target)
        let state = { (name: String) in #"grpc_client_connection_state{service="echo",state="\#(name)"}"# }
        #expect(await eventually { Self.parse(manager.metricsText() ?? "")[state("READY")] == 1 })
        clientLoop.shutdown()
        let series = Self.parse(manager.metricsText() ?? "")
        for name in ["IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE"] {
            #expect((series[state(name)] ?? 0) == 0, "\(name): \(series[state(name)] ?? 0)")
        }
    }

    @Test("metrics: the exposition holds the expected series and values")
    func metricsExposition() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let prometheus = PrometheusMetrics()
        var configuration = Configuration()
        configuration.enableMetrics = true
        configuration.circuitBreaker.failureThreshold = 2
        configuration.retry.throttling = nil  // keeps the retry count independent of the token bucket
        let manager = try ConnectionManager(configuration: configuration, metricsFactory: prometheus, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        for _ in 0..<3 { #expect(await channel.call([1, 2, 3], timeout: .seconds(5)).status == .ok) }
        #expect(await channel.call([1], metadata: ["x-fail-code": "5"], timeout: .seconds(5)).status.code == .notFound)
        #expect(await channel.call([1], metadata: Self.failFirst(1, key: "m"), timeout: .seconds(5)).status == .ok)
        // Two UNAVAILABLE calls (each retried twice) open the breaker.
        for key in ["u1", "u2"] {
            _ = await channel.call([1], metadata: Self.failFirst(9, key: key), timeout: .seconds(5))
        }
        var series: [String: Double] = [:]
        let get = #"service="echo",method="/echo.Echo/Get""#
        // The breaker opens as the last call ends, a moment before that call is counted: wait for both.
        let complete = await eventually {
            series = Self.parse(manager.metricsText() ?? "")
            return series[#"grpc_client_circuit_breaker_state{\#(get)}"#] == 1
                && series[#"grpc_client_request_duration_seconds_count{\#(get)}"#] == 7
        }
        #expect(complete)
        #expect(series[#"grpc_client_requests_total{\#(get),code="OK"}"#] == 4)
        #expect(series[#"grpc_client_requests_total{\#(get),code="NOT_FOUND"}"#] == 1)
        #expect(series[#"grpc_client_requests_total{\#(get),code="UNAVAILABLE"}"#] == 2)
        #expect(series[#"grpc_client_retries_total{\#(get)}"#] == 5)
        #expect(series[#"grpc_client_request_duration_seconds_count{\#(get)}"#] == 7)
        #expect(series[#"grpc_client_request_duration_seconds_bucket{\#(get),le="10.0"}"#] == 7)
        #expect(series[#"grpc_client_connections_active{service="echo"}"#] == 1)
        #expect(series[#"grpc_client_connection_state{service="echo",state="READY"}"#] == 1)
        #expect(series[#"grpc_client_connect_attempts_total{service="echo"}"#] == 1)
        // Message bytes over every attempt: 3 calls of 3 bytes, then 1 + 2 + 3 + 3 single bytes.
        let sentBytes: Double = 18
        #expect(series[#"grpc_client_sent_bytes_total{service="echo"}"#] == sentBytes)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("metrics: with retries off and hedging on (its throttle kept), no retry series is made")
    func noRetrySeriesWithRetriesOff() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let prometheus = PrometheusMetrics()
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.hedging = ["/echo.Echo/Expand": CallHedgingPolicy()]
        let manager = try ConnectionManager(configuration: configuration, metricsFactory: prometheus, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        var text = ""
        #expect(await eventually {
            text = manager.metricsText() ?? ""
            return Self.parse(text)[#"grpc_client_requests_total{service="echo",method="/echo.Echo/Get",code="OK"}"#] == 1
        })
        // Before, a zero series per method said retries were on (a retry handler holds the hedges' throttle).
        #expect(!text.contains("grpc_client_retries_total"), "\(text)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("metrics: a passed factory records; every series exists from the first call; states count connections")
    func metricsFromTheFirstCall() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let prometheus = PrometheusMetrics()
        // enableMetrics left at its default: the factory passed here is the request.
        let manager = try ConnectionManager(metricsFactory: prometheus, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        let get = #"service="echo",method="/echo.Echo/Get""#
        var series: [String: Double] = [:]
        #expect(await eventually {
            series = Self.parse(manager.metricsText() ?? "")
            return series[#"grpc_client_requests_total{\#(get),code="OK"}"#] == 1
        })
        #expect(series[#"grpc_client_retries_total{\#(get)}"#] == 0, "retries exist at 0 before any retry")
        #expect(series[#"grpc_client_circuit_breaker_state{\#(get)}"#] == 0, "the breaker exists, closed")
        // One connection, READY: one series per state, each holding how many connections are in it.
        let states = ["IDLE": 0.0, "CONNECTING": 0, "READY": 1, "TRANSIENT_FAILURE": 0]
        for (state, count) in states {
            #expect(series[#"grpc_client_connection_state{service="echo",state="\#(state)"}"#] == count, "\(state)")
        }
        #expect(series[#"grpc_client_connections_active{service="echo"}"#] == 1)
        // A loopback call takes well under a millisecond: the buckets go below 100 µs to show it.
        let bounds = series.keys.compactMap { key -> Double? in
            let prefix = #"grpc_client_request_duration_seconds_bucket{\#(get),le=""#
            guard key.hasPrefix(prefix) else { return nil }
            return Double(key.dropFirst(prefix.count).dropLast(2))
        }
        #expect(bounds.filter { $0 <= 0.0001 }.count >= 3, "buckets up to 100 µs: \(bounds.sorted())")
        // The server goes away: READY drops to 0 and the connection is counted where it is now.
        fixture.server.close()
        // The gauges of a move are set one after another, so a read between two of them sees the connection in
        // none or two states: wait for a settled read.
        var live: [Double] = []
        #expect(await eventually {
            series = Self.parse(manager.metricsText() ?? "")
            live = states.keys.map { series[#"grpc_client_connection_state{service="echo",state="\#($0)"}"#] ?? -1 }
            return series[#"grpc_client_connection_state{service="echo",state="READY"}"#] == 0 && live.reduce(0, +) == 1
        }, "the one connection is in exactly one state, not READY: \(live)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("metrics: two managers sharing one factory and a service name add up in the connection series")
    func metricsOfTwoManagersAddUp() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let prometheus = PrometheusMetrics()
        let first = try ConnectionManager(metricsFactory: prometheus, eventLoop: fixture.loop)
        let second = try ConnectionManager(metricsFactory: prometheus, eventLoop: fixture.loop)
        for manager in [first, second] {
            let channel = try manager.connection(service: "echo", address: fixture.target)
            #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        }
        // Each set the series to its own count before (1), hiding the other manager's connection.
        let ready = #"grpc_client_connection_state{service="echo",state="READY"}"#
        var series: [String: Double] = [:]
        #expect(await eventually {
            series = Self.parse(prometheus.exposition())
            return series[ready] == 2 && series[#"grpc_client_connections_active{service="echo"}"#] == 2
        }, "\(series[ready] ?? -1)")
        await first.close(gracePeriod: .seconds(1))
        #expect(await eventually {
            series = Self.parse(prometheus.exposition())
            return series[ready] == 1 && series[#"grpc_client_connections_active{service="echo"}"#] == 1
        }, "the closed manager's connection leaves the series: \(series[ready] ?? -1)")
        await second.close(gracePeriod: .seconds(1))
    }

    @Test("metrics: a breaker series shows the worst state of the manager's loops, not the last one to change")
    func breakerSeriesIsWorstOfLoops() {
        let shared = SharedMetricsState()
        final class Loop {}
        let (a, b) = (Loop(), Loop())
        var shown: [CircuitBreakerState] = []
        func report(_ loop: Loop, _ state: CircuitBreakerState, onlyIfNew: Bool = false) {
            shared.breaker(
                "k", holder: SharedMetricsState.BreakerHolder(loop: ObjectIdentifier(loop), breaker: "/a.B/C"), is: state,
                onlyIfNew: onlyIfNew
            ) { shown.append($0) }
        }
        report(a, .closed, onlyIfNew: true)
        report(b, .closed, onlyIfNew: true)
        report(a, .open)
        report(b, .closed, onlyIfNew: true)  // b's first call of the method, later: a is still open
        report(b, .halfOpen)
        report(a, .halfOpen)
        report(a, .closed)
        report(b, .closed)
        #expect(shown == [.closed, .closed, .open, .open, .halfOpen, .halfOpen, .closed])
    }

    @Test("metrics: no factory passed and enableMetrics off records nothing")
    func noMetricsWithoutAsking() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(manager.pipeline.metrics == nil)
        await manager.close(gracePeriod: .seconds(1))
    }

    /// "name{labels} value" lines, comments skipped. Labels keep their order of appearance.
    static func parse(_ text: String) -> [String: Double] {
        var result: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            result[String(line[..<space])] = value
        }
        return result
    }

    @Test("logging: call records, retries and breaker changes at debug with metadata; nothing at info or above")
    func logging() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let handler = InMemoryLogHandler()
        var logger = Logger(label: "test", factory: { _ in handler })
        logger.logLevel = .debug
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        _ = manager
        var configuration = Configuration()
        configuration.enableCircuitBreaker = true
        configuration.circuitBreaker.failureThreshold = 1
        let logged = try ConnectionManager(configuration: configuration, logger: logger, eventLoop: fixture.loop)
        let channel = try logged.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(await channel.call([1], metadata: Self.failFirst(1, key: "l"), timeout: .seconds(5)).status == .ok)
        #expect(await channel.call([1], metadata: ["x-fail-code": "14"], timeout: .seconds(5)).status.code == .unavailable)
        let entries = await eventuallyValue {
            handler.entries.contains { $0.message.description == "circuit breaker state changed" } ? handler.entries : nil
        }
        #expect(entries.contains { $0.message.description == "circuit breaker state changed" && $0.level == .debug })
        let finished = entries.filter { $0.message.description == "call finished" }
        #expect(finished.allSatisfy { $0.level == .debug })
        #expect(finished.first?.metadata["grpc.method"] == "/echo.Echo/Get")
        #expect(finished.first?.metadata["grpc.code"] == "OK")
        #expect(finished.first?.metadata["grpc.target"] == "\(fixture.target)")
        #expect(finished.first?.metadata["grpc.attempts"] == "1")
        #expect(finished.first?.metadata["grpc.duration_ms"] != nil)
        #expect(entries.contains { $0.message.description == "retrying call" && $0.level == .debug })
        #expect(entries.contains { $0.message.description == "connectivity state changed" && $0.level == .debug })
        // A library speaks at info or above only for what an operator acts on: here, nothing.
        #expect(entries.filter { $0.level >= .info }.isEmpty, "\(entries.filter { $0.level >= .info })")
        await logged.close(gracePeriod: .seconds(1))
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a call given the caller's logger logs through it: its metadata and its provider's, taken at call start")
    func callerLoggerMetadata() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let handler = InMemoryLogHandler()
        var logger = Logger(label: "caller", factory: { _ in handler })
        logger.handler.metadataProvider = Logger.MetadataProvider { ["tenant": "\(RequestTenant.current ?? "none")"] }
        logger.logLevel = .debug
        logger[metadataKey: "request-id"] = "r-42"
        let channel = try fixture.channel()
        // The provider reads a task-local, which the reactor thread never sees: only a capture at call start keeps it.
        let response = try await RequestTenant.$current.withValue("blue") {
            try await channel.unary(path: "/test.Raw/Get", request: [1], options: RequestOptions(timeout: .seconds(5)), logger: logger)
        }
        #expect(response.message == [1])
        let finished = try #require(handler.entries.first { $0.message.description == "call finished" })
        #expect(finished.level == .debug)
        #expect(finished.metadata["request-id"] == "r-42")
        #expect(finished.metadata["tenant"] == "blue")
        #expect(finished.metadata["grpc.method"] == "/test.Raw/Get")
        #expect(finished.metadata["grpc.code"] == "OK")
        #expect(handler.entries.contains { $0.message.description == "call started" && $0.metadata["tenant"] == "blue" })
        #expect(finished.metadata["grpc.service"] == "\(channel.service)", "the handler's records have it too")
        // Above debug: no record, and the provider is not even asked.
        let asked = PThreadLock(0)
        var quiet = Logger(label: "quiet", factory: { _ in handler })
        quiet.handler.metadataProvider = Logger.MetadataProvider {
            asked.withLock { $0 += 1 }
            return [:]
        }
        quiet.logLevel = .info
        let before = handler.entries.count
        #expect(try await channel.unary(path: "/test.Raw/Get", request: [2], logger: quiet).message == [2])
        #expect(handler.entries.count == before && asked.withLock { $0 } == 0)
    }

    @Test("the bus tells the same story the metrics count")
    func busMatchesMetrics() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let prometheus = PrometheusMetrics()
        var configuration = Configuration()
        configuration.enableMetrics = true
        let manager = try ConnectionManager(configuration: configuration, metricsFactory: prometheus, eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        for index in 0..<6 {
            _ = await channel.call([1], metadata: Self.failFirst(index % 3, key: "k\(index)"), timeout: .seconds(5))
        }
        #expect(await eventually { Self.attempts(recorder).count == 6 })
        let series = Self.parse(manager.metricsText() ?? "")
        let retries = recorder.story.filter { $0 == "retry" }.count
        #expect(Double(retries) == series[#"grpc_client_retries_total{service="echo",method="/echo.Echo/Get"}"#])
        #expect(Self.attempts(recorder).reduce(0, +) == 6 + retries)
        let ok = recorder.all.filter {
            if case .callFinished(_, _, let status, _, _, _, _) = $0 { return status.isOK } else { return false }
        }.count
        #expect(series[#"grpc_client_requests_total{service="echo",method="/echo.Echo/Get",code="OK"}"#] == Double(ok))
        #expect(ok >= 4)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("calls ended by closing a channel, or by their deadline, count neither against the breaker nor the throttle")
    func localEndsAreNotServerFailures() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let first = try manager.connection(service: "echo", address: fixture.target)
        let ledger = CompletionLedger()
        for id in 0..<8 {
            first.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "5000"]) { _ in ledger.record(id) }
        }
        #expect(await eventually { await manager.openCalls() == 8 })
        manager.closeConnection(service: "echo")
        #expect(await eventually { ledger.completed == 8 })
        // Eight local ends counted as failures would have opened the breaker (5 in a row) and taken the throttle
        // below half: this call's first attempt fails, and it is still retried.
        let second = try manager.connection(service: "echo")
        let retried = await second.call([2], metadata: Self.failFirst(1, key: "after-close"), timeout: .seconds(5))
        #expect(retried.status == .ok, "\(retried.status)")
        #expect(recorder.count { if case .circuitBreakerStateChanged = $0 { true } else { false } } == 0)
        await manager.close(gracePeriod: .seconds(1))

        // The caller's deadline is not the server's answer either, for the throttle (the breaker counts a slow
        // call, by design: it is off here).
        var noBreaker = Configuration()
        noBreaker.enableCircuitBreaker = false
        let other = try ConnectionManager(configuration: noBreaker, eventLoop: fixture.loop)
        let channel = try other.connection(service: "echo", address: fixture.target)
        for _ in 0..<8 {
            let late = await channel.call([1], metadata: ["x-sleep-ms": "1000"], timeout: .milliseconds(20))
            #expect(late.status.code == .deadlineExceeded)
        }
        let afterDeadlines = await channel.call([3], metadata: Self.failFirst(1, key: "after-deadlines"), timeout: .seconds(5))
        #expect(afterDeadlines.status == .ok, "\(afterDeadlines.status)")
        await other.close(gracePeriod: .seconds(1))
    }

    @Test("a hedged call ended by closing its channel counts for nothing in the breaker, as a single call's end")
    func hedgedLocalEndIsNotAServerFailure() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, first, recorder) = try self.makeTrippingManager(fixture) {
            $0.hedging["echo.Echo"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .seconds(10))
        }
        let ended = PThreadLock<UnaryResponse?>(nil)
        first.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "5000"]) { response in
            ended.withLock { $0 = response }
        }
        #expect(await eventually { await manager.openCalls() == 1 })
        manager.closeConnection(service: "echo")
        #expect(await eventually { ended.withLock { $0 }?.status.code == .unavailable })
        // Counted as the server's failure, that end would have opened the breaker (one failure does here).
        let second = try manager.connection(service: "echo")
        let after = await second.call([2], timeout: .seconds(5))
        #expect(after.status == .ok, "\(after.status)")
        #expect(recorder.count { if case .circuitBreakerStateChanged = $0 { true } else { false } } == 0)
        await manager.close(gracePeriod: .seconds(1))
    }

    /// Fails the calls that carry `x-refuse`, as an authentication interceptor whose token source is down would.
    struct RefuseMarked: CallInterceptor {
        func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
            call.metadata["x-refuse"] == nil ? .proceed : .fail(CallStatus(code: .unauthenticated, message: "no token"))
        }
    }

    @Test("calls refused for an invalid path are counted under method=\"other\", and take no room from real methods")
    func invalidPathsAreNotLabels() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableMetrics = true
        let manager = try ConnectionManager(
            configuration: configuration, metricsFactory: PrometheusMetrics(), eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        // More made-up paths than the table of per-method series has room for.
        for index in 0..<1_001 {
            #expect(await channel.call("bad \(index)", [1], timeout: .seconds(5)).status.code == .invalidArgument)
        }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        var series: [String: Double] = [:]
        #expect(
            await eventually {
                series = Self.parse(manager.metricsText() ?? "")
                return series[#"grpc_client_requests_total{service="echo",method="/echo.Echo/Get",code="OK"}"#] == 1
            })
        #expect(series[#"grpc_client_requests_total{service="echo",method="other",code="INVALID_ARGUMENT"}"#] == 1_001)
        #expect(!series.keys.contains { $0.contains("bad ") }, "no made-up path became a label")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("every call is counted once, also those refused before an attempt: interceptor, invalid, closed channel, hedged")
    func refusedCallsAreCounted() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableMetrics = true
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = true
        configuration.circuitBreaker.failureThreshold = 1
        configuration.hedging["echo.Hedged"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .seconds(10))
        let prometheus = PrometheusMetrics()
        let manager = try ConnectionManager(
            configuration: configuration, metricsFactory: prometheus, interceptors: [RefuseMarked()], eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(await channel.call([1], metadata: ["x-refuse": "1"], timeout: .seconds(5)).status.code == .unauthenticated)
        #expect(await channel.call("no-slash", [1], timeout: .seconds(5)).status.code != .ok)
        manager.closeConnection(service: "echo")
        #expect(await channel.call([1], timeout: .seconds(5)).status.code == .unavailable)
        #expect(await channel.call("/echo.Hedged/Get", [1], timeout: .seconds(5)).status.code == .unavailable)
        // The hedged call on the closed channel was this side's doing: the method's breaker (one failure opens it)
        // stays closed for the channel that replaces it.
        let replacement = try manager.connection(service: "echo")
        let after = await replacement.call("/echo.Hedged/Get", [2], timeout: .seconds(5))
        #expect(after.status == .ok, "\(after.status)")
        func count(_ finished: Bool) -> Int {
            recorder.count {
                switch $0 {
                case .callStarted: !finished
                case .callFinished: finished
                default: false
                }
            }
        }
        #expect(await eventually { count(true) == 6 }, "finished: \(count(true))")
        #expect(count(false) == 6)
        #expect(recorder.count { if case .circuitBreakerStateChanged = $0 { true } else { false } } == 0)
        let text = manager.metricsText() ?? ""
        let total = text.split(separator: "\n").filter { $0.hasPrefix("grpc_client_requests_total{") }
            .compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0, +)
        #expect(total == 6, "\(text)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a graceful close lets a hedged call's attempt on the server finish, though another attempt was waiting")
    func gracefulCloseLetsAHedgedAttemptFinish() async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 1  // the second attempt waits for a stream
        let fixture = try LoopbackFixture(options: options)
        defer { fixture.shutdown() }
        let (manager, channel, _) = try self.makeManager(fixture) {
            $0.hedging["echo.Echo"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(20))
        }
        #expect(await channel.call([0], timeout: .seconds(5)).status == .ok)  // connected: one stream free
        let ended = PThreadLock<UnaryResponse?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "3000", "x-request-key": "hedged"]) {
            response in ended.withLock { $0 = response }
        }
        #expect(await eventually {
            let open = await manager.openCalls()
            return fixture.server.requestCount(key: "hedged") == 1 && open == 2
        })
        // The waiting attempt ends with the close; the one on the server runs to its end, and so the call does.
        await manager.close(gracePeriod: .seconds(5))
        #expect(ended.withLock { $0 }?.status == .ok, "\(String(describing: ended.withLock { $0 }?.status))")
        #expect(ended.withLock { $0 }?.message == [1])
    }

    @Test("method paths from callers do not grow the metrics or the breakers without bound: past 1,000, \"other\"")
    func methodSeriesAreBounded() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableMetrics = true
        configuration.enableRetry = false
        let prometheus = PrometheusMetrics()
        let manager = try ConnectionManager(configuration: configuration, metricsFactory: prometheus, eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let paths = MetricsHandler.maxMethodSeries + 20
        let ledger = CompletionLedger()
        for index in 0..<paths {
            channel.unary(path: "/gateway.Any/M\(index)", request: [1]) { _ in ledger.record(index) }
            if index % 100 == 99 { _ = await eventually { ledger.completed == index + 1 } }
        }
        #expect(await eventually { ledger.completed == paths })
        let text = manager.metricsText() ?? ""
        let methods = Set(
            text.split(separator: "\n").filter { $0.hasPrefix("grpc_client_requests_total{") }.compactMap { line -> Substring? in
                guard let start = line.range(of: "method=\"")?.upperBound, let end = line[start...].firstIndex(of: "\"") else { return nil }
                return line[start..<end]
            })
        #expect(methods.count == MetricsHandler.maxMethodSeries + 1, "\(methods.count) method labels")
        #expect(methods.contains("other"))
        let otherOK = Self.parse(text)[#"grpc_client_requests_total{service="echo",method="other",code="OK"}"#]
        #expect(otherOK == 20, "the last 20 paths are counted under other")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("past the method limit, the breaker series under method=\"other\" shows the worst of the breakers counted there; a long path is no label")
    func breakerSeriesPastTheLimit() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableMetrics = true
        configuration.enableRetry = false
        configuration.circuitBreaker.failureThreshold = 1
        configuration.circuitBreaker.successThreshold = 1
        configuration.circuitBreaker.timeout = .milliseconds(200)
        let manager = try ConnectionManager(
            configuration: configuration, metricsFactory: PrometheusMetrics(), interceptors: [RefuseMarked()],
            eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        // A method path too long to be a label: counted, under "other".
        let long = "/gateway.Any/" + String(repeating: "x", count: MethodPathLimits.maxPathBytes)
        _ = await channel.call(long, [1], timeout: .seconds(5))
        // Methods refused by the interceptor fill the metrics' table of methods; they reach no breaker.
        for index in 0..<MetricsHandler.maxMethodSeries {
            let refused = await channel.call("/gateway.Any/R\(index)", [1], metadata: ["x-refuse": "1"], timeout: .seconds(5))
            #expect(refused.status.code == .unauthenticated)
        }
        // X and Y have breakers of their own, both counted under "other". Both open; Y's closes again after its
        // timeout (its probe succeeds) while X's stays open: the series must say open.
        let failing: CallMetadata = ["x-fail-code": "14"]
        #expect(await channel.call("/gateway.Any/X", [1], metadata: failing, timeout: .seconds(5)).status.code == .unavailable)
        #expect(await channel.call("/gateway.Any/Y", [1], metadata: failing, timeout: .seconds(5)).status.code == .unavailable)
        let series = #"grpc_client_circuit_breaker_state{service="echo",method="other"}"#
        #expect(await eventually { Self.parse(manager.metricsText() ?? "")[series] == 1 })
        #expect(await eventually {
            await channel.call("/gateway.Any/Y", [1], timeout: .seconds(5)).status == .ok
        }, "Y's breaker closes once its timeout has passed")
        let text = manager.metricsText() ?? ""
        #expect(Self.parse(text)[series] == 1, "X's breaker is still open: \(Self.parse(text)[series] ?? -1)")
        #expect(!text.contains("xxxxxxxx"), "the long path is no label")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("paths too long for state of their own share the overflow breaker, as they share the metrics' \"other\"")
    func longPathsShareTheOverflowBreaker() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, channel, recorder) = try self.makeTrippingManager(fixture) { $0.circuitBreaker.timeout = .seconds(30) }
        let long = "/gateway.Any/" + String(repeating: "x", count: MethodPathLimits.maxPathBytes)
        let failed = await channel.call(long + "1", [1], metadata: ["x-fail-code": "14"], timeout: .seconds(5))
        #expect(failed.status.code == .unavailable)
        // Another long path: the same breaker, open now.
        let refused = await channel.call(long + "2", [1], timeout: .seconds(5))
        #expect(refused.status.code == .unavailable && refused.status.message.contains("circuit breaker"), "\(refused.status)")
        #expect(await eventually {
            recorder.all.contains {
                if case .circuitBreakerStateChanged(_, let path, _, .open) = $0 { return path == "other" }
                return false
            }
        }, "its change is published as other's")
        // A method of its own is not touched.
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("an attempt ended from outside (the deadline, a cancel) is reported with its number, not 0")
    func abandonedAttemptsKeepTheirNumber() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let slow: CallMetadata = ["x-sleep-ms": "3000"]
        let timedOut = await channel.call([1], metadata: slow, timeout: .milliseconds(100))
        #expect(timedOut.status.code == .deadlineExceeded)
        let handle = channel.unary(path: "/echo.Echo/Get", request: [2], metadata: slow) { _ in }
        try await Task.sleep(nanoseconds: 100_000_000)
        handle.cancel()
        let ended = await eventuallyValue { () -> [(StatusCode, Int)]? in
            let attempts = recorder.all.compactMap { event -> (StatusCode, Int)? in
                if case .attemptFinished(_, _, let status, let attempt) = event { return (status.code, attempt) }
                return nil
            }
            return attempts.count == 2 ? attempts : nil
        }
        #expect(ended.map(\.0) == [.deadlineExceeded, .cancelled])
        #expect(ended.map(\.1) == [1, 1])
        await manager.close(gracePeriod: .seconds(1))
    }
}

/// Polls until `produce` returns a value (or 5 s pass, then returns its last try, forced).
func eventuallyValue<T>(timeout: Double = 5, _ produce: () -> T?) async -> T {
    let end = now() + timeout
    while now() < end {
        if let value = produce() { return value }
        try? await Task.sleep(nanoseconds: 10_000_000)
    }
    return produce()!
}

/// A request-scoped value, as a server framework would keep it.
enum RequestTenant {
    @TaskLocal static var current: String?
}
