import Foundation
import GRPCEchoServer
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// Connections that look after themselves, over real sockets on loopback.
@Suite("Connection lifecycle", .serialized)
struct LifecycleTests {
    static func fastConfiguration() -> Configuration {
        var configuration = Configuration()
        configuration.maxReconnectDelay = .milliseconds(300)
        configuration.minConnectTimeout = .seconds(2)
        // These tests are about connections: each call is one attempt, and no breaker stands in the way (retry
        // and breaker have their own tests).
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        return configuration
    }

    @Test("server stopped and restarted on the same port: calls fail only while it is down, then succeed")
    func rideOutServerRestart() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let port = freePort()
        var server: EchoServer? = try EchoServer(port: port, eventLoop: loop)
        let manager = try ConnectionManager(configuration: Self.fastConfiguration(), eventLoop: loop)
        let channel = try manager.connection(service: "echo", address: "127.0.0.1:\(port)")
        var outcomes: [(phase: String, code: StatusCode)] = []
        for _ in 0..<3 { outcomes.append(("up", await channel.call([1], timeout: .seconds(2)).status.code)) }
        server?.close()
        server = nil
        for _ in 0..<3 {
            outcomes.append(("down", await channel.call([2], timeout: .seconds(2)).status.code))
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        server = try EchoServer(port: port, eventLoop: loop)
        defer { server?.close() }
        // Within a backoff period (at most maxReconnectDelay + jitter) calls succeed again.
        let back = await eventually(timeout: 2) { await channel.call([3], timeout: .seconds(1)).status == .ok }
        #expect(back)
        for _ in 0..<3 { outcomes.append(("back", await channel.call([4], timeout: .seconds(2)).status.code)) }
        #expect(outcomes.filter { $0.phase == "up" || $0.phase == "back" }.allSatisfy { $0.code == .ok })
        #expect(outcomes.filter { $0.phase == "down" }.allSatisfy { $0.code == .unavailable })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("the grpcio server restarted on the same port is ridden out too")
    func rideOutPythonRestart() async throws {
        var peer = try PythonPeer()
        let port = peer.port
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let manager = try ConnectionManager(configuration: Self.fastConfiguration(), eventLoop: loop)
        let channel = try manager.connection(service: "py", address: peer.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        peer.stop()
        #expect(await channel.call([2], timeout: .seconds(2)).status.code == .unavailable)
        peer = try PythonPeer(port: port)
        defer { peer.stop() }
        #expect(await eventually(timeout: 3) { await channel.call([3], timeout: .seconds(1)).status == .ok })
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a frozen server (SIGSTOP) is detected by keepalive: the call fails UNAVAILABLE instead of hanging")
    func keepaliveDetectsFrozenServer() async throws {
        try await Self.withFrozenPeer { channel, recorder in
            let started = now()
            let response = await channel.call([2], timeout: .seconds(10))
            let elapsed = now() - started
            #expect(response.status.code == .unavailable)
            #expect(response.status.message.contains("keepalive"))
            // Undetected, the call would wait for its 10 s deadline; the slack is for a loaded machine (TSan).
            #expect(elapsed < 0.3 + 0.3 + 1.5, "detected within keepAliveTime + keepAliveTimeout (+ slack)")
            // The call completes first; the state change is published right after, on the reactor thread.
            #expect(await eventually { recorder.transitions.contains("READY>TRANSIENT_FAILURE") })
            #expect(recorder.count { if case .keepaliveTimeout = $0 { return true } else { return false } } == 1)
        }
    }

    @Test("a frozen server (SIGSTOP) under steady traffic is detected by keepalive as soon: its kernel acknowledging the calls' bytes buys no time")
    func keepaliveDetectsFrozenServerUnderTraffic() async throws {
        try await Self.withFrozenPeer { channel, recorder in
            let started = now()
            // A call every 20 ms: the stopped server's kernel keeps acknowledging their bytes, which counts for
            // nothing once it has the PING (an earlier take on the rule extended the wait while it did).
            let traffic = Task {
                while !Task.isCancelled {
                    channel.unary(path: "/echo.Echo/Get", request: [2], options: RequestOptions(timeout: .milliseconds(500))) { _ in }
                    try? await Task.sleep(for: .milliseconds(20))
                }
            }
            defer { traffic.cancel() }
            let detected = await eventually(timeout: 10) {
                recorder.count { if case .keepaliveTimeout = $0 { return true } else { return false } } >= 1
            }
            #expect(detected)
            #expect(now() - started < 0.3 + 0.3 + 1.5, "detected within keepAliveTime + keepAliveTimeout (+ slack)")
        }
    }

    /// A grpcio server and a channel to it with keepalive at 300 ms / 300 ms, which has made one call; then the
    /// server is stopped (SIGSTOP) and `body` runs. The server goes on (SIGCONT) and ends after.
    private static func withFrozenPeer(_ body: (GRPCChannel, EventRecorder) async throws -> Void) async throws {
        let peer = try PythonPeer()
        defer {
            kill(peer.pid, SIGCONT)
            peer.stop()
        }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.fastConfiguration()
        configuration.keepAliveTime = .milliseconds(300)
        configuration.keepAliveTimeout = .milliseconds(300)
        let recorder = EventRecorder()
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        kill(peer.pid, SIGSTOP)
        try await body(channel, recorder)
    }

    @Test("GOAWAY while 100 calls are in flight loses none of them and completes each once")
    func gracefulServerShutdownLosesNothing() async throws {
        let fixture = try LoopbackFixture()
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let ledger = CompletionLedger()
        #expect(await channel.call([0], timeout: .seconds(5)).status == .ok)
        let results = await withTaskGroup(of: UnaryResponse.self) { group in
            for index in 1...100 {
                group.addTask {
                    await channel.call(
                        [UInt8(index)], metadata: ["x-sleep-ms": "200"], timeout: .seconds(5), ledger: ledger, id: index)
                }
            }
            try? await Task.sleep(nanoseconds: 50_000_000)
            fixture.server.goAway()
            var collected: [UnaryResponse] = []
            for await response in group { collected.append(response) }
            return collected
        }
        #expect(results.count == 100)
        #expect(results.allSatisfy { $0.status == .ok || $0.status.code == .unavailable })
        #expect(results.filter { $0.status == .ok }.count == 100, "in-flight calls finish; unsent ones move")
        await manager.close(gracePeriod: .seconds(1))
        fixture.shutdown()
        #expect(ledger.duplicates == 0)
        #expect(ledger.completed == 100)
    }

    @Test("GOAWAY too_many_pings from grpcio doubles the keepalive time")
    func tooManyPingsDoublesKeepalive() async throws {
        let peer = try PythonPeer()
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.fastConfiguration()
        configuration.keepAliveTime = .milliseconds(100)
        configuration.keepAliveTimeout = .seconds(2)
        let recorder = EventRecorder()
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        // grpcio allows no pings without calls (2 h rule): the third strike brings GOAWAY too_many_pings.
        let sawGoAway = await eventually(timeout: 5) {
            recorder.count {
                if case .goAwayReceived(_, _, 0xb, "too_many_pings", true) = $0 { return true } else { return false }
            } > 0
        }
        #expect(sawGoAway)
        let times = await onReactor(loop.reactor) { channel.pool.subchannelKeepAliveTimes }
        #expect(times == [.milliseconds(200)])
        // The next call reconnects and works.
        #expect(await channel.call([2], timeout: .seconds(5)).status == .ok)
    }

    @Test("idle timeout closes an unused connection (READY>IDLE) and the next call reconnects")
    func idleTimeout() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.fastConfiguration()
        configuration.idleTimeout = .milliseconds(200)
        let recorder = EventRecorder()
        let channel = try fixture.channel(configuration)
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(await eventually { recorder.transitions.contains("READY>IDLE") })
        #expect(await channel.call([2], timeout: .seconds(5)).status == .ok)
        #expect(recorder.story.filter { $0 == "start" }.count == 2)
        // The connection may idle again (after 200 ms) before this line runs on a slow machine: the first five.
        #expect(recorder.transitions.prefix(5) == ["IDLE>CONNECTING", "CONNECTING>READY", "READY>IDLE", "IDLE>CONNECTING", "CONNECTING>READY"])
    }

    @Test("the idle timeout counts from the last call's end, not from when the timer was armed")
    func idleTimeoutFromTheLastCall() async throws {
        // The timer is armed when the connection becomes ready; a call that ends just after made it re-arm a whole
        // timeout from when it fired, and the connection went idle almost two timeouts after its last call.
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.fastConfiguration()
        configuration.idleTimeout = .seconds(1)
        let channel = try fixture.channel(configuration)
        // Both times taken on the loop, as the events are published: not when an awaiting task resumes.
        let wentIdle = PThreadLock<ContinuousClock.Instant?>(nil)
        let callEnded = PThreadLock<ContinuousClock.Instant?>(nil)
        channel.events.subscribe {
            if case .connectivityStateChanged(_, _, .ready, .idle, _) = $0 { wentIdle.withLock { $0 = $0 ?? .now } }
            if case .callFinished = $0 { callEnded.withLock { $0 = .now } }
        }
        // The call takes 400 ms: the timer armed at READY fires 600 ms after it ended.
        #expect(await channel.call([1], metadata: ["x-sleep-ms": "400"], timeout: .seconds(5)).status == .ok)
        #expect(await eventually { wentIdle.withLock { $0 } != nil })
        let lastCallEnded = try #require(callEnded.withLock { $0 })
        let idleAfter = try #require(wentIdle.withLock { $0 }) - lastCallEnded
        // 1 s; it was 1.6 s (the timer re-armed a whole timeout from when it fired).
        #expect(idleAfter >= .milliseconds(900) && idleAfter < .milliseconds(1400), "idle \(idleAfter) after the last call")
    }

    @Test("wait-for-ready waits for the server to come up; fail-fast fails at once with the connect error")
    func waitForReady() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let port = freePort()
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: Self.fastConfiguration(), eventLoop: loop)
        let failFastStart = now()
        let failFast = await channel.call([1], timeout: .seconds(5))
        #expect(failFast.status.code == .unavailable)
        #expect(failFast.status.message.contains("refused"))
        #expect(now() - failFastStart < 3)  // not the 5 s deadline
        // In TRANSIENT_FAILURE a fail-fast call fails at once with the last connect error.
        let again = await channel.call([1], timeout: .seconds(5))
        #expect(again.status.code == .unavailable)

        let started = now()
        async let waited = withCheckedContinuation { (continuation: CheckedContinuation<UnaryResponse, Never>) in
            channel.unary(
                path: "/echo.Echo/Get", request: [9], options: RequestOptions(timeout: .seconds(5), waitForReady: true)
            ) { continuation.resume(returning: $0) }
        }
        try await Task.sleep(nanoseconds: 400_000_000)
        let server = try EchoServer(port: port, eventLoop: loop)
        defer { server.close() }
        let response = await waited
        #expect(response.status == .ok)
        #expect(response.message == [9])
        #expect(now() - started >= 0.4)

        // A wait-for-ready call whose deadline passes first ends DEADLINE_EXCEEDED.
        let dead = try GRPCChannel(target: "127.0.0.1:\(freePort())", configuration: Self.fastConfiguration(), eventLoop: loop)
        let late = await withCheckedContinuation { (continuation: CheckedContinuation<UnaryResponse, Never>) in
            dead.unary(
                path: "/echo.Echo/Get", request: [], options: RequestOptions(timeout: .milliseconds(300), waitForReady: true)
            ) { continuation.resume(returning: $0) }
        }
        #expect(late.status.code == .deadlineExceeded)
    }

