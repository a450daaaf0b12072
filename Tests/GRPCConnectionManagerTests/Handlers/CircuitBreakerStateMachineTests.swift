import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// The breaker with a fake clock: no sleeps.
@Suite("CircuitBreakerStateMachine")
struct CircuitBreakerStateMachineTests {
    static let second: UInt64 = 1_000_000_000

    /// Feeds "s" (success), "f" (failure) and "+N" (advance N seconds, then acquire); returns the states seen.
    static func run(_ script: [String], configuration: CircuitBreakerConfiguration = CircuitBreakerConfiguration())
        -> (states: [String], permits: [Bool])
    {
        var machine = CircuitBreakerStateMachine(configuration: configuration)
        var now: UInt64 = 1_000 * Self.second
        var states: [String] = []
        var permits: [Bool] = []
        for step in script {
            if step.hasPrefix("+") {
                now += UInt64(Int(step.dropFirst())!) * Self.second
                continue
            }
            let permitted = machine.acquire(now: now).permitted
            permits.append(permitted)
            if permitted {
                _ = machine.record(step == "f" ? .failure : .success, now: now)
            }
            states.append("\(machine.state)")
        }
        return (states, permits)
    }

    @Test("the original: 5 failures open it; open rejects; after the timeout a probe; 2 successes close it")
    func originalTransitions() {
        let (states, permits) = Self.run(["f", "f", "f", "f", "f", "s", "+29", "s", "+1", "s", "s", "s"])
        #expect(states == ["CLOSED", "CLOSED", "CLOSED", "CLOSED", "OPEN", "OPEN", "OPEN", "HALF_OPEN", "CLOSED", "CLOSED"])
        #expect(permits == [true, true, true, true, true, false, false, true, true, true])
    }

    @Test("a failure in half-open opens it again for another timeout")
    func halfOpenFailureReopens() {
        let (states, permits) = Self.run(["f", "f", "f", "f", "f", "+30", "f", "s", "+30", "s", "s"])
        #expect(states == ["CLOSED", "CLOSED", "CLOSED", "CLOSED", "OPEN", "OPEN", "OPEN", "HALF_OPEN", "CLOSED"])
        #expect(permits == [true, true, true, true, true, true, false, true, true])
    }

    @Test("a success resets the consecutive count; only the failure codes count")
    func successResetsAndCodesClassify() {
        let (states, _) = Self.run(["f", "f", "f", "f", "s", "f", "f", "f", "f"])
        #expect(states.allSatisfy { $0 == "CLOSED" })
        let machine = CircuitBreakerStateMachine(configuration: CircuitBreakerConfiguration())
        for code in [StatusCode.unavailable, .deadlineExceeded, .resourceExhausted] {
            #expect(machine.classify(code, duration: .zero) == .failure)
        }
        for code in [StatusCode.ok, .invalidArgument, .notFound, .internal, .unknown, .cancelled, .aborted] {
            #expect(machine.classify(code, duration: .zero) == .success)
        }
    }

    @Test("configured failure codes classify exactly, codes outside gRPC's range included")
    func configuredFailureCodes() {
        var configuration = CircuitBreakerConfiguration()
        configuration.failureCodes = [.ok, .internal, .unauthenticated, StatusCode(rawValue: 42)]
        let machine = CircuitBreakerStateMachine(configuration: configuration)
        for raw in -1...64 {
            let code = StatusCode(rawValue: raw)
            let expected: CircuitBreakerStateMachine.Outcome =
                configuration.failureCodes.contains(code) ? .failure : .success
            #expect(machine.classify(code, duration: .zero) == expected, "\(code)")
        }
    }

    @Test("slow calls count as failures when a threshold is set")
    func slowCalls() {
        var configuration = CircuitBreakerConfiguration()
        configuration.slowCallDurationThreshold = .milliseconds(500)
        let machine = CircuitBreakerStateMachine(configuration: configuration)
        #expect(machine.classify(.ok, duration: .milliseconds(501)) == .failure)
        #expect(machine.classify(.ok, duration: .milliseconds(499)) == .success)
    }

