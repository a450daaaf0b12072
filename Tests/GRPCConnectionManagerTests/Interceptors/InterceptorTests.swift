import Foundation
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMWire

/// Adds `name: value`, and records the metadata it saw.
final class AddHeader: CallInterceptor {
    let name: String
    let value: String
    let seen = PThreadLock<[CallMetadata]>([])
    init(name: String, value: String) {
        self.name = name
        self.value = value
    }
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        self.seen.withLock { $0.append(call.metadata) }
        call.metadata.add(self.name, self.value)
        return .proceed
    }
}

/// A gate an async interceptor's work waits on until the test opens it.
final class Gate: Sendable {
    private let state = PThreadLock<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))
    /// Work parked on the gate now.
    var waiting: Int { self.state.withLock { $0.waiters.count } }
    func wait() async {
        await withCheckedContinuation { continuation in
            let resume = self.state.withLock { state -> Bool in
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if resume { continuation.resume() }
        }
    }
    func open() {
        for waiter in self.state.withLock({ state -> [CheckedContinuation<Void, Never>] in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }) { waiter.resume() }
    }
}

/// A bearer token from a provider that refreshes asynchronously: cached tokens are added synchronously, a missing
/// one is fetched off the loop (`refresh` waits on `gate`).
final class TokenInterceptor: CallInterceptor {
    let gate = Gate()
    let token = PThreadLock<String?>(nil)
    let refreshes = Atomic<Int>(0)
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        if let token = self.token.withLock({ $0 }) {
            call.metadata.replaceOrAdd("authorization", "Bearer \(token)")
            return .proceed
        }
        return .proceedAfter {
            await self.gate.wait()
            let fresh = "t\(self.refreshes.add(1, ordering: .relaxed).newValue)"
            self.token.withLock { $0 = fresh }
            return ["authorization": "Bearer \(fresh)"]
        }
    }
}

/// An interceptor whose work waits for a token service that does not answer, until it is cancelled.
final class SlowTokenSource: CallInterceptor {
    let cancelled = Atomic<Int>(0)
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        .proceedAfter {
            do {
                try await Task.sleep(for: .seconds(60))
            } catch {
                self.cancelled.add(1, ordering: .relaxed)
                throw error
            }
            return [:]
        }
    }
}

final class SharedLog: Sendable {
    let log = PThreadLock<[String]>([])
    var entries: [String] { self.log.withLock { $0 } }
}

/// Observes every call it sees.
struct Observing: CallInterceptor {
    let name: String
    let log: SharedLog
    let reactor: Reactor
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        .proceed(observer: Observer(name: self.name, log: self.log, reactor: self.reactor))
    }
    struct Observer: CallObserver {
        let name: String
        let log: SharedLog
        let reactor: Reactor
        // loop=true: on the loop's thread, in its deferred phase (where the contract puts every observer).
        func attemptFinished(attempt: Int, status: CallStatus, willRetry: Bool) {
            let onLoop = self.reactor.inReactorThread && self.reactor.inDeferredPhase
            self.log.log.withLock { $0.append("\(self.name) attempt \(attempt) \(status.code) retry=\(willRetry) loop=\(onLoop)") }
        }
        func callFinished(_ response: UnaryResponse) {
            let onLoop = self.reactor.inReactorThread && self.reactor.inDeferredPhase
            self.log.log.withLock { $0.append("\(self.name) end \(response.status.code) loop=\(onLoop)") }
        }
    }
}

/// Fails every call with `status`.
struct Refuse: CallInterceptor {
    let status: CallStatus
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision { .fail(self.status) }
}

/// Async work that throws.
struct Throwing: CallInterceptor {
    struct Oops: Error {}
    let error: any Error & Sendable
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        let error = self.error
        return .proceedAfter { throw error }
    }
}

@Suite("Interceptors", .serialized)
struct InterceptorTests {
    static func plain() -> Configuration {
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.enableRetry = false
        return configuration
    }

