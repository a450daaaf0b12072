import Foundation
import GRPCEchoServer
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// Each attempt has an identity: what an old attempt leaves behind (a queue entry, late frames on its stream) never
/// touches the current one, and no request is sent twice.
@Suite("Attempt identity", .serialized)
struct AttemptIdentityTests {
    /// Retries with a short backoff; `/echo.Echo/Get` (the tests' calls) also has a per-attempt timeout.
    static func retrying(perAttempt: Duration) -> Configuration {
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.retry.policy.initialBackoff = .milliseconds(10)
        configuration.retry.policy.maxBackoff = .milliseconds(10)
        var timed = configuration.retry.policy
        timed.perAttemptTimeout = perAttempt
        configuration.retry.perMethod["/echo.Echo/Get"] = timed
        configuration.retry.throttling = nil
        return configuration
    }

    @Test("an attempt that timed out while queued leaves no duplicate behind: the request reaches the server once")
    func queuedAttemptTimeoutSendsOnce() async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 1
        let fixture = try LoopbackFixture(options: options)
        defer { fixture.shutdown() }
        let channel = try fixture.channel(Self.retrying(perAttempt: .seconds(2)))
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([0], timeout: .seconds(2)).status == .ok)
        // The only stream is taken for 3 s from when the server has the blocker: the next call's first attempt times
        // out in the queue (at 2 s), its second waits there too and goes out when the stream frees (about 3 s, 1 s
        // before its own timeout). Each side has a second of slack for a loaded machine.
        async let blocker = channel.call(
            "/echo.Echo/Block", [1], metadata: ["x-sleep-ms": "3000", "x-request-key": "blocker"], timeout: .seconds(10))
        #expect(await eventually { fixture.server.requestCount(key: "blocker") == 1 })
        let response = await channel.call([2], metadata: ["x-request-key": "queued"], timeout: .seconds(10))
        #expect(response.status == .ok)
        #expect(await blocker.status == .ok)
        #expect(fixture.server.requestCount(key: "queued") == 1, "the timed-out attempt's queue entry sent nothing")
        let attempts = recorder.all.compactMap { event -> Int? in
            if case .callFinished(_, _, let status, _, let attempts, _, _) = event, status.isOK, attempts > 1 { return attempts }
            return nil
        }
        #expect(attempts == [2], "the call took two attempts: \(attempts)")
    }

    @Test("late frames of a timed-out attempt never reach its retry")
    func lateFramesOfAnOldAttempt() async throws {
        let peer = try ScriptedPeer("late-first")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(
            target: peer.target, configuration: Self.retrying(perAttempt: .milliseconds(200)), eventLoop: loop)
        let response = await channel.call(Array("fresh".utf8), timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(String(decoding: response.message, as: UTF8.self) == "fresh", "the retry's own answer, not the stale one")
        #expect(peer.headerBlocks() == 2)
    }
}