    @Test("callEnded counts exactly what classify says, on its fast path for successes too")
    func callEndedAgreesWithClassify() {
        var codes = CircuitBreakerConfiguration()
        codes.failureCodes = [.ok, .internal, StatusCode(rawValue: 42)]
        var slow = CircuitBreakerConfiguration()
        slow.slowCallDurationThreshold = .milliseconds(500)
        for var configuration in [CircuitBreakerConfiguration(), codes, slow] {
            configuration.failureThreshold = 1  // one failure opens: the state shows how the call was counted
            for raw in -1...64 {
                for duration in [Duration.zero, .milliseconds(501)] {
                    var machine = CircuitBreakerStateMachine(configuration: configuration)
                    let expected = machine.classify(StatusCode(rawValue: raw), duration: duration)
                    _ = machine.callEnded(
                        StatusCode(rawValue: raw), duration: duration, probe: false, epoch: machine.epoch, now: 1)
                    #expect(machine.state == (expected == .failure ? .open : .closed), "code \(raw), \(duration)")
                }
            }
        }
    }

    @Test("failure rate over a count window opens once the minimum number of calls is in")
    func failureRateCountWindow() {
        var configuration = CircuitBreakerConfiguration()
        configuration.mode = .failureRate
        configuration.failureRateThreshold = 0.5
        configuration.minimumNumberOfCalls = 4
        configuration.slidingWindow = .count(4)
        // 3 calls with 2 failures: below the minimum. The 4th (2 of 4 failed = 50 %) opens it.
        #expect(Self.run(["f", "s", "f", "s"], configuration: configuration).states == ["CLOSED", "CLOSED", "CLOSED", "OPEN"])
        // The window slides: old failures drop out.
        #expect(Self.run(["f", "s", "s", "s", "s", "s", "f"], configuration: configuration).states.last == "CLOSED")
    }

    @Test("failure rate over a time window forgets outcomes older than the window")
    func failureRateTimeWindow() {
        var configuration = CircuitBreakerConfiguration()
        configuration.mode = .failureRate
        configuration.failureRateThreshold = 0.6
        configuration.minimumNumberOfCalls = 3
        configuration.slidingWindow = .time(seconds: 10)
        #expect(Self.run(["f", "f", "+11", "s", "s", "f"], configuration: configuration).states.last == "CLOSED")
        #expect(Self.run(["f", "f", "+5", "f"], configuration: configuration).states.last == "OPEN")
    }

    @Test("the sliding windows' running totals match a recount of the outcomes inside the window, step by step")
    func slidingWindowTotalsMatchARecount() {
        var random = SeededGenerator(seed: 7)
        for kind in [.count(1), .count(5), .count(64), .time(seconds: 1), .time(seconds: 3), .time(seconds: 120)]
            as [CircuitBreakerConfiguration.SlidingWindowKind]
        {
            var window = SlidingWindow(kind)
            var outcomes: [(at: UInt64, failed: Bool)] = []
            var now: UInt64 = 1_000_000_000
            for step in 0..<3_000 {
                // Bursts within a second, gaps of several seconds, and whole windows of silence.
                now += [0, 10_000_000, 400_000_000, 2_500_000_000, 130_000_000_000][Int.random(in: 0..<5, using: &random)]
                let failed = Bool.random(using: &random)
                window.record(failed: failed, now: now)
                outcomes.append((now, failed))
                // Read later than the record too, as the breaker may (a bucket can expire between the two).
                let readAt = now + (step % 7 == 0 ? 1_500_000_000 : 0)
                let inside: [(at: UInt64, failed: Bool)]
                switch kind {
                case .count(let size): inside = Array(outcomes.suffix(size))
                case .time(let seconds):
                    inside = outcomes.filter { readAt / 1_000_000_000 - $0.at / 1_000_000_000 < UInt64(seconds) }
                }
                let expected = (inside.count, inside.filter(\.failed).count)
                let counted = window.counts(now: readAt)
                #expect(counted == expected, "\(kind) step \(step)")
                if counted != expected { break }
            }
        }
    }

