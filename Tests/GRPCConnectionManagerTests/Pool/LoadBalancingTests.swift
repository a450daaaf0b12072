import GRPCEchoServer
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// The policies over three real backends (embedded servers on one loop), the name resolved by a scripted resolver.
@Suite("Load-balancing policies over three backends", .serialized)
struct LoadBalancingTests {
    final class Fleet: Sendable {
        let loop: ReactorLoop
        let servers: [EchoServer]

        init() throws {
            let loop = try ReactorLoop()
            loop.start()
            self.loop = loop
            self.servers = try (0..<3).map { _ in try EchoServer(eventLoop: loop) }
        }

        func addresses(first: NetworkAddress? = nil) -> [NetworkAddress] {
            (first.map { [$0] } ?? []) + self.servers.map { NetworkAddress(ip: "127.0.0.1", port: $0.port)! }
        }

        /// Requests each server received.
        var counts: [Int] { self.servers.map { $0.requestsPerConnection().reduce(0, +) } }

        func channel(
            _ policy: LoadBalancingPolicy, addresses: [NetworkAddress]? = nil, configuration: Configuration = Configuration()
        ) throws -> (GRPCChannel, EventRecorder) {
            var configuration = configuration
            configuration.loadBalancingPolicies["fleet.test:50051"] = policy
            let channel = try GRPCChannel(
                target: "fleet.test:50051", configuration: configuration, eventLoop: self.loop,
                resolver: ScriptedResolver([addresses ?? self.addresses()]))
            let recorder = EventRecorder()
            channel.events.subscribe { recorder.record($0) }
            return (channel, recorder)
        }

        func shutdown() {
            for server in self.servers { server.close() }
            self.loop.shutdown()
        }
    }

    static func connected(_ recorder: EventRecorder) -> Int {
        recorder.count { if case .connectAttemptSucceeded = $0 { return true } else { return false } }
    }

    static func attempted(_ recorder: EventRecorder) -> Int {
        recorder.count { if case .connectAttemptStarted = $0 { return true } else { return false } }
    }

