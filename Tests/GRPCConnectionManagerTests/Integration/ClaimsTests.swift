import Foundation
import GRPCConnectionManagerPrometheus
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// A resolver whose answers a test scripts: each lookup takes the next answer; the last one repeats.
final class ScriptedResolver: BlockingAddressResolver {
    private let answers: PThreadLock<[[NetworkAddress]]>
    private let lookups = Atomic<Int>(0)

    init(_ answers: [[NetworkAddress]]) { self.answers = PThreadLock(answers) }

    var count: Int { self.lookups.load(ordering: .acquiring) }

    func resolve(_ target: Target) -> Result<[NetworkAddress], CallStatus> {
        self.lookups.add(1, ordering: .acquiringAndReleasing)
        return .success(self.answers.withLock { answers in answers.count > 1 ? answers.removeFirst() : answers[0] })
    }
}

/// The README's claims that no other test forces, each against a real peer: the embedded server (taught to refuse
/// streams, to send GOAWAY below a stream, to report the grpc-timeout it received), the scripted HTTP/2 peer, or the
/// kernel's own socket state.
@Suite("Claims the README makes", .serialized)
struct ClaimsTests {
    static func keyed(_ key: String, _ pairs: [(String, String)]) -> CallMetadata {
        var metadata = CallMetadata()
        metadata.add("x-request-key", key)
        for (name, value) in pairs { metadata.add(name, value) }
        return metadata
    }

    // MARK: transparent retry

    /// gRFC A6: a stream the server library refused before the application saw it gets one transparent retry; a
    /// second refusal counts against the retry policy (here off), so the call ends UNAVAILABLE.
    @Test("a stream the server refused (REFUSED_STREAM) is retried once transparently, even with retry off")
    func transparentRetryOfRefusedStream() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        let channel = try fixture.channel(configuration)
        let response = await channel.call(
            "/test.Raw/Get", [7], metadata: Self.keyed("refused", [("x-refuse-first", "1")]), timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.message == [7])
        #expect(fixture.server.requestCount(key: "refused") == 2, "one refused attempt, then the one answered")
        let twice = await channel.call(
            "/test.Raw/Get", [7], metadata: Self.keyed("twice", [("x-refuse-first", "2")]), timeout: .seconds(5))
        #expect(twice.status.code == .unavailable)
        #expect(twice.status.message.contains("REFUSED_STREAM"))
        #expect(fixture.server.requestCount(key: "twice") == 2, "one transparent retry, no more")