    @Test("events for connect, fail, backoff, reconnect come in exactly this order")
    func eventSequence() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let port = freePort()
        let recorder = EventRecorder()
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: Self.fastConfiguration(), eventLoop: loop)
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([1], timeout: .seconds(2)).status.code == .unavailable)
        // The backoff ends with no call waiting: the connection rests in IDLE.
        #expect(await eventually { recorder.transitions.last == "TRANSIENT_FAILURE>IDLE" })
        let server = try EchoServer(port: port, eventLoop: loop)
        defer { server.close() }
        #expect(await channel.call([2], timeout: .seconds(2)).status == .ok)
        #expect(
            recorder.story == [
                "IDLE>CONNECTING", "start", "fail", "CONNECTING>TRANSIENT_FAILURE", "TRANSIENT_FAILURE>IDLE",
                "IDLE>CONNECTING", "start", "ok", "CONNECTING>READY",
            ])
        let failed = recorder.all.compactMap { event -> Duration? in
            if case .connectAttemptFailed(_, _, _, let error, let backoff) = event {
                #expect(error.message.contains("refused"))
                return backoff
            }
            return nil
        }
        #expect(failed.count == 1)
        #expect(failed[0] >= .milliseconds(80) && failed[0] <= .milliseconds(120))
        let calls = recorder.all.compactMap { event -> StatusCode? in
            if case .callFinished(_, "/echo.Echo/Get", let status, _, _, _, _) = event { return status.code }
            return nil
        }
        #expect(calls == [.unavailable, .ok])
    }
}

