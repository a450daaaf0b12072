import Foundation
import GRPCConnectionManagerPrometheus
import InMemoryLogging
import Logging
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// Client-side health checking (gRFC A17) against grpcio backends whose health the tests change while calls run.
@Suite("Client-side health checking", .serialized)
struct ClientHealthCheckTests {
    static func configuration(_ name: String?, policy: LoadBalancingPolicy = .roundRobin) -> Configuration {
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.enableRetry = false
        configuration.loadBalancingPolicy = policy
        configuration.healthCheckServiceName = name
        return configuration
    }

    /// When the peer saw each health Watch start (its "watch N at T" events), in seconds.
    static func watchTimes(_ peer: ScriptedPeer) -> [Double] {
        peer.events.compactMap { $0.hasPrefix("watch ") ? $0.split(separator: " ").last.flatMap { Double($0) } : nil }
    }

    /// Which backends served `count` calls.
    static func served(_ channel: GRPCChannel, _ count: Int) async throws -> [String: Int] {
        var served: [String: Int] = [:]
        for _ in 0..<count {
            let response = try await channel.unary(path: "/echo.Echo/Get", request: [1])
            served[response.initialMetadata["x-peer"] ?? "?", default: 0] += 1
        }
        return served
    }

    @Test("a backend whose health says NOT_SERVING gets no calls until it says SERVING again; its connection stays")
    func notServingBackendIsSkipped() async throws {
        let peers = try ["a", "b", "c"].map { try PythonPeer(name: $0) }
        defer { for peer in peers { peer.stop() } }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let addresses = peers.map { NetworkAddress(ip: "127.0.0.1", port: $0.port)! }
        let channel = try GRPCChannel(
            target: "fleet.test:50051", configuration: Self.configuration(""), eventLoop: loop,
            resolver: ScriptedResolver([addresses]))
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        channel.connect()
        #expect(await eventually { await channel.connectivity().state == .ready })
        #expect(await eventually(timeout: 10) { (try? await Self.served(channel, 6).count) == 3 })

        peers[1].setHealth("", "NOT_SERVING")
        #expect(
            await eventually {
                recorder.count {
                    if case .connectivityStateChanged(_, _, .ready, .transientFailure, let reason) = $0 {
                        return reason?.message == "health check: NOT_SERVING"
                    }
                    return false
                } == 1
            })
        let withoutB = try await Self.served(channel, 30)
        #expect(withoutB["b"] == nil)
        #expect(withoutB["a"] == 15 && withoutB["c"] == 15)