        // With retry on, the second refusal is the policy's to judge (UNAVAILABLE is retryable): a third attempt,
        // after a backoff, which the server answers.
        var retrying = Configuration()
        retrying.enableCircuitBreaker = false
        let policyChannel = try fixture.channel(retrying)
        let recorder = EventRecorder()
        policyChannel.events.subscribe { recorder.record($0) }
        let third = await policyChannel.call(
            "/test.Raw/Get", [8], metadata: Self.keyed("thrice", [("x-refuse-first", "2")]), timeout: .seconds(5))
        #expect(third.status == .ok, "\(third.status)")
        #expect(fixture.server.requestCount(key: "thrice") == 3, "refused, refused again, answered")
        #expect(recorder.count { if case .retryScheduled = $0 { true } else { false } } == 1, "one retry by policy")
    }

    @Test("a stream above a GOAWAY's last stream id is retried on a new connection; the one below it finishes")
    func transparentRetryAboveGoAway() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        let channel = try fixture.channel(configuration)
        let ledger = CompletionLedger()
        // Stream 1: a slow call the server processes. Stream 3: refused by a GOAWAY whose last stream id is 1.
        async let slow = channel.call(
            "/test.Raw/Get", [1], metadata: Self.keyed("slow", [("x-sleep-ms", "300")]), timeout: .seconds(5),
            ledger: ledger, id: 1)
        #expect(await eventually { fixture.server.requestCount(key: "slow") == 1 })
        let refused = await channel.call(
            "/test.Raw/Get", [3], metadata: Self.keyed("above", [("x-goaway-first", "1")]), timeout: .seconds(5),
            ledger: ledger, id: 3)
        #expect(refused.status == .ok, "\(refused.status)")
        #expect(refused.message == [3])
        let slowResponse = await slow
        #expect(slowResponse.status == .ok)
        #expect(slowResponse.message == [1])
        #expect(fixture.server.requestCount(key: "above") == 2)
        #expect(fixture.server.requestsPerConnection() == [2, 1], "the retry went to a second connection")
        #expect(ledger.completed == 2 && ledger.duplicates == 0)
    }

    @Test("a server-streaming call that fails before its headers is retried by policy and streams in full")
    func retriedServerStreamingBeforeHeaders() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let call = channel.serverStreaming(
            path: "/test.Stream/Expand", request: Array("one two three".utf8),
            metadata: Self.keyed("expand", [("x-fail-first", "1")]), options: RequestOptions(timeout: .seconds(5)))
        var received: [String] = []
        for try await message in call.responses { received.append(String(decoding: message, as: UTF8.self)) }
        #expect(received == ["one", "two", "three"])
        #expect(await call.result().status == .ok)
        #expect(fixture.server.requestCount(key: "expand") == 2)
    }

    // MARK: what reaches the server

    @Test("the client's SETTINGS keep push off and do not give up RFC 7540 priorities (nghttp2's RFC 9218 scheduling sends a client's streams one after another)")
    func settingsKeepPushOffAndPriorities() async throws {
        let peer = try ScriptedPeer("echo")
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try GRPCChannel(target: peer.target, eventLoop: fixture.loop)
        #expect(await channel.call([7], timeout: .seconds(5)).status == .ok)
        // The peer reports from its own thread: its line may reach us after the call has ended.
        #expect(await eventually { peer.events.contains { $0.hasPrefix("settings ") } })
        let settings = try #require(peer.events.first { $0.hasPrefix("settings ") })
        #expect(!settings.split(separator: " ").contains { $0.hasPrefix("9=") }, "\(settings)")
        #expect(settings.split(separator: " ").contains("2=0"), "push stays off: \(settings)")
    }

    @Test("grpc-timeout reaches the server: what it received is within the call's deadline")
    func grpcTimeoutReachesTheServer() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let response = await channel.call("/test.Raw/Get", [1], timeout: .seconds(5))
        #expect(response.status == .ok)
        let received = try #require(response.initialMetadata["x-received-grpc-timeout"])
        let nanoseconds = try #require(GRPCTimeout.decode(received))
        #expect(nanoseconds <= 5_000_000_000 && nanoseconds > 4_000_000_000, "\(received)")
        let unbounded = await channel.call("/test.Raw/Get", [1])
        #expect(unbounded.initialMetadata["x-received-grpc-timeout"] == nil, "no deadline, no grpc-timeout")
    }

    @Test("connectionsPerTarget opens that many connections and spreads concurrent calls over them")
    func connectionsPerTargetSpreads() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.connectionsPerTarget = 3
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await eventually {
            recorder.count { if case .connectAttemptSucceeded = $0 { return true } else { return false } } == 3
        })
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<30 {
                group.addTask {
                    _ = await channel.call("/test.Raw/Get", [UInt8(index)], metadata: ["x-sleep-ms": "100"], timeout: .seconds(5))
                }
            }
        }
        let perConnection = fixture.server.requestsPerConnection()
        #expect(perConnection.count == 3, "\(perConnection)")
        #expect(perConnection.allSatisfy { $0 >= 5 }, "least-loaded spreads 30 concurrent calls: \(perConnection)")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("TCP_USER_TIMEOUT on the client's socket equals keepAliveTimeout, in milliseconds rounded up (0 would be the system's 15 minutes)",
        arguments: [(Duration.milliseconds(4321), UInt32(4321)), (.microseconds(500), 1), (.seconds(Int64.max), UInt32(Int32.max))])
    func tcpUserTimeoutIsSet(_ keepAliveTimeout: Duration, _ expected: UInt32) async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.keepAliveTimeout = keepAliveTimeout
        let channel = try fixture.channel(configuration)
        #expect(await channel.call("/test.Raw/Get", [1], timeout: .seconds(5)).status == .ok)
        // The kernel's view: every TCP socket of this process whose peer is the server's port.
        var timeouts: [UInt32] = []
        for fd in Int32(3)..<Int32(4096) {
            var peer = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let named = withUnsafeMutablePointer(to: &peer) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
            }
            guard named == 0, peer.sin_family == sa_family_t(AF_INET),
                Int(UInt16(bigEndian: peer.sin_port)) == fixture.server.port
            else { continue }
            var value: UInt32 = 0
            var size = socklen_t(MemoryLayout<UInt32>.size)
            if getsockopt(fd, Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, &value, &size) == 0 { timeouts.append(value) }
        }
        #expect(timeouts == [expected], "one client socket, its TCP_USER_TIMEOUT in ms: \(timeouts)")
    }

    // MARK: resolution

    @Test("a connection failure makes the pool resolve again, and calls move to the address it learns")
    func reResolvesAfterConnectionFailure() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let dead = try #require(NetworkAddress(ip: "127.0.0.1", port: freePort()))
        let live = try #require(NetworkAddress(ip: "127.0.0.1", port: fixture.server.port))
        let resolver = ScriptedResolver([[dead], [live]])
        let channel = try GRPCChannel(target: "backend.test:50051", eventLoop: fixture.loop, resolver: resolver)
        let response = await withCheckedContinuation { continuation in
            channel.unary(
                path: "/test.Raw/Get", request: [9], options: RequestOptions(timeout: .seconds(10), waitForReady: true)
            ) { continuation.resume(returning: $0) }
        }
        #expect(response.status == .ok, "\(response.status)")
        #expect(resolver.count >= 2)
        let addresses = await onReactor(fixture.loop.reactor) { channel.pool.subchannelAddresses }
        #expect(addresses == ["\(live)"], "the address no longer resolved is gone")
    }

    @Test("periodic re-resolution: a backend that moves is followed without a failed call")
    func periodicReResolution() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let second = try EchoServer(eventLoop: fixture.loop)
        defer { second.close() }
        let first = try #require(NetworkAddress(ip: "127.0.0.1", port: fixture.server.port))
        let moved = try #require(NetworkAddress(ip: "127.0.0.1", port: second.port))
        let resolver = ScriptedResolver([[first], [moved]])
        var configuration = Configuration()
        configuration.resolutionInterval = .milliseconds(200)
        configuration.minimumResolutionInterval = .zero
        let channel = try GRPCChannel(
            target: "moving.test:50051", configuration: configuration, eventLoop: fixture.loop, resolver: resolver)
        #expect(await channel.call("/test.Raw/Get", [1], timeout: .seconds(5)).status == .ok)
        #expect(fixture.server.requestsPerConnection() == [1])
        // No failure, no GOAWAY: only the period makes the pool ask again.
        #expect(await eventually { await onReactor(fixture.loop.reactor) { channel.pool.subchannelAddresses } == ["\(moved)"] })
        for index in 0..<5 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        #expect(second.requestsPerConnection().reduce(0, +) == 5)
        #expect(fixture.server.requestsPerConnection().reduce(0, +) == 1)
    }

    @Test("a GOAWAY makes the pool resolve again, and the next calls go where the name points now")
    func reResolvesOnGoAway() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let second = try EchoServer(eventLoop: fixture.loop)
        defer { second.close() }
        let first = try #require(NetworkAddress(ip: "127.0.0.1", port: fixture.server.port))
        let moved = try #require(NetworkAddress(ip: "127.0.0.1", port: second.port))
        let resolver = ScriptedResolver([[first], [moved]])
        var configuration = Configuration()
        configuration.resolutionInterval = .zero  // no period: only the GOAWAY may cause the second lookup
        configuration.minimumResolutionInterval = .zero
        let channel = try GRPCChannel(
            target: "draining.test:50051", configuration: configuration, eventLoop: fixture.loop, resolver: resolver)
        #expect(await channel.call("/test.Raw/Get", [1], timeout: .seconds(5)).status == .ok)
        #expect(resolver.count == 1)
        fixture.server.goAway()
        #expect(await eventually { resolver.count == 2 })
        #expect(await eventually { await onReactor(fixture.loop.reactor) { channel.pool.subchannelAddresses } == ["\(moved)"] })
        #expect(await channel.call("/test.Raw/Get", [2], timeout: .seconds(5)).status == .ok)
        #expect(second.requestsPerConnection() == [1])
    }

    @Test("every resolved address gets a subchannel, and calls reach each of them")
    func usesEveryResolvedAddress() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let second = try EchoServer(eventLoop: fixture.loop)
        defer { second.close() }
        let addresses = [
            try #require(NetworkAddress(ip: "127.0.0.1", port: fixture.server.port)),
            try #require(NetworkAddress(ip: "127.0.0.1", port: second.port)),
        ]
        let channel = try GRPCChannel(
            target: "backends.test:50051", eventLoop: fixture.loop, resolver: ScriptedResolver([addresses]))
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        channel.connect()
        #expect(await eventually {
            recorder.count { if case .connectAttemptSucceeded = $0 { return true } else { return false } } == 2
        }, "both addresses connect")
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<20 {
                group.addTask {
                    _ = await channel.call("/test.Raw/Get", [UInt8(index)], metadata: ["x-sleep-ms": "100"], timeout: .seconds(5))
                }
            }
        }
        let subchannels = await onReactor(fixture.loop.reactor) { channel.pool.subchannelAddresses }
        #expect(Set(subchannels) == Set(addresses.map { "\($0)" }))
        #expect(fixture.server.requestsPerConnection().reduce(0, +) > 0)
        #expect(second.requestsPerConnection().reduce(0, +) > 0)
    }

    // MARK: the bus

    @Test("unsubscribe: the handler hears nothing after it returns; other handlers still do")
    func unsubscribeStopsEvents() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let gone = EventRecorder()
        let staying = EventRecorder()
        let token = manager.events.subscribe { gone.record($0) }
        manager.events.subscribe { staying.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let finished: (ConnectionEvent) -> Bool = { if case .callFinished = $0 { return true } else { return false } }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(await eventually { gone.count(where: finished) == 1 })
        manager.events.unsubscribe(token)
        for _ in 0..<3 { #expect(await channel.call([1], timeout: .seconds(5)).status == .ok) }
        #expect(await eventually { staying.count(where: finished) == 4 })
        #expect(gone.count(where: finished) == 1)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("unsubscribe while the loop stops: it returns only after a dispatch to the handler under way has ended")
    func unsubscribeWhileStopping() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: fixture.target, configuration: .defaults, eventLoop: loop)
        let steps = PThreadLock<[String]>([])
        @Sendable func happened(_ step: String) -> Bool { steps.withLock { $0.contains(step) } }
        let token = channel.events.subscribe { event in
            guard case .callFinished = event, !happened("stopping") else { return }
            // From the loop's thread this only stops the loop: it finishes once this handler returns.
            loop.shutdown()
            steps.withLock { $0.append("stopping") }
            // Still in the handler when another thread unsubscribes: that must not return before this does (the
            // old version returned at once when the loop was no longer running).
            _ = waitFor(seconds: 10) { happened("unsubscribing") }
            _ = waitFor(seconds: 0.3) { happened("unsubscribed") }
            steps.withLock { $0.append("handler returns") }
        }
        // Not awaited here: its completion runs after its events, so after the handler.
        let call = Task { await channel.call([1], timeout: .seconds(5)) }
        #expect(await eventually(timeout: 10) { happened("stopping") })
        let unsubscriber = Task.detached {
            steps.withLock { $0.append("unsubscribing") }
            channel.events.unsubscribe(token)
            steps.withLock { $0.append("unsubscribed") }
        }
        await unsubscriber.value
        #expect(steps.withLock { $0 } == ["stopping", "unsubscribing", "handler returns", "unsubscribed"])
        #expect(await call.value.status == .ok)
    }

    // MARK: the breaker end to end

    @Test("failure-rate mode opens at the rate, with no two failures in a row, and refuses without a network call")
    func failureRateBreaker() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.circuitBreaker.mode = .failureRate
        configuration.circuitBreaker.slidingWindow = .count(4)
        configuration.circuitBreaker.minimumNumberOfCalls = 4
        configuration.circuitBreaker.failureRateThreshold = 0.5
        let channel = try fixture.channel(configuration)
        for index in 0..<4 {
            let metadata: CallMetadata = index % 2 == 1 ? ["x-fail-code": "14"] : [:]
            _ = await channel.call("/test.Raw/Get", [1], metadata: metadata, timeout: .seconds(5))
        }
        let refused = await channel.call(
            "/test.Raw/Get", [1], metadata: Self.keyed("after-open", []), timeout: .seconds(5))
        #expect(refused.status == CallStatus(code: .unavailable, message: "circuit breaker is open"))
        #expect(fixture.server.requestCount(key: "after-open") == 0)
    }

    @Test("slow calls count as failures: successful calls slower than the threshold open the breaker")
    func slowCallsOpenTheBreaker() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.circuitBreaker.mode = .failureRate
        configuration.circuitBreaker.slidingWindow = .count(3)
        configuration.circuitBreaker.minimumNumberOfCalls = 3
        configuration.circuitBreaker.slowCallDurationThreshold = .milliseconds(50)
        let channel = try fixture.channel(configuration)
        for _ in 0..<3 {
            #expect(await channel.call("/test.Raw/Get", [1], metadata: ["x-sleep-ms": "120"], timeout: .seconds(5)).status == .ok)
        }
        let refused = await channel.call("/test.Raw/Get", [1], timeout: .seconds(5))
        #expect(refused.status == CallStatus(code: .unavailable, message: "circuit breaker is open"))
    }

    // MARK: metrics and health

    @Test("metrics: connect failures, keepalive timeouts, GOAWAYs, received bytes and attempts per call are counted")
    func metricsNeverAssertedBefore() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let deaf = try ScriptedPeer("no-ping-ack")
        defer { deaf.stop() }
        let prometheus = PrometheusMetrics()
        var configuration = Configuration()
        configuration.enableMetrics = true
        configuration.enableCircuitBreaker = false
        configuration.retry.throttling = nil
        configuration.keepAliveTime = .milliseconds(200)
        configuration.keepAliveTimeout = .milliseconds(200)
        let manager = try ConnectionManager(configuration: configuration, metricsFactory: prometheus, eventLoop: fixture.loop)
        let echo = try manager.connection(service: "echo", address: fixture.target)
        let dead = try manager.connection(service: "dead", address: "127.0.0.1:\(freePort())")
        let quiet = try manager.connection(service: "deaf", address: deaf.target)

        // Received bytes: raw echoes of 3 and 4 bytes; attempts: one call tried once, one tried three times.
        #expect(await echo.call("/test.Raw/Get", [1, 2, 3], timeout: .seconds(5)).status == .ok)
        let retried = await echo.call(
            "/test.Raw/Get", [4, 5, 6, 7], metadata: Self.keyed("m", [("x-fail-first", "2")]), timeout: .seconds(5))
        #expect(retried.status == .ok)
        #expect(await dead.call([1], timeout: .seconds(2)).status.code == .unavailable)
        #expect(await quiet.call("/test.Raw/Get", [1], timeout: .seconds(2)).status == .ok)
        fixture.server.goAway()

        let echoLabels = #"service="echo",method="/test.Raw/Get""#
        let expected: [String: Double] = [
            #"grpc_client_received_bytes_total{service="echo"}"#: 7,  // message bytes, as sent bytes count
            #"grpc_client_sent_bytes_total{service="echo"}"#: 3 + 3 * 4,
            #"grpc_client_attempts_per_call_count{\#(echoLabels)}"#: 2,
            #"grpc_client_attempts_per_call_sum{\#(echoLabels)}"#: 4,
            #"grpc_client_goaways_total{service="echo",code="NO_ERROR"}"#: 1,
        ]
        var series: [String: Double] = [:]
        let complete = await eventually(timeout: 10) {
            series = HandlerIntegrationTests.parse(manager.metricsText() ?? "")
            return expected.allSatisfy { series[$0.key] == $0.value }
                && (series[#"grpc_client_connect_failures_total{service="dead"}"#] ?? 0) >= 1
                && (series[#"grpc_client_keepalive_timeouts_total{service="deaf"}"#] ?? 0) >= 1
        }
        #expect(complete, "\(series.filter { $0.key.contains("echo") || $0.key.contains("dead") || $0.key.contains("deaf") })")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("the health map names a failing service's error")
    func healthMapCarriesTheError() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let manager = try ConnectionManager(eventLoop: loop)
        _ = try manager.connection(service: "dead", address: "127.0.0.1:\(freePort())")
        var health: ConnectionManager.ServiceHealth?
        #expect(await eventually {
            health = await manager.healthCheck()["dead"]
            return health?.state == "TRANSIENT_FAILURE"
        })
        #expect(health?.healthy == false)
        #expect(health?.error?.lowercased().contains("refused") == true, "\(String(describing: health))")
        await manager.close(gracePeriod: .seconds(1))
    }
}