/// The manager's API: registry, errors, health.
@Suite("ConnectionManager", .serialized)
struct ConnectionManagerTests {
    @Test(
        "invalid configurations fail with the field named",
        arguments: [
            "keepAliveTime", "keepAliveTimeout", "maxReconnectDelay", "minConnectTimeout", "maxMessageSize",
            "connectionsPerTarget", "idleTimeout",
        ])
    func invalidConfiguration(field: String) {
        var configuration = Configuration()
        switch field {
        case "keepAliveTime": configuration.keepAliveTime = .zero
        case "keepAliveTimeout": configuration.keepAliveTimeout = .seconds(-1)
        case "maxReconnectDelay": configuration.maxReconnectDelay = .zero
        case "minConnectTimeout": configuration.minConnectTimeout = .zero
        case "maxMessageSize": configuration.maxMessageSize = 0
        case "connectionsPerTarget": configuration.connectionsPerTarget = 0
        default: configuration.idleTimeout = .seconds(-1)
        }
        #expect {
            _ = try ConnectionManager(configuration: configuration)
        } throws: { error in
            (error as? ConfigurationError)?.field == field
        }
    }

    @Test("the registry: register, reuse, unknown service, close, NotConnected, count")
    func registry() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        #expect(throws: ConnectionManagerError.unknownService("nobody")) { try manager.connection(service: "nobody") }
        let first = try manager.connection(service: "echo", address: fixture.target)
        let again = try manager.connection(service: "echo")
        #expect(first === again)
        #expect(manager.connectionCount == 1)
        #expect(await eventually { await manager.healthCheck()["echo"]?.state == "READY" })
        let report = await manager.healthCheck()
        #expect(report["echo"] == ConnectionManager.ServiceHealth(state: "READY", healthy: true, error: nil))
        #expect(try await manager.checkHealth(service: "echo") == .serving)
        manager.closeConnection(service: "echo")
        #expect(manager.connectionCount == 0)
        #expect(await manager.healthCheck()["echo"]
            == ConnectionManager.ServiceHealth(state: "NotConnected", healthy: false, error: "connection not established yet"))
        // The address is remembered.
        let reopened = try manager.connection(service: "echo")
        #expect(await reopened.call([5], timeout: .seconds(5)).message == [5])
        await manager.close(gracePeriod: .seconds(1))
        #expect(throws: ConnectionManagerError.closed) { try manager.connection(service: "echo") }
        #expect(await reopened.call([6], timeout: .seconds(5)).status.code == .unavailable)
    }

    @Test("graceful close lets calls in flight finish")
    func gracefulClose() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([0], timeout: .seconds(5)).status == .ok)
        async let slow = channel.call([7], metadata: ["x-sleep-ms": "300", "x-request-key": "slow"], timeout: .seconds(5))
        #expect(await eventually { fixture.server.requestCount(key: "slow") == 1 })  // in flight
        await manager.close(gracePeriod: .seconds(3))
        let response = await slow
        #expect(response.status == .ok)
        #expect(response.message == [7])
    }

    @Test("a service moved to another address: calls in flight on the old channel finish there, new ones go to the new one")
    func replacedChannelLetsCallsFinish() async throws {
        let old = try LoopbackFixture()
        defer { old.shutdown() }
        let new = try LoopbackFixture()
        defer { new.shutdown() }
        let manager = try ConnectionManager(eventLoop: old.loop)
        let channel = try manager.connection(service: "echo", address: old.target)
        #expect(await channel.call([0], timeout: .seconds(5)).status == .ok)
        async let slow = channel.call([7], metadata: ["x-sleep-ms": "300", "x-request-key": "slow"], timeout: .seconds(5))
        #expect(await eventually { old.server.requestCount(key: "slow") == 1 })  // in flight
        let moved = try manager.connection(service: "echo", address: new.target)
        #expect(moved !== channel)
        // Before, the replaced channel was closed at once: UNAVAILABLE "the connection is closed".
        let response = await slow
        #expect(response.status == .ok, "\(response.status)")
        #expect(response.message == [7])
        #expect(await moved.call([8], metadata: ["x-request-key": "moved"], timeout: .seconds(5)).status == .ok)
        #expect(new.server.requestCount(key: "moved") == 1)
        // The old channel takes nothing new.
        #expect(await channel.call([9], timeout: .seconds(5)).status.code == .unavailable)
        // closeConnection(service:) ends the calls still finishing on a channel the service's replaced.
        let cut = PThreadLock<UnaryResponse?>(nil)
        let first = try manager.connection(service: "echo", address: old.target)
        _ = first.unary(path: "/echo.Echo/Get", request: [11], metadata: ["x-sleep-ms": "5000", "x-request-key": "cut"]) {
            response in cut.withLock { $0 = response }
        }
        #expect(await eventually { old.server.requestCount(key: "cut") == 1 })
        _ = try manager.connection(service: "echo", address: new.target)
        manager.closeConnection(service: "echo")
        #expect(await eventually(timeout: 2) { cut.withLock { $0 } != nil }, "ended by closeConnection, not after 5 s")
        #expect(cut.withLock { $0 }?.status.code == .unavailable)
        // The manager's close reaches a replaced channel's calls too: when it returns, each has ended.
        let ended = PThreadLock<UnaryResponse?>(nil)
        let again = try manager.connection(service: "echo", address: old.target)
        _ = again.unary(path: "/echo.Echo/Get", request: [10], metadata: ["x-sleep-ms": "5000", "x-request-key": "late"]) {
            response in ended.withLock { $0 = response }
        }
        #expect(await eventually { old.server.requestCount(key: "late") == 1 })
        _ = try manager.connection(service: "echo", address: new.target)
        await manager.close(gracePeriod: .milliseconds(200))
        #expect(ended.withLock { $0 }?.status.code == .unavailable)
    }

    @Test("health against grpcio: healthCheck(), checkHealth and grpc-cm health as grpc_health_probe, every exit code")
    func healthAgainstGrpcio() async throws {
        let peer = try PythonPeer()
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let manager = try ConnectionManager(eventLoop: loop)
        _ = try manager.connection(service: "py", address: peer.target)
        #expect(try await manager.checkHealth(service: "py") == .serving)
        #expect(try await manager.checkHealth(service: "py", healthServiceName: "sleepy") == .notServing)
        await #expect(throws: CallError.self) { try await manager.checkHealth(service: "py", healthServiceName: "nope") }
        #expect(await eventually { await manager.healthCheck()["py"]?.healthy == true })

        // grpc_health_probe's flags, defaults (plaintext) and exit codes, as a Kubernetes exec probe runs it.
        let cli = grpcCMBinary()
        let port = String(peer.target.split(separator: ":").last!)
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)"], stderr: true) == (0, "status: SERVING\n"))
        #expect(try runProgram(cli, ["health", "-addr=:\(port)"], stderr: true) == (0, "status: SERVING\n"), ":port means localhost")
        #expect(try runProgram(cli, ["health", "-addr", peer.target, "-service", "sleepy"]).status == 4)
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-service=nope"]).status == 3)
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-rpc-header=x-probe: 1", "-rpc-timeout=2s"]).status == 0)
        #expect(
            try runProgram(cli, ["health", "-addr=\(peer.target)", "-rpc-header=authorization: Basic dXNlcjpwdw=="]).status == 0,
            "a value that ends in = is a value, not an empty flag")
        #expect(try runProgram(cli, ["health", "-addr=127.0.0.1:\(freePort())"]).status == 2)
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-bogus"]).status == 1)
        #expect(try runProgram(cli, ["health"]).status == 1, "no -addr")
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-connect-timeout=soon"]).status == 1)
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-service="], stderr: true) == (0, "status: SERVING\n"), "empty = the server")
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-rpc-timeout=1e30s"]).status == 1, "no trap")
        // grpc-cm's own double-dash spellings still work beside the probe's.
        #expect(try runProgram(cli, ["health", "--plaintext", "--service", "sleepy", peer.target]).status == 4)
        #expect(try runProgram(cli, ["health", "--addr", peer.target, "--max-time", "2"]).status == 0)
        #expect(try runProgram(cli, ["health", "--plaintext", "-tls", "-addr=\(peer.target)"]).status == 1)
        // grpc-cm call takes grpcurl's method spelling, without the leading slash.
        let called = try runProgram(cli, ["call", "--plaintext", peer.target, "grpc.health.v1.Health/Check", "--hex"])
        #expect(called.status == 0, "\(called.output)")
        #expect(called.output.contains("0801"), "SERVING: \(called.output)")
        // Durations past what a Duration holds mean "no limit", not a trap; nonsense is a usage error (2).
        let unlimited = try runProgram(
            cli, ["call", "--plaintext", peer.target, "grpc.health.v1.Health/Check", "--hex", "--max-time", "inf",
                  "--connect-timeout", "1e12", "--keepalive-time", "inf"])
        #expect(unlimited.status == 0, "\(unlimited.output)")
        for flags in [["--repeat", "2", "--interval", "nan"], ["--repeat", "2", "--interval", "inf"], ["--data-file", "/dev/zero"]] {
            #expect(try runProgram(cli, ["call", "--plaintext", peer.target, "grpc.health.v1.Health/Check"] + flags).status == 2, "\(flags)")
        }
        // A response that cannot be written out is a failure, not exit 0.
        let full = try runProgram("/bin/sh", ["-c", "'\(cli)' call --plaintext \(peer.target) grpc.health.v1.Health/Check --hex 2>&1 >/dev/full"])
        #expect(full.status == 1, "\(full.output)")
        #expect(full.output.contains("cannot write"), "\(full.output)")
        #expect(try runProgram(cli, ["health", "-addr=\(peer.target)", "-tls-no-verify"]).status == 1, "-tls-* needs -tls")
        // A server that accepts and never speaks HTTP/2: a connection failure once -connect-timeout passes, not a
        // hang and not an RPC failure.
        let silent = try BadPeer(.silent)
        defer { silent.stop() }
        let started = now()
        #expect(try runProgram(cli, ["health", "-addr=127.0.0.1:\(silent.port)", "-connect-timeout=300ms"]).status == 2)
        #expect(now() - started < 5)
        await manager.close(gracePeriod: .seconds(1))
    }

    /// (Several addresses per name: `ClaimsTests.usesEveryResolvedAddress`; `localhost` has one here.)
    @Test("a host name is resolved with getaddrinfo: its address gets a subchannel and the calls")
    func resolvesHostName() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try GRPCChannel(target: "localhost:\(fixture.server.port)", eventLoop: fixture.loop)
        for index in 0..<5 {
            #expect(await channel.call([UInt8(index)], timeout: .seconds(5)).message == [UInt8(index)])
        }
        let addresses = await onReactor(fixture.loop.reactor) { channel.pool.subchannelAddresses }
        #expect(addresses.contains("127.0.0.1:\(fixture.server.port)"))
    }

    @Test("the wait queue is bounded: overflow fails with RESOURCE_EXHAUSTED")
    func boundedQueue() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Configuration()
        configuration.maxQueuedCalls = 3
        configuration.minConnectTimeout = .seconds(5)
        let peer = try BadPeer(.silent)  // accepts, never answers: calls wait for READY
        defer { peer.stop() }
        let channel = try GRPCChannel(target: "127.0.0.1:\(peer.port)", configuration: configuration, eventLoop: loop)
        let codes = await withTaskGroup(of: StatusCode.self) { group in
            for _ in 0..<4 {
                // Long enough that all four are queued (or refused) before the first deadline, however slow the
                // tasks are to start.
                group.addTask { await channel.call([1], timeout: .seconds(2)).status.code }
            }
            return await group.reduce(into: [StatusCode]()) { $0.append($1) }
        }
        #expect(codes.filter { $0 == .resourceExhausted }.count == 1)
        #expect(codes.filter { $0 == .deadlineExceeded }.count == 3)
    }

    @Test("watchHealth streams Watch from grpcio, and polls Check where Watch is unimplemented")
    func watchHealth() async throws {
        let peer = try PythonPeer()
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        _ = try manager.connection(service: "py", address: peer.target)
        _ = try manager.connection(service: "echo", address: fixture.target)

        var watched = try manager.watchHealth(service: "py", pollInterval: .seconds(30)).makeAsyncIterator()
        #expect(await watched.next() == .serving)
        peer.setHealth("", "NOT_SERVING")
        #expect(await watched.next() == .notServing, "a change arrives over Watch, long before the 30 s poll")
        peer.setHealth("", "SERVING")
        #expect(await watched.next() == .serving)

        var polled = try manager.watchHealth(service: "echo", pollInterval: .milliseconds(100)).makeAsyncIterator()
        #expect(await polled.next() == .serving)
        // A graceful close ends the Watch as it begins (a watch never ends of itself): it does not wait out its grace
        // period for it. The stream then says UNKNOWN and ends, as after any close.
        let began = ContinuousClock.now
        await manager.close(gracePeriod: .seconds(20))
        #expect(ContinuousClock.now - began < .seconds(5), "the close waited for the watch")
        #expect(await watched.next() == .unknown)
        #expect(await watched.next() == nil)
    }

    @Test("healthCheck() says NotConnected for a channel closed by its own close(); a polled watch of a name the server does not know says SERVICE_UNKNOWN")
    func healthReportsForClosedAndUnknown() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        // The embedded server has Check only (the watch polls it) and answers NOT_FOUND for a name it does not know.
        var unknown = try manager.watchHealth(service: "echo", healthServiceName: "nope", pollInterval: .milliseconds(100))
            .makeAsyncIterator()
        #expect(await unknown.next() == .serviceUnknown, "as Watch says it (UNKNOWN before)")
        #expect(manager.connectionCount == 1)
        channel.close()
        // Before: "SHUTDOWN", from the closed channel the registry keeps until the service is asked for again.
        #expect(await manager.healthCheck()["echo"]?.state == "NotConnected")
        #expect(manager.connectionCount == 0, "not an open channel either (it counted it)")
        _ = try manager.connection(service: "echo")
        #expect(manager.connectionCount == 1)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a manager's watchHealth follows its service to a new address, and ends when the service is closed")
    func watchHealthFollowsTheService() async throws {
        let first = try PythonPeer()
        defer { first.stop() }
        let second = try PythonPeer()
        defer { second.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        _ = try manager.connection(service: "py", address: first.target)
        var watched = try manager.watchHealth(service: "py", pollInterval: .milliseconds(50)).makeAsyncIterator()
        #expect(await watched.next() == .serving)
        // Registered again elsewhere: the old channel closes, its Watch ends (UNKNOWN), and the new one is watched.
        _ = try manager.connection(service: "py", address: second.target)
        #expect(await watched.next() == .unknown)
        #expect(await watched.next() == .serving)
        second.setHealth("", "NOT_SERVING")
        #expect(await watched.next() == .notServing, "the new address's server is the one watched")
        manager.closeConnection(service: "py")
        #expect(await watched.next() == .unknown)
        #expect(await watched.next() == nil, "the service is gone: the stream ends")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("watchHealth with a poll interval past a day (\"never poll\") polls daily, not trapping in the clock's sleep")
    func watchHealthNeverPoll() async throws {
        let fixture = try LoopbackFixture()  // Watch unimplemented: Check, then a sleep of the interval
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        defer { channel.close() }
        var statuses = channel.watchHealth(pollInterval: .seconds(Int64.max)).makeAsyncIterator()
        #expect(await statuses.next() == .serving)
    }

    @Test("watchHealth ends once the channel is closed, after an UNKNOWN, instead of going silent for ever")
    func watchHealthEndsWithTheChannel() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let seen = PThreadLock<[HealthStatus]>([])
        let ended = PThreadLock(false)
        let reader = Task {
            for await status in channel.watchHealth(pollInterval: .milliseconds(10)) { seen.withLock { $0.append(status) } }
            ended.withLock { $0 = true }
        }
        defer { reader.cancel() }
        #expect(await eventually { seen.withLock { $0 } == [.serving] })
        channel.close()
        #expect(await eventually { ended.withLock { $0 } }, "\(seen.withLock { $0 })")
        #expect(seen.withLock { $0 } == [.serving, .unknown])
    }

    @Test("a manager's channel closed with close() is dialled again by connection(service:), not handed out closed")
    func closedChannelIsRedialled() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let first = try manager.connection(service: "echo", address: fixture.target)
        first.close()
        #expect(await first.call([1], timeout: .seconds(5)).status.code == .unavailable)
        let again = try manager.connection(service: "echo")
        #expect(again !== first)
        #expect(await again.call([2], timeout: .seconds(5)).status == .ok)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a standalone channel let go of while its calls run ends them saying so")
    func releasedChannelSaysSo() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        func open() throws -> AsyncStreamingCall {
            let channel = try fixture.channel()
            return channel.serverStreaming(path: "/test.Stream/Expand", request: [1], metadata: ["x-sleep-ms": "5000"])
        }
        let call = try open()  // its channel's last reference went with open()
        let status = await call.result().status
        #expect(status.code == .unavailable)
        #expect(status.message == "the channel was released (its last reference dropped) while calls were running", "\(status)")
    }

    @Test("watchHealth: a Watch that ends, even with OK, yields UNKNOWN until the reopened one answers")
    func watchEndedOK() async throws {
        let peer = try ScriptedPeer("health-flap", ["0"])  // the first Watch: SERVING, then an OK end
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, eventLoop: loop)
        // Read in a task of its own, so that a missing status fails the test instead of hanging it.
        let seen = PThreadLock<[HealthStatus]>([])
        let reader = Task {
            for await status in channel.watchHealth(pollInterval: .milliseconds(200)) { seen.withLock { $0.append(status) } }
        }
        defer { reader.cancel() }
        #expect(await eventually { seen.withLock { $0.count } >= 3 })
        #expect(seen.withLock { $0 } == [.serving, .unknown, .serving], "nothing watches between the end and the reopen")
    }

    @Test("watchHealth: a flap the consumer did not see is no change to it (the status it holds is not repeated)")
    func healthFlapUnseen() async {
        // The watch keeps only the newest status for a consumer that has not asked yet.
        let (source, feed) = AsyncStream<HealthStatus>.makeStream(bufferingPolicy: .bufferingNewest(1))
        var changes = GRPCChannel.changesAsDelivered(source).makeAsyncIterator()
        feed.yield(.serving)
        #expect(await changes.next() == .serving)
        // NOT_SERVING and SERVING again, both before the consumer asks: the buffer holds SERVING alone.
        feed.yield(.notServing)
        feed.yield(.serving)
        feed.yield(.serving)
        feed.finish()
        #expect(await changes.next() == nil, "SERVING again is not a change to a consumer that holds SERVING")

        // A consumer that stops reading ends the watch: the source's termination (which cancels its task) runs.
        let ended = PThreadLock(false)
        do {
            // As watchHealth makes it: nothing but the consumer's stream holds the source's consumer side.
            var reader = GRPCChannel.changesAsDelivered(
                AsyncStream(bufferingPolicy: .bufferingNewest(1)) { status in
                    status.onTermination = { _ in ended.withLock { $0 = true } }
                    status.yield(.serving)
                }
            ).makeAsyncIterator()
            #expect(await reader.next() == .serving)
            #expect(!ended.withLock { $0 })
        }
        #expect(ended.withLock { $0 })
    }

    @Test("several connections per target share the calls")
    func connectionsPerTarget() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.connectionsPerTarget = 3
        let recorder = EventRecorder()
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        manager.events.subscribe { recorder.record($0) }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let ok = await withTaskGroup(of: Bool.self) { group in
            for index in 0..<60 {
                group.addTask {
                    await channel.call([UInt8(index)], metadata: ["x-sleep-ms": "20"], timeout: .seconds(5)).status == .ok
                }
            }
            return await group.reduce(true) { $0 && $1 }
        }
        #expect(ok)
        #expect(await eventually { recorder.story.filter { $0 == "ok" }.count == 3 })
        await manager.close(gracePeriod: .seconds(1))
    }
}