    @Test("interceptors run in order, each seeing what the ones before it did; metadata reaches the server")
    func orderedMetadata() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let first = AddHeader(name: "x-tenant", value: "acme")
        let second = AddHeader(name: "x-second", value: "2")
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [first, second], eventLoop: fixture.loop)
        let response = try await channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-caller": "me"])
        #expect(response.initialMetadata["x-caller"] == "me")
        #expect(response.initialMetadata["x-tenant"] == "acme")
        #expect(response.initialMetadata["x-second"] == "2")
        #expect(first.seen.withLock { $0.last?["x-tenant"] } == nil)
        #expect(second.seen.withLock { $0.last?["x-tenant"] } == "acme")

        // Streams pass through them too.
        let stream = channel.bidirectionalStreaming(path: "/raw.Service/Update")
        try await stream.write([7])
        stream.closeSend()
        for try await message in stream.responses { #expect(message == [7]) }
        let result = await stream.result()
        #expect(result.status == .ok)
        #expect(result.initialMetadata["x-tenant"] == "acme")
    }

    @Test("an async token provider: the call waits off the loop, other calls go on, then it carries the token")
    func asyncTokenProvider() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tokens = TokenInterceptor()
        let withToken = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [tokens], eventLoop: fixture.loop)
        let without = try fixture.channel(Self.plain())

        let waiting = Task { try await withToken.unary(path: "/echo.Echo/Get", request: [1]) }
        // The refresh is parked on the gate, yet the loop serves other calls.
        for _ in 0..<5 {
            let other = try await without.unary(path: "/echo.Echo/Get", request: [2])
            #expect(other.message == [2])
        }
        tokens.gate.open()
        let response = try await waiting.value
        #expect(response.initialMetadata["authorization"] == "Bearer t1")
        // Now cached: added synchronously, no second refresh.
        let cached = try await withToken.unary(path: "/echo.Echo/Get", request: [3], metadata: ["authorization": "old"])
        #expect(cached.initialMetadata.values(for: "authorization") == [.string("Bearer t1")])
        #expect(tokens.refreshes.load(ordering: .relaxed) == 1)
    }

    @Test("a call's reported duration (metrics, logs) includes its interceptors' async work, as a hedged call's does")
    func reportedDurationIncludesPreparation() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tokens = TokenInterceptor()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [tokens], eventLoop: fixture.loop)
        let durations = PThreadLock<[Duration]>([])
        channel.events.subscribe { event in
            if case .callFinished(_, _, _, let duration, _, _, _) = event { durations.withLock { $0.append(duration) } }
        }
        let waiting = Task { try await channel.unary(path: "/echo.Echo/Get", request: [1]) }
        // The call waits on the token refresh at least this long: the caller waits it too.
        try await Task.sleep(for: .milliseconds(300))
        tokens.gate.open()
        #expect(try await waiting.value.message == [1])
        #expect(await eventually { durations.withLock { $0.count } == 1 })
        let reported = durations.withLock { $0 }
        #expect(reported.allSatisfy { $0 >= .milliseconds(300) }, "\(reported)")
    }

    @Test("the deadline runs while an interceptor prepares, and a cancel ends the call at once")
    func deadlineAndCancelWhilePreparing() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tokens = TokenInterceptor()
        defer { tokens.gate.open() }
        let log = SharedLog()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(),
            interceptors: [Observing(name: "o", log: log, reactor: fixture.loop.reactor), tokens], eventLoop: fixture.loop)
        let late = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1], metadata: ["x-request-key": "never"],
            options: RequestOptions(timeout: .milliseconds(100)))
        #expect(late.status.code == .deadlineExceeded)

        let task = Task {
            await channel.unaryResult(path: "/echo.Echo/Get", request: [1], metadata: ["x-request-key": "never"])
        }
        #expect(await eventually { tokens.refreshes.load(ordering: .relaxed) == 0 })
        task.cancel()
        let cancelled = await task.value
        #expect(cancelled.status.code == .cancelled)
        // Neither went out; their observer heard both ends, on the loop.
        tokens.gate.open()
        #expect(await eventually { tokens.token.withLock { $0 } != nil })
        #expect(fixture.server.requestCount(key: "never") == 0)
        #expect(log.entries == ["o end DEADLINE_EXCEEDED loop=true", "o end CANCELLED loop=true"])
    }

    @Test("a call started on a closed channel ends at once, UNAVAILABLE, though an interceptor is still preparing it (single and hedged)")
    func closedChannelWhilePreparing() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tokens = TokenInterceptor()
        defer { tokens.gate.open() }
        var configuration = Self.plain()
        configuration.hedging["echo.Hedged"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .seconds(10))
        let channel = try GRPCChannel(
            target: fixture.target, configuration: configuration, interceptors: [tokens], eventLoop: fixture.loop)
        channel.close()
        for path in ["/echo.Echo/Get", "/echo.Hedged/Get"] {
            // The work waits on the gate for ever: only the closed channel can end the call, and it must, at once.
            let response = await channel.unaryResult(path: path, request: [1], options: RequestOptions(timeout: .seconds(5)))
            #expect(response.status.code == .unavailable, "\(path): \(response.status)")
        }
    }

    @Test("interceptor work still running when its call ends is cancelled (work that throws then runs no interceptor after it)")
    func preparationCancelledWithTheCall() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let slow = SlowTokenSource()
        let after = AddHeader(name: "x-after", value: "1")
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [slow, after], eventLoop: fixture.loop)
        let timedOut = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1], options: RequestOptions(timeout: .milliseconds(100)))
        #expect(timedOut.status.code == .deadlineExceeded)
        let task = Task { await channel.unaryResult(path: "/echo.Echo/Get", request: [1]) }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        #expect(await task.value.status.code == .cancelled)
        #expect(await eventually { slow.cancelled.load(ordering: .relaxed) == 2 }, "both calls' work was cancelled")
        #expect(after.seen.withLock { $0 }.isEmpty)
    }

    @Test("observers that join after async work hear a call that ended meanwhile, in the deferred phase")
    func lateObserversHearAnEndedCall() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tokens = TokenInterceptor()
        defer { tokens.gate.open() }
        let log = SharedLog()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(),
            interceptors: [tokens, Observing(name: "late", log: log, reactor: fixture.loop.reactor)], eventLoop: fixture.loop)
        let task = Task { await channel.unaryResult(path: "/echo.Echo/Get", request: [1]) }
        #expect(await eventually { tokens.gate.waiting == 1 })
        task.cancel()
        #expect(await task.value.status.code == .cancelled)
        tokens.gate.open()  // the work ends: "late" joins a call that has ended
        #expect(await eventually { !log.entries.isEmpty })
        #expect(log.entries == ["late end CANCELLED loop=true"])
    }

    @Test("an interceptor can fail a call: the server never sees it, the completion comes later, earlier observers hear it")
    func failing() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let log = SharedLog()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(),
            interceptors: [
                Observing(name: "o", log: log, reactor: fixture.loop.reactor),
                Refuse(status: CallStatus(code: .unauthenticated, message: "no credentials")),
                AddHeader(name: "x-never", value: "1"),
            ],
            eventLoop: fixture.loop)
        // Started from a completion, on the loop thread: a completion run inside unary() would come before "returned".
        let order = SharedLog()
        let plainChannel = try fixture.channel(Self.plain())
        let response: UnaryResponse = await withCheckedContinuation { continuation in
            plainChannel.unary(path: "/echo.Echo/Get", request: [1]) { _ in
                channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-request-key": "refused"]) { response in
                    order.log.withLock { $0.append("completion") }
                    continuation.resume(returning: response)
                }
                order.log.withLock { $0.append("returned") }
            }
        }
        #expect(order.entries == ["returned", "completion"])
        #expect(response.status == CallStatus(code: .unauthenticated, message: "no credentials"))
        #expect(fixture.server.requestCount(key: "refused") == 0)
        #expect(log.entries == ["o end UNAUTHENTICATED loop=true"])
    }

    @Test("async work that throws: a CallError's status, or UNAVAILABLE naming the error")
    func throwingWork() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let denied = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(),
            interceptors: [Throwing(error: CallError(status: CallStatus(code: .permissionDenied, message: "tenant")))],
            eventLoop: fixture.loop)
        let first = await denied.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(first.status == CallStatus(code: .permissionDenied, message: "tenant"))
        let broken = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [Throwing(error: Throwing.Oops())],
            eventLoop: fixture.loop)
        let second = await broken.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(second.status.code == .unavailable)
        #expect(second.status.message.contains("Throwing"))
        #expect(second.status.message.contains("Oops"))
    }

    @Test("an interceptor failing a call with OK fails it INTERNAL: no response is made up, nothing is sent")
    func failingWithOK() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        for interceptor: any CallInterceptor in [
            Refuse(status: CallStatus(code: .ok)), Throwing(error: CallError(status: CallStatus(code: .ok))),
        ] {
            let channel = try GRPCChannel(
                target: fixture.target, configuration: Self.plain(), interceptors: [interceptor], eventLoop: fixture.loop)
            let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1], metadata: ["x-request-key": "ok-fail"])
            #expect(response.status.code == .internal, "\(type(of: interceptor)): \(response.status)")
            #expect(response.status.message.contains("with status OK"))
        }
        #expect(fixture.server.requestCount(key: "ok-fail") == 0)
    }

    @Test("the send limit applies to the message as given, after async interceptor work as before it")
    func sendLimitAfterAsyncWork() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.maxMessageSize = 1000
        configuration.compression.requestEncoding = .gzip
        let tokens = TokenInterceptor()
        tokens.gate.open()
        // 5,000 zero bytes gzip to a few dozen: over the limit as given, far under it compressed.
        let big = [UInt8](repeating: 0, count: 5000)
        for interceptors: [any CallInterceptor] in [[], [tokens]] {
            let channel = try GRPCChannel(
                target: fixture.target, configuration: configuration, interceptors: interceptors, eventLoop: fixture.loop)
            // The echo would be accepted (the response limit raised): only the send limit can refuse it.
            var options = RequestOptions()
            options.maxReceiveMessageSize = 10_000
            let response = await channel.unaryResult(
                path: "/echo.Echo/Get", request: big, metadata: ["x-request-key": "big"], options: options)
            #expect(response.status.code == .resourceExhausted, "interceptors \(interceptors.count): \(response.status)")
        }
        #expect(fixture.server.requestCount(key: "big") == 0)
    }

    @Test("metadata an interceptor breaks is refused like the caller's (INVALID_ARGUMENT)")
    func invalidMetadata() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(),
            interceptors: [AddHeader(name: "x-bad", value: "line\r\nbreak")], eventLoop: fixture.loop)
        let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(response.status.code == .invalidArgument)
        let tokens = TokenInterceptor()
        tokens.gate.open()
        let asyncThenBad = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(),
            interceptors: [tokens, AddHeader(name: "Bad Name", value: "x")], eventLoop: fixture.loop)
        let late = await asyncThenBad.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(late.status.code == .invalidArgument)
    }

    @Test("observers see each attempt of a retried call on the loop, then the end, in reverse interceptor order")
    func observersSeeAttempts() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.enableRetry = true
        configuration.retry.policy.initialBackoff = .milliseconds(1)
        let log = SharedLog()
        let reactor = fixture.loop.reactor
        let manager = try ConnectionManager(
            configuration: configuration,
            interceptors: [Observing(name: "a", log: log, reactor: reactor), Observing(name: "b", log: log, reactor: reactor)],
            eventLoop: fixture.loop)
        defer { manager.closeNow() }
        let channel = try manager.connection(service: "echo", address: fixture.target)
        let response = try await channel.unary(
            path: "/echo.Echo/Get", request: [1], metadata: ["x-fail-first": "2", "x-request-key": "observed"])
        #expect(response.message == [1])
        #expect(
            log.entries == [
                "a attempt 1 UNAVAILABLE retry=true loop=true", "b attempt 1 UNAVAILABLE retry=true loop=true",
                "a attempt 2 UNAVAILABLE retry=true loop=true", "b attempt 2 UNAVAILABLE retry=true loop=true",
                "a attempt 3 OK retry=false loop=true", "b attempt 3 OK retry=false loop=true",
                "b end OK loop=true", "a end OK loop=true",
            ])
    }

    @Test("calls started from a completion go through the interceptors too, async ones included")
    func fromACompletion() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tokens = TokenInterceptor()
        tokens.gate.open()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [tokens], eventLoop: fixture.loop)
        let second: UnaryResponse = await withCheckedContinuation { continuation in
            channel.unary(path: "/echo.Echo/Get", request: [1]) { first in
                tokens.token.withLock { $0 = nil }  // the next one refreshes again, from the loop thread
                channel.unary(path: "/echo.Echo/Get", request: [2]) { continuation.resume(returning: $0) }
            }
        }
        #expect(second.status == .ok)
        #expect(second.initialMetadata["authorization"] == "Bearer t2")
    }

    @Test("observers hear the end when the loop has stopped: a hedged call, and observers added after async work")
    func observersHearTheEndOnAStoppedLoop() async throws {
        let log = SharedLog()
        // A hedged call that a stopped loop refuses.
        let hedgedLoop = try ReactorLoop()
        hedgedLoop.start()
        var hedging = Self.plain()
        hedging.hedging = ["/echo.Echo/Get": CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50))]
        let hedged = try GRPCChannel(
            target: "127.0.0.1:1", configuration: hedging,
            interceptors: [Observing(name: "hedged", log: log, reactor: hedgedLoop.reactor)], eventLoop: hedgedLoop)
        hedgedLoop.shutdown()
        let refused = await hedged.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(refused.status.code == .unavailable)
        #expect(await eventually { log.entries.contains("hedged end UNAVAILABLE loop=false") }, "\(log.entries)")
        // Nor is its completion kept: an owner that keeps the handle, captured by the completion, is freed.
        final class Owner: Sendable {
            let handle = PThreadLock<CallHandle?>(nil)
            let ended = PThreadLock(false)
        }
        final class Weak: @unchecked Sendable {
            // `@unchecked`: set before the call ends, read after; weak loads are atomic.
            weak var owner: Owner?
        }
        let weak = Weak()
        do {
            let owner = Owner()
            owner.handle.withLock {
                $0 = hedged.unary(path: "/echo.Echo/Get", request: [3]) { _ in
                    _ = owner.handle.withLock { $0 }
                    owner.ended.withLock { $0 = true }
                }
            }
            weak.owner = owner
            #expect(await eventually { owner.ended.withLock { $0 } })
        }
        #expect(await eventually { weak.owner == nil }, "the owner of a hedged call a stopped loop refused is freed")

        // Observers that interceptors add after async work the loop outlives no longer.
        let loop = try ReactorLoop()
        loop.start()
        let tokens = TokenInterceptor()
        let channel = try GRPCChannel(
            target: "127.0.0.1:1", configuration: Self.plain(),
            interceptors: [tokens, Observing(name: "late", log: log, reactor: loop.reactor)], eventLoop: loop)
        let waiting = Task { await channel.unaryResult(path: "/echo.Echo/Get", request: [2]) }
        #expect(await eventually { tokens.gate.waiting == 1 }, "the call's token refresh is parked")
        loop.shutdown()
        tokens.gate.open()
        #expect(await waiting.value.status.code == .unavailable)
        #expect(await eventually { log.entries.contains { $0.hasPrefix("late end UNAVAILABLE") } }, "\(log.entries)")
    }
}