    @Test("half-open admits at most permittedCallsInHalfOpen concurrent probes")
    func halfOpenProbeLimit() {
        var configuration = CircuitBreakerConfiguration()
        configuration.failureThreshold = 1
        configuration.permittedCallsInHalfOpen = 2
        var machine = CircuitBreakerStateMachine(configuration: configuration)
        _ = machine.acquire(now: 0)
        _ = machine.record(.failure, now: 0)
        #expect(machine.state == .open)
        let later = 31 * Self.second
        let first = machine.acquire(now: later)
        #expect(first.permitted && first.changed?.to == .halfOpen)
        #expect(machine.acquire(now: later).permitted)
        #expect(!machine.acquire(now: later).permitted, "a third concurrent probe fails fast")
        _ = machine.record(.success, now: later)
        #expect(machine.acquire(now: later).permitted, "a finished probe frees its slot")
    }
    @Test("outcomes of calls admitted before the breaker opened are not half-open probes")
    func olderOutcomesAreNotProbes() {
        var configuration = CircuitBreakerConfiguration()
        configuration.failureThreshold = 1
        configuration.successThreshold = 1
        var machine = CircuitBreakerStateMachine(configuration: configuration)
        let early = machine.acquire(now: 0)  // admitted while CLOSED
        let failing = machine.acquire(now: 0)
        _ = machine.record(.failure, probe: failing.probe, epoch: failing.epoch, now: 0)
        #expect(machine.state == .open)
        let probe = machine.acquire(now: 31 * Self.second)
        #expect(probe.permitted && probe.probe)
        // The early call ends now, successfully: it says nothing about the server after the breaker opened.
        #expect(machine.record(.success, probe: early.probe, epoch: early.epoch, now: 31 * Self.second) == nil)
        #expect(machine.state == .halfOpen)
        #expect(!machine.acquire(now: 31 * Self.second).permitted, "the probe's slot is still taken")
        _ = machine.record(.success, probe: probe.probe, epoch: probe.epoch, now: 31 * Self.second)
        #expect(machine.state == .closed)
    }

    @Test("a probe the client cancelled is not a success: it frees its slot and decides nothing")
    func cancelledProbeDecidesNothing() {
        var configuration = CircuitBreakerConfiguration()
        configuration.failureThreshold = 1
        configuration.successThreshold = 1
        var machine = CircuitBreakerStateMachine(configuration: configuration)
        let first = machine.acquire(now: 0)
        _ = machine.record(.failure, probe: first.probe, epoch: first.epoch, now: 0)
        let probe = machine.acquire(now: 31 * Self.second)
        #expect(probe.probe)
        machine.release(probe: probe.probe, epoch: probe.epoch)
        #expect(machine.state == .halfOpen, "a cancel closes nothing")
        let next = machine.acquire(now: 31 * Self.second)
        #expect(next.permitted && next.probe, "the slot is free for the next probe")
        _ = machine.record(.failure, probe: next.probe, epoch: next.epoch, now: 31 * Self.second)
        #expect(machine.state == .open)
    }
}


@Suite("CallRetryPolicy")
struct RetryPolicyTests {
    @Test("full-jitter backoff: uniform in [0, min(100 ms x 2^(n-1), 3 s)]")
    func backoff() {
        let policy = CallRetryPolicy()
        #expect(policy.backoff(retry: 1, unit: 1) == .milliseconds(100))
        #expect(policy.backoff(retry: 2, unit: 1) == .milliseconds(200))
        #expect(policy.backoff(retry: 3, unit: 0.5) == .milliseconds(200))
        #expect(policy.backoff(retry: 10, unit: 1) == .seconds(3))
        #expect(policy.backoff(retry: 1, unit: 0) == .zero)
    }

