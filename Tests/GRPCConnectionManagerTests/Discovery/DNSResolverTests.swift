import Foundation
import GRPCEchoServer
import Testing

@testable import GRPCCMDiscovery
@testable import GRPCConnectionManager
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// c-ares on the loop against a DNS server on loopback whose answers the tests change.
@Suite("DNS with c-ares", .serialized)
struct DNSResolverTests {
    static func configuration(_ dns: DNSPeer) -> Configuration {
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        configuration.dns.servers = [dns.server]
        configuration.dns.timeout = .milliseconds(300)
        configuration.dns.attempts = 1
        configuration.resolutionInterval = .milliseconds(200)
        configuration.minimumResolutionInterval = .milliseconds(100)
        return configuration
    }

    @Test("a name resolves through c-ares (A and AAAA asked) and calls reach the address")
    func resolves() async throws {
        let dns = try DNSPeer()
        defer { dns.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        dns.set("svc.test", ["127.0.0.1"])
        let channel = try GRPCChannel(
            target: "svc.test:\(fixture.server.port)", configuration: Self.configuration(dns), eventLoop: fixture.loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        let response = try await channel.unary(path: "/echo.Echo/Get", request: [1, 2])
        #expect(response.message == [1, 2])
        #expect(dns.queries() >= 2, "A and AAAA")
        #expect(
            recorder.all.contains {
                if case .addressesResolved(_, let addresses) = $0 { return addresses.map(\.description) == ["127.0.0.1:\(fixture.server.port)"] }
                return false
            })
    }

    /// A DNS server, a loop, and echo servers on 127.0.0.1 and 127.0.0.2 with the same port.
    static func withTwoServers(
        _ body: (DNSPeer, ReactorLoop, EchoServer, EchoServer) async throws -> Void
    ) async throws {
        let dns = try DNSPeer()
        defer { dns.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let first = try EchoServer(host: "127.0.0.1", eventLoop: loop)
        defer { first.close() }
        let second = try EchoServer(host: "127.0.0.2", port: first.port, eventLoop: loop)
        defer { second.close() }
        try await body(dns, loop, first, second)
    }

    @Test("addresses that change: the new one joins, the old one drains, no call is lost")
    func addressesMove() async throws {
        try await Self.withTwoServers { dns, loop, first, second in
            dns.set("moving.test", ["127.0.0.1"])
            let channel = try GRPCChannel(
                target: "moving.test:\(first.port)", configuration: Self.configuration(dns), eventLoop: loop)
            let ledger = CompletionLedger()
            var id = 0
            for _ in 0..<5 {
                id += 1
                #expect(await channel.call([1], ledger: ledger, id: id).status == .ok)
            }
            // A call in flight on the old address when it goes: it must finish there (its connection drains).
            let inFlight = Task { await channel.call("/echo.Echo/Get", [9], metadata: ["x-sleep-ms": "600"]) }
            #expect(await eventually { first.requestsPerConnection().reduce(0, +) == 6 })
            dns.set("moving.test", ["127.0.0.2"])
            var moved = false
            for _ in 0..<400 where !moved {
                id += 1
                let response = await channel.call([1], ledger: ledger, id: id)
                #expect(response.status == .ok)
                moved = second.requestsPerConnection().reduce(0, +) > 0
                if !moved { try await Task.sleep(for: .milliseconds(10)) }
            }
            #expect(moved)
            let drained = await inFlight.value
            #expect(drained.status == .ok, "\(drained.status)")
            #expect(drained.message == [9])
            let atFirst = first.requestsPerConnection().reduce(0, +)
            for _ in 0..<10 {
                id += 1
                #expect(await channel.call([1], ledger: ledger, id: id).status == .ok)
            }
            #expect(first.requestsPerConnection().reduce(0, +) == atFirst, "the old address takes no new call")
            #expect(ledger.completed == id && ledger.duplicates == 0)
        }
    }

    @Test("the same addresses in another order (a DNS server rotating its answers) are no change: no event")
    func rotatedAnswerIsNoChange() async throws {
        try await Self.withTwoServers { dns, loop, first, second in
            dns.set("rotating.test", ["127.0.0.1", "127.0.0.2"])
            let channel = try GRPCChannel(
                target: "rotating.test:\(first.port)", configuration: Self.configuration(dns), eventLoop: loop)
            let recorder = EventRecorder()
            channel.events.subscribe { recorder.record($0) }
            #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
            dns.set("rotating.test", ["127.0.0.2", "127.0.0.1"])
            // Lookups every 200 ms: two more at least (A and AAAA each) read the rotated answer.
            let queries = dns.queries()
            #expect(await eventually { dns.queries() >= queries + 4 })
            #expect(await channel.call([2], timeout: .seconds(5)).status == .ok)
            let resolved = recorder.count { if case .addressesResolved = $0 { true } else { false } }
            #expect(resolved == 1, "one change reported (the first answer), not one per rotation: \(resolved)")
        }
    }

    @Test("no address in the answer, then no answer at all: events say so, calls keep the last good address")
    func badAnswersKeepService() async throws {
        let dns = try DNSPeer()
        defer { dns.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        dns.set("flaky.test", ["127.0.0.1"])
        let channel = try GRPCChannel(
            target: "flaky.test:\(fixture.server.port)", configuration: Self.configuration(dns), eventLoop: fixture.loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        #expect(try await channel.unary(path: "/echo.Echo/Get", request: [1]).message == [1])
        let failures = { (text: String) in
            recorder.count { if case .resolutionFailed(_, let error) = $0 { return error.message.contains(text) } else { return false } }
        }
        dns.empty("flaky.test")
        #expect(await eventually { failures("flaky.test") >= 1 })
        #expect(try await channel.unary(path: "/echo.Echo/Get", request: [2]).message == [2])
        dns.silence("flaky.test")
        #expect(await eventually { failures("timed out") >= 1 })
        #expect(try await channel.unary(path: "/echo.Echo/Get", request: [3]).message == [3])
    }

    @Test("a name that does not exist, and a server that never answers, fail calls UNAVAILABLE with the reason")
    func failures() async throws {
        let dns = try DNSPeer()
        defer { dns.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let missing = try GRPCChannel(target: "missing.test:50051", configuration: Self.configuration(dns), eventLoop: loop)
        let notFound = await missing.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(notFound.status.code == .unavailable)
        #expect(notFound.status.message.contains("missing.test"))
        dns.silence("quiet.test")
        let quiet = try GRPCChannel(target: "quiet.test:50051", configuration: Self.configuration(dns), eventLoop: loop)
        let started = ContinuousClock.now
        let timedOut = await quiet.unaryResult(path: "/echo.Echo/Get", request: [1])
        #expect(timedOut.status.code == .unavailable)
        #expect(timedOut.status.message.contains("timed out"))
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    @Test("a server that answers A and not AAAA (in time): the loop goes on meanwhile, and calls reach the IPv4 address")
    func unansweredAAAA() async throws {
        let dns = try DNSPeer()
        defer { dns.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        dns.answerAAAALate("half.test", "127.0.0.1")
        var configuration = Self.configuration(dns)
        configuration.dns.timeout = .seconds(2)
        let channel = try GRPCChannel(
            target: "half.test:\(fixture.server.port)", configuration: configuration, eventLoop: fixture.loop)
        // Callbacks, not await: a loop that blocked on the lookup's socket would never run a deadline either.
        let result = PThreadLock<UnaryResponse?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [4], options: RequestOptions(timeout: .seconds(10))) { response in
            result.withLock { $0 = response }
        }
        // While the AAAA query waits for its 2 s timeout (after the A answer came), the loop's other work runs (a
        // loop blocked reading the lookup's socket would run it only when the answer comes, 5 s later).
        #expect(await eventually { dns.queries() >= 2 }, "A and AAAA asked")
        let ran = PThreadLock(false)
        fixture.loop.reactor.execute { ran.withLock { $0 = true } }
        #expect(await eventually(timeout: 1) { ran.withLock { $0 } }, "the loop turned while the lookup waited")
        #expect(await eventually(timeout: 8) { result.withLock { $0 } != nil })
        #expect(result.withLock { $0 }?.message == [4], "\(String(describing: result.withLock { $0 }?.status))")
    }

    @Test("with the system's servers, a changed resolv.conf is read at the next lookup; a lookup under way still ends")
    func resolvConfChanges() async throws {
        let first = try DNSPeer(host: "127.0.0.1")
        defer { first.stop() }
        let second = try DNSPeer(host: "127.0.0.2", port: first.port)
        defer { second.stop() }
        first.set("svc.test", ["127.0.0.1"])
        first.silence("slow.test")
        second.set("svc.test", ["127.0.0.2"])
        let path = NSTemporaryDirectory() + "grpc-cm-resolv-\(getpid()).conf"
        defer { unlink(path) }
        // As resolvconf and DHCP clients replace it: a new file renamed over the old. resolv.conf has no ports:
        // the two servers listen on one port, on two loopback addresses.
        func use(_ peer: DNSPeer) throws {
            try "nameserver \(peer.host)\n".write(toFile: path + ".new", atomically: false, encoding: .utf8)
            #expect(rename(path + ".new", path) == 0)
        }
        try use(first)
        var settings = CAresResolver.Settings(timeout: .seconds(1), attempts: 1)
        settings.resolvConf = path
        settings.resolvConfPort = UInt16(first.port)
        let resolver = CAresResolver(settings: settings)
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        func lookup(_ name: String) async throws -> Result<[NetworkAddress], CallStatus> {
            let target = try Target(parsing: name + ":80")
            return await withCheckedContinuation { done in resolver.resolve(target, on: loop.reactor) { done.resume(returning: $0) } }
        }
        #expect(try await lookup("svc.test").map { $0.map(\.description) } == .success(["127.0.0.1:80"]))
        // A lookup the first server never answers is under way when the file changes.
        async let slow = lookup("slow.test")
        #expect(await eventually(timeout: 5) { first.queries() >= 3 })
        try use(second)
        #expect(try await lookup("svc.test").map { $0.map(\.description) } == .success(["127.0.0.2:80"]))
        #expect(second.queries() >= 2)
        // The old channel kept it until its own timeout: not cut short, not lost.
        let slowResult = try await slow
        #expect(throws: CallStatus.self) { try slowResult.get() }
        if case .failure(let status) = slowResult { #expect(status.message.contains("timed out"), "\(status)") }
    }

    @Test("a lookup in flight when the loop shuts down: it ends, and its socket closes with the loop")
    func lookupInFlightAtShutdown() async throws {
        let dns = try DNSPeer()
        defer { dns.stop() }
        dns.silence("quiet.test")
        let before = openFDCount()
        let resolver = CAresResolver(settings: CAresResolver.Settings(servers: [dns.server], timeout: .seconds(30), attempts: 1))
        let loop = try ReactorLoop()
        loop.start()
        let ended = PThreadLock<Result<[NetworkAddress], CallStatus>?>(nil)
        resolver.resolve(try Target(parsing: "quiet.test:80"), on: loop.reactor) { result in ended.withLock { $0 = result } }
        #expect(await eventually { dns.queries() >= 1 }, "the query is out, its socket open")
        loop.shutdown()
        #expect(await eventually { ended.withLock { $0 } != nil }, "the lookup ended")
        // The resolver is still alive: only the loop's shutdown closed the socket.
        #expect(openFDCount() == before, "every fd of the loop closed, c-ares's socket included")
        withExtendedLifetime(resolver) {}
    }

    @Test("DNS settings are validated")
    func validation() throws {
        for (field, change) in [
            ("dns.timeout", { (c: inout Configuration) in c.dns.timeout = .zero }),
            ("dns.attempts", { (c: inout Configuration) in c.dns.attempts = 0 }),
            ("dns.servers", { (c: inout Configuration) in c.dns.servers = ["dns.example"] }),
            ("dns.servers", { (c: inout Configuration) in c.dns.servers = ["127.0.0.1:99999"] }),
            // c-ares's settings with getaddrinfo, which would silently not apply them.
            ("dns.servers", { (c: inout Configuration) in c.dns.resolver = .system; c.dns.servers = ["127.0.0.1"] }),
            ("dns.timeout", { (c: inout Configuration) in c.dns.resolver = .system; c.dns.timeout = .seconds(1) }),
            ("dns.attempts", { (c: inout Configuration) in c.dns.resolver = .system; c.dns.attempts = 3 }),
            // Each a subchannel, all connected by a manager's service at once.
            ("connectionsPerTarget", { (c: inout Configuration) in c.connectionsPerTarget = .max }),
        ] {
            var configuration = Configuration()
            change(&configuration)
            #expect(throws: ConfigurationError.self, "\(field)") { try configuration.validate() }
            do {
                try configuration.validate()
            } catch {
                #expect(error.field == field)
            }
        }
        var system = Configuration()
        system.dns.resolver = .system
        try system.validate()
        // Grown one at a time, as calls need them: any number is a cap.
        var unbounded = Configuration()
        unbounded.maxConnectionsPerTarget = .max
        try unbounded.validate()
        var configuration = Configuration()
        configuration.dns.servers = ["127.0.0.1", "127.0.0.1:5353", "[::1]:53", "::1"]
        try configuration.validate()
    }
}