        peers[1].setHealth("", "SERVING")
        #expect(await eventually { (try? await Self.served(channel, 3))?["b"] == 1 })
        // One connection per backend throughout: health never closed one.
        #expect(recorder.count { if case .connectAttemptSucceeded = $0 { true } else { false } } == 3)
    }

    @Test("a named service: NOT_SERVING fails fast calls with the reason; wait-for-ready calls wait for SERVING")
    func namedServiceGatesCalls() async throws {
        let peer = try PythonPeer(name: "only")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // The peer starts with "sleepy" NOT_SERVING.
        var configuration = Self.configuration(nil)
        configuration.healthCheckServiceNames[peer.target] = "sleepy"
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        channel.connect()
        #expect(await eventually { await channel.connectivity().state == .transientFailure })
        let failed = await channel.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(failed.status.code == .unavailable)
        #expect(failed.status.message.contains("health check: NOT_SERVING"))

        let waiting = Task {
            await channel.unaryResult(
                path: "/echo.Echo/Get", request: [2], options: RequestOptions(timeout: .seconds(10), waitForReady: true))
        }
        #expect(await eventually { await channel.connectivity().state == .transientFailure })
        peer.setHealth("sleepy", "SERVING")
        let served = await waiting.value
        #expect(served.status == .ok)
        #expect(served.message == [2])
    }

    @Test("a watch that said SERVING, then ended: watched again at once, CONNECTING meanwhile; the connection kept")
    func watchRestarts() async throws {
        let peer = try ScriptedPeer("health-flap")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.configuration(""), eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        channel.connect()
        #expect(await eventually { Self.watchTimes(peer).count >= 2 })
        #expect(await eventually { await channel.connectivity().state == .ready })
        // Health decides READY twice: the first watch said SERVING and ended, the second started at once (the first had
        // said something: no backoff, and no TRANSIENT_FAILURE to fail calls queued on a connection that is fine) and
        // said SERVING. The bus delivers events after the state has changed, so the query above may see READY first.
        let expected = ["CONNECTING>READY", "READY>CONNECTING", "CONNECTING>READY"]
        #expect(await eventually { recorder.transitions.suffix(3) == expected[...] }, "\(recorder.transitions)")
        let watches = Self.watchTimes(peer)
        #expect(watches.count >= 2 && watches[1] - watches[0] < 0.9, "no backoff after a watch that answered: \(watches)")
        #expect(recorder.count { if case .connectAttemptSucceeded = $0 { true } else { false } } == 1)
        let response = try await channel.unary(path: "/echo.Echo/Get", request: [4])
        #expect(response.message == [4])
        // The watches are the client's own doing: metrics and logs hear of the application's call only.
        func callPaths() -> [String] {
            recorder.all.compactMap {
                switch $0 {
                case .callStarted(_, let path, _): "started \(path)"
                case .callFinished(_, let path, _, _, _, _, _): "finished \(path)"
                default: nil
                }
            }
        }
        #expect(await eventually { callPaths().count >= 2 })
        #expect(callPaths() == ["started /echo.Echo/Get", "finished /echo.Echo/Get"])
    }

    @Test("a watch that fails without a word: TRANSIENT_FAILURE, fail-fast calls fail with the reason, watched again after a backoff")
    func silentWatchFailure() async throws {
        let peer = try ScriptedPeer("health-fail", ["13"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.configuration(""), eventLoop: loop)
        channel.connect()
        #expect(await eventually { await channel.connectivity().state == .transientFailure })
        // Not left waiting for health that nobody reports (it was CONNECTING for ever: a call without a deadline hung).
        let failed = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1], options: RequestOptions(timeout: .seconds(10)))
        #expect(failed.status.code == .unavailable, "\(failed.status)")
        #expect(failed.status.message.contains("health check: the Watch ended, INTERNAL: health service broken"), "\(failed.status)")
        // Each silent end backs off longer: 1 s, then 2 s.
        #expect(await eventually(timeout: 8) { Self.watchTimes(peer).count >= 3 })
        let watches = Self.watchTimes(peer)
        #expect(watches.count >= 3)
        if watches.count >= 3 {
            #expect(watches[1] - watches[0] >= 0.9 && watches[2] - watches[1] >= 1.9, "\(watches)")
        }
    }

    @Test("watches that a proxy ends every half second do not keep an unused connection from going idle")
    func watchRestartsAreNoActivity() async throws {
        let peer = try ScriptedPeer("health-cycle", ["500"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.configuration("")
        configuration.idleTimeout = .seconds(2)
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(
            await eventually(timeout: 10) {
                recorder.all.contains {
                    if case .connectivityStateChanged(_, _, .ready, .idle, let reason) = $0 { return reason?.message == "idle timeout" }
                    return false
                }
            }, "idle 2 s after the call, though the watch restarted every half second")
        #expect(Self.watchTimes(peer).count >= 3, "the watch was restarted meanwhile: \(Self.watchTimes(peer))")
    }

    @Test("a server without the health service (UNIMPLEMENTED) counts as healthy")
    func unimplementedIsHealthy() async throws {
        let fixture = try LoopbackFixture()  // the embedded server answers Watch with UNIMPLEMENTED
        defer { fixture.shutdown() }
        let handler = InMemoryLogHandler()
        var logger = Logger(label: "test", factory: { _ in handler })
        logger.logLevel = .debug
        var configuration = Self.configuration("")
        configuration.enableMetrics = true
        let manager = try ConnectionManager(
            configuration: configuration, logger: logger, metricsFactory: PrometheusMetrics(), eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let response = try await channel.unary(path: "/echo.Echo/Get", request: [3])
        #expect(response.message == [3])
        #expect(await channel.connectivity().state == .ready)

        // The application hears of it, once for the connection (a misconfiguration, most likely), and calls go on.
        let ready = recorder.all.compactMap { event -> Int? in
            if case .connectivityStateChanged(_, let id, _, .ready, _) = event { return id }
            return nil
        }
        #expect(await eventually { recorder.story.contains("health-unimplemented") })
        for _ in 0..<3 { _ = try await channel.unary(path: "/echo.Echo/Get", request: [4]) }
        let reports = recorder.all.compactMap { event -> Int? in
            if case .healthCheckUnimplemented("echo", let id) = event { return id }
            return nil
        }
        #expect(reports.count == 1 && reports == ready, "reports \(reports), ready \(ready)")
        #expect(
            manager.metricsText()?.contains(#"grpc_client_health_check_unimplemented_total{service="echo"} 1"#) == true,
            "\(manager.metricsText() ?? "")")
        let logged = handler.entries.filter { $0.message.description.hasPrefix("health check off for this connection") }
        #expect(logged.count == 1 && logged.first?.level == .debug && logged.first?.metadata["grpc.service"] == "echo")
        await manager.close(gracePeriod: .seconds(1))
    }
}