    @Test("the throttle stops retries at half the tokens and lets them resume")
    func throttle() {
        var bucket = RetryThrottle(RetryThrottling())
        #expect(bucket.retriesAllowed)
        for _ in 0..<5 { bucket.recordFailure() }
        #expect(!bucket.retriesAllowed, "5 of 10 left: not more than half")
        bucket.recordSuccess()
        #expect(bucket.retriesAllowed, "5.1 of 10")
        // A ratio of three decimals counts exactly, whatever binary floating point makes of it.
        var ratio = RetryThrottling()
        ratio.tokenRatio = 1.001
        var exact = RetryThrottle(ratio)
        exact.recordFailure()
        exact.recordFailure()
        exact.recordSuccess()
        #expect(exact.tokensMilli == 9_001)
    }

    @Test("the retry handler's throttles: successes refill only charged ones, across drains and refills and services")
    func throttlesThroughTheHandler() {
        let retry = RetryHandler(configuration: RetrySettings())
        let ok = CallStatus(code: .ok, message: "")
        let failed = CallStatus(code: .unavailable, message: "down")
        let path = "/echo.Echo/Unary"
        #expect(retry.throttleTokens(service: "a") == 10_000, "never charged: full")
        retry.attemptEnded(service: "a", path: path, status: ok, trailers: [:])
        #expect(retry.throttleTokens(service: "a") == 10_000)
        for round in 0..<2 {
            // Drained below half, then refilled to full by successes (0.1 each), twice: the second drain is counted
            // as the first was, and a full throttle stops changing.
            for _ in 0..<6 { retry.attemptEnded(service: "a", path: path, status: failed, trailers: [:]) }
            #expect(retry.throttleTokens(service: "a") == 4_000, "round \(round)")
            retry.attemptEnded(service: "b", path: path, status: failed, trailers: [:])
            for _ in 0..<70 { retry.attemptEnded(service: "a", path: path, status: ok, trailers: [:]) }
            #expect(retry.throttleTokens(service: "a") == 10_000, "round \(round)")
            #expect(retry.throttleTokens(service: "b") == 9_000, "round \(round): a's successes are not b's")
            for _ in 0..<10 { retry.attemptEnded(service: "b", path: path, status: ok, trailers: [:]) }
            #expect(retry.throttleTokens(service: "b") == 10_000, "round \(round)")
        }
        // A code the policy does not retry charges nothing.
        let invalid = CallStatus(code: .invalidArgument, message: "")
        retry.attemptEnded(service: "a", path: path, status: invalid, trailers: [:])
        #expect(retry.throttleTokens(service: "a") == 10_000)
        // ... unless the server said "do not retry" (gRFC A6 and grpc-go count that as a failure, whatever the code).
        retry.attemptEnded(service: "a", path: path, status: invalid, trailers: ["grpc-retry-pushback-ms": "-1"])
        #expect(retry.throttleTokens(service: "a") == 9_000)
        retry.attemptEnded(service: "a", path: path, status: invalid, trailers: ["grpc-retry-pushback-ms": "10"])
        #expect(retry.throttleTokens(service: "a") == 9_000, "a pushback with a delay is not a refusal")
    }

    @Test(
        "pushback: a delay, or stop on negative, malformed or repeated values",
        arguments: [
            (["250"], RetryPushback.after(.milliseconds(250))), (["0"], .after(.zero)), (["-1"], .stop), (["abc"], .stop),
            (["01"], .stop), (["1", "2"], .stop), ([], .none),
        ] as [([String], RetryPushback)])
    func pushback(values: [String], expected: RetryPushback) {
        #expect(RetryPushback(values.map { .string($0) }) == expected)
    }

    @Test("per-method overrides: exact method, then service, then the default")
    func perMethod() {
        var retry = Configuration.Retry()
        var once = CallRetryPolicy()
        once.maxAttempts = 1
        var five = CallRetryPolicy()
        five.maxAttempts = 5
        retry.perMethod = ["/a.B/C": once, "/a.B/": five]
        #expect(retry.policy(for: "/a.B/C").maxAttempts == 1)
        #expect(retry.policy(for: "/a.B/D").maxAttempts == 5)
        #expect(retry.policy(for: "/x.Y/Z").maxAttempts == 3)
    }
}