    @Test("round_robin: every backend connected, calls in turn: 30 calls make 10 each")
    func roundRobinTakesTurns() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let (channel, recorder) = try fleet.channel(.roundRobin)
        channel.connect()
        #expect(await eventually { Self.connected(recorder) == 3 })
        for index in 0..<30 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        #expect(fleet.counts == [10, 10, 10])
    }

    @Test("round_robin, not eager: a connection that ends (GOAWAY) while the others serve calls is made again")
    func lostConnectionIsRemadeWhileInUse() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let (channel, recorder) = try fleet.channel(.roundRobin)
        // The first call connects every backend; no connect() (not eager).
        for index in 0..<3 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        #expect(await eventually { Self.connected(recorder) == 3 })
        fleet.servers[1].goAway()
        // Calls keep going to the other two meanwhile, so none ever waits for a connection: before, the lost one
        // stayed IDLE for good (the name was resolved too lately to be asked again).
        var index = 0
        #expect(await eventually {
            index += 1
            _ = await channel.call("/test.Raw/Get", [UInt8(index & 0xFF)], timeout: .seconds(5))
            return Self.connected(recorder) == 4
        })
        let before = fleet.counts
        for index in 0..<30 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        let after = fleet.counts
        #expect((0..<3).map { after[$0] - before[$0] } == [10, 10, 10])
    }

    @Test("a GOAWAY soon after the last lookup asks the name again once minimumResolutionInterval has passed")
    func reResolutionIsDeferredNotDropped() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        var configuration = Configuration()
        configuration.resolutionInterval = .zero  // no periodic lookup: only a connection's end asks again
        configuration.minimumResolutionInterval = .milliseconds(300)
        let resolver = ScriptedResolver([[fleet.addresses()[0]]])
        let channel = try GRPCChannel(
            target: "fleet.test:50051", configuration: configuration, eventLoop: fleet.loop, resolver: resolver)
        #expect(await channel.call("/test.Raw/Get", [1], timeout: .seconds(5)).status == .ok)
        #expect(resolver.count == 1)
        fleet.servers[0].goAway()  // well within 300 ms of that lookup: dropped before, never asked again
        #expect(await eventually { resolver.count == 2 }, "lookups: \(resolver.count)")
        #expect(await channel.call("/test.Raw/Get", [2], timeout: .seconds(5)).status == .ok)
    }

    @Test("round_robin: a backend that goes away gets nothing more, the calls go on over the other two")
    func roundRobinSkipsAFailedBackend() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let (channel, recorder) = try fleet.channel(.roundRobin)
        channel.connect()
        #expect(await eventually { Self.connected(recorder) == 3 })
        fleet.servers[1].close()
        #expect(await eventually { await channel.connectivity().state == .ready && fleet.counts[1] == 0 })
        #expect(await eventually {
            recorder.count { if case .connectivityStateChanged(_, _, .ready, _, _) = $0 { return true } else { return false } } >= 1
        }, "the client saw the connection to the closed backend go")
        let before = fleet.counts
        for index in 0..<20 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        let after = fleet.counts
        #expect(after[1] == before[1], "nothing reaches the closed backend")
        #expect(after[0] - before[0] == 10 && after[2] - before[2] == 10, "\(before) -> \(after)")
    }

    @Test("least-loaded (the default): every backend connected; concurrent calls spread by open streams")
    func leastLoadedSpreads() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let (channel, recorder) = try fleet.channel(.leastLoaded)
        channel.connect()
        #expect(await eventually { Self.connected(recorder) == 3 })
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<30 {
                group.addTask {
                    _ = await channel.call("/test.Raw/Get", [UInt8(index)], metadata: ["x-sleep-ms": "100"], timeout: .seconds(5))
                }
            }
        }
        let counts = fleet.counts
        #expect(counts.reduce(0, +) == 30)
        #expect(counts.allSatisfy { $0 >= 5 }, "\(counts)")
    }

    @Test("pick_first: one connection, to the first address; the others are never dialled")
    func pickFirstUsesTheFirst() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let (channel, recorder) = try fleet.channel(.pickFirst)
        for index in 0..<30 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        #expect(fleet.counts == [30, 0, 0])
        #expect(Self.attempted(recorder) == 1, "one connection attempt in all")
        #expect(fleet.servers[1].requestsPerConnection().isEmpty && fleet.servers[2].requestsPerConnection().isEmpty)
    }

    @Test("pick_first: a first address that refuses moves the calls to the next one; the third is never dialled")
    func pickFirstFailsOver() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let dead = NetworkAddress(ip: "127.0.0.1", port: freePort())!
        // dead, then servers 0, 1, 2.
        let (channel, recorder) = try fleet.channel(.pickFirst, addresses: fleet.addresses(first: dead))
        let response = await withCheckedContinuation { continuation in
            channel.unary(path: "/test.Raw/Get", request: [1], options: RequestOptions(timeout: .seconds(5), waitForReady: true)) {
                continuation.resume(returning: $0)
            }
        }
        #expect(response.status == .ok)
        for index in 0..<9 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        #expect(fleet.counts == [10, 0, 0])
        let dialled = Set(Self.dialled(recorder))
        #expect(dialled == ["\(dead)", "\(fleet.addresses()[0])"], "\(dialled)")
    }

    static func dialled(_ recorder: EventRecorder) -> [String] {
        recorder.all.compactMap { event -> String? in
            if case .connectAttemptStarted(_, _, let address) = event { return "\(address)" }
            return nil
        }
    }

    @Test("pick_first, Happy Eyeballs (gRFC A61): an address that never answers holds the calls 250 ms, not the connect timeout; the attempt still waiting is given up once the next connects")
    func pickFirstMovesOnFromASilentAddress() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let silent = try ScriptedPeer("silent")  // takes the connection, never sends SETTINGS
        defer { silent.stop() }
        let silentAddress = NetworkAddress(ip: "127.0.0.1", port: silent.port)!
        var configuration = Configuration()
        configuration.minConnectTimeout = .seconds(60)
        // Two addresses only: a server slow to send its SETTINGS on a loaded machine (past the attempt delay) would
        // otherwise have the next one dialled too.
        let (channel, recorder) = try fleet.channel(
            .pickFirst, addresses: [silentAddress, fleet.addresses()[0]], configuration: configuration)
        // Fail-fast, with the pool CONNECTING all along: the call waits for a connection. Before, for the 60 s
        // connect timeout of the silent address, so its 10 s deadline passed.
        let response = await channel.call("/test.Raw/Get", [1], timeout: .seconds(10))
        #expect(response.status == .ok, "\(response.status)")
        #expect(fleet.counts == [1, 0, 0])
        #expect(Self.dialled(recorder) == ["\(silentAddress)", "\(fleet.addresses()[0])"])
        // The silent address's attempt ends, not failed: closed by this side, its subchannel IDLE again.
        #expect(await eventually { silent.events.contains("eof") }, "\(silent.events)")
        let silentID = recorder.all.compactMap { event -> Int? in
            if case .connectAttemptStarted(_, let id, silentAddress) = event { return id } else { return nil }
        }.first
        #expect(recorder.count {
            if case .connectivityStateChanged(_, silentID, .connecting, .idle, let reason) = $0 { return reason?.code == .ok }
            return false
        } == 1)
        #expect(recorder.count { if case .connectAttemptFailed = $0 { return true } else { return false } } == 0)
        for index in 0..<5 { #expect(await channel.call("/test.Raw/Get", [UInt8(index)], timeout: .seconds(5)).status == .ok) }
        #expect(fleet.counts == [6, 0, 0] && Self.attempted(recorder) == 2)
    }

    @Test("pick_first with health checks: an address whose health check has not answered is let go of once another serves")
    func pickFirstReleasesAnUnansweredHealthCheck() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let silent = try ScriptedPeer("health-silent")  // connects, never answers the Watch
        defer { silent.stop() }
        let silentAddress = NetworkAddress(ip: "127.0.0.1", port: silent.port)!
        var configuration = Configuration()
        configuration.healthCheckServiceName = ""
        let (channel, _) = try fleet.channel(
            .pickFirst, addresses: [silentAddress, fleet.addresses()[0]], configuration: configuration)
        #expect(await channel.call("/test.Raw/Get", [1], timeout: .seconds(10)).status == .ok)
        // Its connection was up, waiting for the health check's first answer: closed, not kept for ever (it would
        // have taken the calls once it answered, being first).
        #expect(await eventually { silent.events.contains("eof") }, "\(silent.events)")
        #expect(fleet.counts == [2, 0, 0], "the health Watch and the call")
    }

    @Test("pick_first with connectionsPerTarget 2: both connections of an address are tried together, and both kept")
    func pickFirstConnectsAnAddressAsAGroup() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        let silent = try ScriptedPeer("silent")
        defer { silent.stop() }
        let silentAddress = NetworkAddress(ip: "127.0.0.1", port: silent.port)!
        var configuration = Configuration()
        configuration.minConnectTimeout = .seconds(60)
        configuration.connectionsPerTarget = 2
        let (channel, recorder) = try fleet.channel(
            .pickFirst, addresses: [silentAddress, fleet.addresses()[0]], configuration: configuration)
        let statuses = await withTaskGroup(of: CallStatus.self) { group in
            for index in 0..<8 {
                group.addTask {
                    await channel.call("/test.Raw/Get", [UInt8(index)], metadata: ["x-sleep-ms": "100"], timeout: .seconds(10)).status
                }
            }
            return await group.reduce(into: [CallStatus]()) { $0.append($1) }
        }
        #expect(statuses.allSatisfy { $0.isOK }, "\(statuses)")
        // Both connections to the silent address at once, then both to the first server; it moved on once, not
        // from one silent connection to the other.
        let server = fleet.addresses()[0]
        #expect(Self.dialled(recorder) == ["\(silentAddress)", "\(silentAddress)", "\(server)", "\(server)"])
        #expect(await eventually { silent.events.filter { $0 == "eof" }.count == 2 }, "\(silent.events)")
        #expect(await eventually { Self.connected(recorder) == 2 }, "both connections to the server are up")
        #expect(fleet.counts == [8, 0, 0])
    }

    @Test("pick_first (RFC 8305 §4, gRFC A61): IPv6 and IPv4 addresses are tried in turn, not every IPv6 one first")
    func pickFirstInterleavesFamilies() async throws {
        let fleet = try Fleet()
        defer { fleet.shutdown() }
        // Two IPv6 addresses nobody listens on (refused, or unreachable where IPv6 is off), then the servers.
        let dead = (0..<2).map { _ in NetworkAddress(ip: "::1", port: freePort())! }
        let (channel, recorder) = try fleet.channel(.pickFirst, addresses: dead + [fleet.addresses()[0]])
        let response = await channel.call("/test.Raw/Get", [1], timeout: .seconds(5))
        #expect(response.status == .ok, "\(response.status)")
        // Resolved order [v6, v6, v4] is tried as [v6, v4, v6]. (The second IPv6 address is dialled only if the
        // server takes longer than the attempt delay to send its SETTINGS.)
        #expect(Array(Self.dialled(recorder).prefix(2)) == ["\(dead[0])", "\(fleet.addresses()[0])"])
        #expect(fleet.counts == [1, 0, 0])
    }

    @Test("gRFC A105: with every stream in use, another connection opens (up to the limit) instead of queueing")
    func moreConnectionsWhenStreamsRunOut() async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 2
        for (limit, expected) in [(nil, 1), (3, 3)] as [(Int?, Int)] {
            let loop = try ReactorLoop()
            loop.start()
            defer { loop.shutdown() }
            let server = try EchoServer(options: options, eventLoop: loop)
            defer { server.close() }
            var configuration = Configuration()
            configuration.maxConnectionsPerTarget = limit
            let channel = try GRPCChannel(target: server.address, configuration: configuration, eventLoop: loop)
            #expect(await channel.call("/test.Raw/Get", [0], timeout: .seconds(5)).status == .ok)  // one connection up
            // Each call takes 1.5 s, so that the six are under way together on a loaded machine too.
            let statuses = await withTaskGroup(of: CallStatus.self) { group in
                for index in 0..<6 {
                    group.addTask {
                        await channel.call("/test.Raw/Get", [UInt8(index)], metadata: ["x-sleep-ms": "1500"], timeout: .seconds(20)).status
                    }
                }
                return await group.reduce(into: [CallStatus]()) { $0.append($1) }
            }
            #expect(statuses.allSatisfy { $0.isOK }, "\(statuses)")
            let connections = server.requestsPerConnection()
            let limitText = limit.map(String.init) ?? "none"
            #expect(connections.count == expected, "limit \(limitText): \(connections)")
            #expect(connections.reduce(0, +) == 7)
        }
    }
}
