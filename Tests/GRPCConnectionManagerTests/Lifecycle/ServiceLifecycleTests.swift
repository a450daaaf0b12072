import GRPCConnectionManagerServiceLifecycle
import GRPCEchoServer
import Logging
import ServiceLifecycle
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// The manager in a swift-service-lifecycle `ServiceGroup`, shut down the way a service manager does it.
@Suite("ConnectionManagerService", .serialized)
struct ServiceLifecycleTests {
    @Test("a graceful shutdown of the group lets the call on a stream finish, then run() returns and calls fail")
    func gracefulShutdownClosesTheManager() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let group = ServiceGroup(
            services: [ConnectionManagerService(manager, gracePeriod: .seconds(5))], gracefulShutdownSignals: [],
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        let running = Task { try await group.run() }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)

        // A call on a stream when the shutdown begins: it has the grace period to finish, and it does.
        async let slow = channel.call(
            "/test.Raw/Get", [2], metadata: ["x-sleep-ms": "300", "x-request-key": "slow"], timeout: .seconds(5))
        #expect(await eventually { fixture.server.requestCount(key: "slow") == 1 })
        await group.triggerGracefulShutdown()
        let finished = await slow
        #expect(finished.status == .ok)
        #expect(finished.message == [2])
        try await running.value  // run() returned: the group is done

        let after = await channel.call([3], timeout: .seconds(5))
        #expect(after.status.code == .unavailable, "the manager is closed: \(after.status)")
    }

    @Test("cancelling the group closes the manager at once")
    func cancellationClosesAtOnce() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let channel = try manager.connection(service: "echo", address: fixture.target)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        // A call on a stream (the server sleeps 5 s): run() returns once its completion has run, not before the loop
        // has even closed anything (the application goes on to tear down then).
        let ended = PThreadLock<UnaryResponse?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [9], metadata: ["x-sleep-ms": "5000", "x-request-key": "slow"]) {
            response in ended.withLock { $0 = response }
        }
        #expect(await eventually { fixture.server.requestCount(key: "slow") == 1 })
        let service = ConnectionManagerService(manager, gracePeriod: .seconds(60))
        let running = Task { try await service.run() }
        running.cancel()
        try await running.value
        #expect(ended.withLock { $0 }?.status.code == .unavailable, "\(String(describing: ended.withLock { $0 }?.status))")
        #expect(await channel.call([2], timeout: .seconds(5)).status.code == .unavailable)
    }
}
