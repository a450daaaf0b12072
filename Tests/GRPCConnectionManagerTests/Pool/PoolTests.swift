import Testing

@testable import GRPCCMCalls
@testable import GRPCCMPool
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// The pool's picking and waiting, as pure values and with connections that need no socket (`FakeConnector`).
@Suite("Pool without sockets")
struct PoolTests {
    final class Entry: WaitQueueEntry {
        let name: Int
        var queued = false
        init(_ name: Int) { self.name = name }
    }

    @Test("the wait queue: first in first out, bounded, withdrawn entries skipped and not counted")
    func waitQueue() {
        var queue = WaitQueue<Entry>(capacity: 3)
        let entries = (0..<5).map(Entry.init)
        let first = queue.enqueue(entries[0]) && queue.enqueue(entries[1]) && queue.enqueue(entries[2])
        #expect(first)
        let fourth = queue.enqueue(entries[3])
        #expect(!fourth, "full at 3")
        queue.withdraw(entries[1])
        #expect(queue.count == 2)
        let again = queue.enqueue(entries[3])
        #expect(again, "a withdrawn entry frees its place at once")
        let firstOut = queue.dequeue()?.name
        #expect(firstOut == 0)
        let secondOut = queue.dequeue()?.name
        #expect(secondOut == 2, "the withdrawn entry is skipped")
        queue.requeueFirst(entries[4])
        let rest = queue.removeAll().map(\.name)
        #expect(rest == [4, 3])
        let none = queue.dequeue()
        #expect(queue.isEmpty && none == nil)
    }

    @Test("the wait queue lets go of withdrawn entries that never reach the front (a queue nobody serves)")
    func waitQueueDropsWithdrawn() {
        var queue = WaitQueue<Entry>(capacity: 1_000)
        let stays = Entry(-1)
        let enqueued = queue.enqueue(stays)
        #expect(enqueued)
        for name in 0..<10_000 {
            let entry = Entry(name)
            guard queue.enqueue(entry) else { Issue.record("refused at \(name)"); return }
            queue.withdraw(entry)  // its deadline passed while it waited
        }
        #expect(queue.count == 1)
        #expect(queue.storedCount <= 2 * queue.count + 32, "withdrawn entries held: \(queue.storedCount)")
        let kept = queue.enqueue(Entry(10_000))
        #expect(kept)
        let waiting = queue.removeAll().map(\.name)
        #expect(waiting == [-1, 10_000], "the waiting ones keep their order")
    }

    @Test("the picker takes the least-loaded usable candidate and spreads ties")
    func picker() {
        var picker = Picker()
        let loads = [3, 1, 1, 0]
        let usable = [true, true, true, false]
        var picked: [Int] = []
        for _ in 0..<4 { picked.append(picker.pick(count: 4) { (usable[$0], loads[$0]) }!) }
        #expect(Set(picked) == [1, 2], "the unusable one is never picked, the ties alternate: \(picked)")
        #expect(picker.pick(count: 2) { _ in (false, 0) } == nil)
        #expect(picker.pick(count: 1) { _ in (true, 9) } == 0)
    }

    @Test("round_robin gives the usable candidates equal turns, whatever sits between them; pick_first the earliest")
    func policies() {
        var roundRobin = Picker(policy: .roundRobin)
        let usable = [true, false, true, true]
        var turns = [0, 0, 0, 0]
        for _ in 0..<30 { turns[roundRobin.pick(count: 4) { (usable[$0], 0) }!] += 1 }
        #expect(turns == [10, 0, 10, 10])
        var pickFirst = Picker(policy: .pickFirst)
        #expect(pickFirst.pick(count: 4) { (usable[$0], 9 - $0) } == 0)
        #expect(pickFirst.pick(count: 4) { index in (index >= 2, 0) } == 2)
        #expect(pickFirst.pick(count: 4) { _ in (false, 0) } == nil)
    }

    @Test("pick_first's order (RFC 8305 §4): the families alternate from the first address's, each in its own order")
    func pickFirstOrderInterleavesFamilies() {
        func v4(_ port: Int) -> NetworkAddress { NetworkAddress(ip: "127.0.0.1", port: port)! }
        func v6(_ port: Int) -> NetworkAddress { NetworkAddress(ip: "::1", port: port)! }
        let cases: [([NetworkAddress], [NetworkAddress])] = [
            ([], []),
            ([v6(1), v6(2), v6(3), v4(4), v4(5)], [v6(1), v4(4), v6(2), v4(5), v6(3)]),
            ([v4(1), v6(2), v6(3), v6(4)], [v4(1), v6(2), v6(3), v6(4)]),
            ([v4(1), v4(2), v6(3)], [v4(1), v6(3), v4(2)]),
            ([v4(1), v4(2)], [v4(1), v4(2)]),
        ]
        for (resolved, tried) in cases {
            #expect(LoadBalancingPolicy.pickFirstOrder(resolved) == tried, "\(resolved)")
        }
    }

    /// Addresses installed at once, as a numeric target's are: a pool of several addresses without a lookup.
    struct FixedResolver: AddressResolver {
        let addresses: [NetworkAddress]
        func fixedAddresses(for target: Target) -> [NetworkAddress]? { self.addresses }
        func resolve(
            _ target: Target, on reactor: Reactor, completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
        ) {}
        static func ports(_ ports: Int...) -> FixedResolver {
            FixedResolver(addresses: ports.map { NetworkAddress(ip: "127.0.0.1", port: $0)! })
        }
    }

    @Test("pick_first: an address's connections are one attempt; the next address is tried once all of them failed")
    func pickFirstMovesOnPerAddress() throws {
        let rig = try Rig(connectionsPerTarget: 2, resolver: FixedResolver.ports(1, 2, 3), policy: .pickFirst)
        defer { rig.finish() }
        rig.call(1, waitForReady: true)
        #expect(rig.connector.made.count == 2, "both connections to the first address")
        #expect(rig.reactor.timerCount == 1, "the attempt delay")
        rig.connector.made[0].fail()
        #expect(rig.connector.made.count == 2, "its other connection is still trying")
        rig.connector.made[1].fail()
        #expect(rig.connector.made.count == 4, "then both to the second, not the third as well")
        // The second address connects: the first's backoffs and the attempt delay go, the call goes out.
        rig.connector.made[2].becomeReady()
        #expect(rig.connector.made[2].opened.count == 1)
        #expect(rig.reactor.timerCount == 0, "no backoff or attempt delay left armed")
        #expect(rig.pool.subchannelStates == [.idle, .idle, .ready, .connecting, .idle, .idle])
    }

    @Test("pick_first: the first to connect is kept; an attempt under way elsewhere is let go of, its connection closed")
    func pickFirstReleasesTheOthers() throws {
        let rig = try Rig(resolver: FixedResolver.ports(1, 2), policy: .pickFirst)
        defer { rig.finish() }
        rig.call(1)
        rig.pool.connectAll()  // eager: the second address is tried too (as the attempt delay would)
        rig.connector.made[0].fail()
        #expect(rig.connector.made.count == 2)
        rig.connector.made[1].becomeReady()
        #expect(rig.pool.subchannelStates == [.idle, .ready], "the first, in its backoff, let go of")
        #expect(rig.reactor.timerCount == 0)
        // The other way round: the second connects while the first still tries.
        let again = try Rig(resolver: FixedResolver.ports(1, 2), policy: .pickFirst)
        defer { again.finish() }
        again.pool.connectAll()
        again.call(1)
        #expect(again.connector.made.count == 1)
        again.connector.made[0].fail()
        again.connector.made[1].becomeReady()
        #expect(again.connector.made[1].opened.count == 1)
    }

    @Test("pick_first: attempts that fail as they start move on at once, with one attempt delay armed at most")
    func pickFirstSynchronousFailure() throws {
        // One of the first address's two connections fails as it starts: the other still tries.
        let rig = try Rig(connectionsPerTarget: 2, resolver: FixedResolver.ports(1, 2, 3), policy: .pickFirst)
        rig.connector.failAtConnect = [0]
        rig.call(1, waitForReady: true)
        #expect(rig.connector.made.count == 2)
        #expect(rig.reactor.timerCount == 2, "a backoff and one attempt delay")
        rig.finish()
        #expect(rig.reactor.timerCount == 0, "nothing left armed (a second attempt delay replaced the first)")
        // Both fail as they start: on to the second address at once.
        let both = try Rig(connectionsPerTarget: 2, resolver: FixedResolver.ports(1, 2, 3), policy: .pickFirst)
        both.connector.failAtConnect = [0, 1]
        both.call(1, waitForReady: true)
        #expect(both.connector.made.count == 4)
        #expect(both.connector.made[2].closedWith == nil && both.connector.made[3].closedWith == nil)
        #expect(both.reactor.timerCount == 3, "two backoffs and one attempt delay")
        both.finish()
        #expect(both.reactor.timerCount == 0)
    }

    @Test("pick_first: when the attempt delay passes, the next address is tried too, but only while a call waits")
    func pickFirstAttemptDelay() throws {
        /// Runs the loop on this thread (a few turns at most) until its timers have fired.
        func fireTimers(_ rig: Rig) throws {
            for _ in 0..<100 where rig.reactor.timerCount > 0 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
            #expect(rig.reactor.timerCount == 0)
        }
        let rig = try Rig(resolver: FixedResolver.ports(1, 2, 3), policy: .pickFirst, attemptDelay: .milliseconds(1))
        defer { rig.finish() }
        rig.call(1)
        try fireTimers(rig)
        #expect(rig.connector.made.count == 3, "each delay adds the next address; the earlier attempts go on")
        #expect(rig.connector.made.allSatisfy { $0.closedWith == nil })

        let idle = try Rig(resolver: FixedResolver.ports(1, 2, 3), policy: .pickFirst, attemptDelay: .milliseconds(1))
        defer { idle.finish() }
        let call = idle.call(1)
        call.cancelFromAnyThread()
        _ = try idle.reactor.runOnce(maxWaitMilliseconds: 0)
        #expect(idle.pool.queuedCallCount == 0)
        try fireTimers(idle)
        #expect(idle.connector.made.count == 1, "nobody waits: the second address is not dialled")
    }

    /// A pool on a reactor that does not run: the test thread plays the reactor thread.
    struct Rig {
        let reactor: Reactor
        let connector = FakeConnector()
        let pool: ServicePool
        let environment: CallEnvironment
        let completions = PThreadLock<[Int: CallStatus]>([:])

        init(
            connectionsPerTarget: Int = 1, maxQueuedCalls: Int = 100, target: String = "127.0.0.1:1",
            resolver: any AddressResolver = SystemResolver(), backoffBase: Duration = .seconds(10),
            minimumResolutionInterval: Duration = .seconds(1), policy: LoadBalancingPolicy = .leastLoaded,
            attemptDelay: Duration = .milliseconds(250)
        ) throws {
            self.reactor = try Reactor()
            let bus = EventBus(reactor: self.reactor).single
            var settings = PoolSettings(
                connectionsPerTarget: connectionsPerTarget, maxQueuedCalls: maxQueuedCalls,
                backoff: .init(base: backoffBase, multiplier: 1.6, jitter: 0, maximum: .seconds(10)),
                keepAliveTime: .seconds(30), idleTimeout: .zero, resolveRetryDelay: .seconds(1))
            settings.minimumResolutionInterval = minimumResolutionInterval
            settings.loadBalancingPolicy = policy
            settings.connectionAttemptDelay = attemptDelay
            self.pool = ServicePool(
                reactor: self.reactor, service: "s", target: try Target(parsing: target), settings: settings,
                connector: self.connector, bus: bus, connectionIDs: ConnectionIDSource(), resolver: resolver)
            self.environment = CallEnvironment(
                reactor: self.reactor, service: "s", router: self.pool, bus: bus,
                policies: CallPolicies(admission: nil, retry: nil), maxHeaderListSize: 16 << 10)
        }

        @discardableResult
        func call(_ id: Int, waitForReady: Bool = false) -> ClientCall {
            let completions = self.completions
            let call = ClientCall(
                environment: self.environment, path: "/p.S/M\(id)", metadata: [:], request: [UInt8(id)], deadline: 0,
                maxReceiveMessageSize: 1 << 20, waitForReady: waitForReady
            ) { response in completions.withLock { $0[id] = response.status } }
            call.start()
            return call
        }

        /// The deferred phase: completions run.
        func endTurn() { self.reactor.runEndOfTurnForTesting() }

        /// Connects every subchannel, each connection ready with room for `streamLimit` streams.
        func connectAll(streamLimit: Int) {
            self.pool.connectAll()
            for transport in self.connector.made {
                transport.streamLimit = streamLimit
                transport.becomeReady()
            }
        }

        /// Closes the pool (every call ends, the loop lets go of the pool's shutdown hook), so nothing outlives the
        /// test: a loop that never runs never gets to release what it holds otherwise.
        func finish() {
            self.pool.close(graceful: false)
            self.endTurn()
        }

        func status(_ id: Int) -> CallStatus? { self.completions.withLock { $0[id] } }
    }

    @Test("a call waits while the connection connects, and goes out once it is ready")
    func waitsForReady() throws {
        let rig = try Rig()
        defer { rig.finish() }
        rig.call(1)
        #expect(rig.connector.made.count == 1 && rig.connector.made[0].connectCalls == 1)
        #expect(rig.pool.queuedCallCount == 1)
        rig.connector.made[0].becomeReady()
        #expect(rig.connector.made[0].opened.map(\.path) == ["/p.S/M1"])
        #expect(rig.pool.queuedCallCount == 0)
        rig.connector.made[0].answer(1, message: [1])
        rig.endTurn()
        #expect(rig.status(1) == .ok)
    }

    @Test("in TRANSIENT_FAILURE fail-fast calls fail at once; wait-for-ready calls keep waiting")
    func failFastVersusWaitForReady() throws {
        let rig = try Rig()
        defer { rig.finish() }
        rig.call(1)
        rig.call(2, waitForReady: true)
        rig.connector.made[0].fail("connection refused")
        rig.endTurn()
        #expect(rig.status(1) == CallStatus(code: .unavailable, message: "connection refused"))
        #expect(rig.status(2) == nil)
        rig.call(3)
        #expect(rig.status(3) == nil, "it completes in a later turn, never inside start()")
        rig.endTurn()
        #expect(rig.status(3)?.code == .unavailable)
        #expect(rig.pool.queuedCallCount == 1, "the wait-for-ready call still waits")
    }

    @Test("sticky TRANSIENT_FAILURE (gRFC A62): while a connection retries after a failure, fail-fast calls fail at once")
    func failFastWhileRetrying() throws {
        let rig = try Rig(backoffBase: .milliseconds(1))
        defer { rig.finish() }
        rig.call(1)
        rig.connector.made[0].fail("connection timed out")
        rig.endTurn()
        #expect(rig.status(1) == CallStatus(code: .unavailable, message: "connection timed out"))
        // The backoff passes with nothing waiting: IDLE. The next call connects again, and waits for that attempt.
        for _ in 0..<100 where rig.pool.subchannelStates != [.idle] { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        rig.call(2)
        #expect(rig.connector.made.count == 2)
        rig.endTurn()
        #expect(rig.status(2) == nil, "it waits for the attempt it started")
        // While that retry is under way, the pool reports TRANSIENT_FAILURE and a fail-fast call fails at once.
        #expect(rig.pool.state == .transientFailure)
        rig.call(3)
        rig.endTurn()
        #expect(rig.status(3) == CallStatus(code: .unavailable, message: "connection timed out"))
        rig.call(4, waitForReady: true)
        rig.endTurn()
        #expect(rig.status(4) == nil, "wait-for-ready waits")
        rig.connector.made[1].becomeReady()
        #expect(rig.connector.made[1].opened.map(\.path) == ["/p.S/M2", "/p.S/M4"])
    }

    @Test("not sticky after losing an established connection: its reconnect is immediate, and calls wait for it")
    func lostEstablishedConnectionIsNotFailing() throws {
        let rig = try Rig(backoffBase: .milliseconds(1))
        defer { rig.finish() }
        rig.pool.connectAll()
        rig.connector.made[0].becomeReady()
        // Ready for longer than the backoff's base delay: established.
        for _ in 0..<3 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 2) }
        rig.connector.made[0].fail("connection reset")
        rig.call(1)
        rig.endTurn()
        #expect(rig.status(1) == nil, "it waits for the reconnect")
        #expect(rig.pool.state != .transientFailure)
        for _ in 0..<100 where rig.connector.made.count < 2 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        rig.call(2)
        rig.endTurn()
        #expect(rig.status(2) == nil, "the reconnect under way is no failure")
        rig.connector.made[1].becomeReady()
        #expect(rig.connector.made[1].opened.map(\.path) == ["/p.S/M1", "/p.S/M2"])
    }

    @Test("a fail-fast call waits for every attempt it found or started, not only the first to fail")
    func waitingCallsWaitForEveryAttempt() throws {
        let rig = try Rig(resolver: FixedResolver.ports(1, 2), backoffBase: .milliseconds(1))
        defer { rig.finish() }
        rig.call(1)
        rig.connector.made[0].fail()
        rig.connector.made[1].fail()
        rig.endTurn()
        #expect(rig.status(1)?.code == .unavailable)
        // Both rest in IDLE after their backoff; a call connects both again, and one fails at once.
        for _ in 0..<100 where rig.pool.subchannelStates != [.idle, .idle] { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        rig.call(2)
        #expect(rig.connector.made.count == 4)
        rig.connector.made[2].fail()
        rig.endTurn()
        #expect(rig.status(2) == nil, "the other attempt is still under way")
        rig.connector.made[3].becomeReady()
        #expect(rig.connector.made[3].opened.map(\.path) == ["/p.S/M2"])
    }

    @Test("GOAWAY too_many_pings doubles the keepalive interval for the whole service: every connection, and new ones")
    func tooManyPingsDoublesForTheService() throws {
        let rig = try Rig(connectionsPerTarget: 2, backoffBase: .milliseconds(1))
        defer { rig.finish() }
        rig.pool.connectAll()
        for transport in rig.connector.made { transport.becomeReady() }
        #expect(rig.pool.subchannelKeepAliveTimes == [.seconds(30), .seconds(30)])
        rig.connector.made[0].goAway(errorCode: 0xb, debugData: "too_many_pings")
        #expect(rig.pool.subchannelKeepAliveTimes == [.seconds(60), .seconds(60)], "the other would hear the same")
        // The reconnect after that GOAWAY uses it.
        for _ in 0..<100 where rig.connector.made.count < 3 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        #expect(rig.connector.made.last?.keepAliveTime == .seconds(60))
    }

    @Test("waiting fail-fast calls give up once every connection is failing, as a new call would, though a failed connection's own retry is under way")
    func waitingCallsDoNotOutwaitNewOnes() throws {
        let rig = try Rig(resolver: FixedResolver.ports(1, 2), backoffBase: .milliseconds(1))
        defer { rig.finish() }
        rig.call(1)
        #expect(rig.connector.made.count == 2)
        // The first address fails while the second's first attempt is under way: the call waits for that one.
        rig.connector.made[0].fail("first refused")
        rig.endTurn()
        #expect(rig.status(1) == nil)
        // The first's backoff runs out while the call waits: it tries again on its own.
        for _ in 0..<100 where rig.connector.made.count < 3 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        #expect(rig.connector.made.count == 3)
        // The second fails too: every connection is failing, and the retry under way is not one the call waits for.
        rig.connector.made[1].fail("second refused")
        rig.call(2)
        rig.endTurn()
        #expect(rig.status(2)?.code == .unavailable, "a new call fails at once")
        #expect(rig.status(1)?.code == .unavailable, "and so does the one that waited")
    }

    @Test("an attempt made through connect() holds waiting calls, though the connection's previous retry was one its backoff started on its own")
    func connectAfterAnUnaskedRetryHoldsCalls() throws {
        // Backoffs of 50 and 80 ms: the test's own steps between them take far less.
        let rig = try Rig(resolver: FixedResolver.ports(1, 2), backoffBase: .milliseconds(50))
        defer { rig.finish() }
        let first = rig.call(1)
        rig.connector.made[0].fail("first refused")
        // The first retries on its own while call 1 waits, and fails again.
        for _ in 0..<100 where rig.connector.made.count < 3 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        rig.connector.made[2].fail("first refused again")
        rig.endTurn()
        #expect(rig.status(1) == nil, "the second's first attempt is still under way")
        // Nobody waits when its backoff runs out: it goes IDLE, and the pool connects it again at once (the second
        // is connecting: round_robin keeps every address connected while the channel is used).
        first.cancelFromAnyThread()
        for _ in 0..<100 where rig.connector.made.count < 4 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        #expect(rig.connector.made.count == 4)
        // A call comes and waits; then the second fails: the first's attempt under way, made through connect(),
        // is one the call waits for.
        rig.call(2)
        rig.connector.made[1].fail("second refused")
        rig.endTurn()
        #expect(rig.status(2) == nil, "the attempt under way was asked for")
        rig.connector.made[3].becomeReady()
        #expect(rig.connector.made[3].opened.map(\.path) == ["/p.S/M2"])
    }

    @Test("round_robin: calls drained from the queue take turns over the connections with room")
    func drainedCallsTakeTurns() throws {
        let rig = try Rig(resolver: FixedResolver.ports(1, 2), policy: .roundRobin)
        defer { rig.finish() }
        rig.connectAll(streamLimit: 1)
        for id in 1...6 { rig.call(id) }
        #expect(rig.pool.queuedCallCount == 4)
        // Both make room for two more at once (a SETTINGS raising the limit): the queue drains in turns.
        for transport in rig.connector.made { transport.streamLimit = 3 }
        let first = rig.connector.made[0]
        first.delegate?.transportHasCapacity(first)
        #expect(rig.pool.queuedCallCount == 0)
        let drained = rig.connector.made.map { $0.opened.dropFirst().map(\.path) }
        #expect(drained.map(\.count) == [2, 2])
        #expect(drained.allSatisfy { Set($0) == ["/p.S/M3", "/p.S/M5"] || Set($0) == ["/p.S/M4", "/p.S/M6"] }, "\(drained)")
    }

    @Test("a failed lookup with connections kept: fail-fast calls say why the connections fail, not the lookup")
    func connectionErrorOutranksAFailedLookup() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver, minimumResolutionInterval: .zero)
        defer { rig.finish() }
        rig.call(1)
        resolver.answer(.success([NetworkAddress(ip: "127.0.0.1", port: 1)!]))
        // The connection fails (a lookup is asked for again, and fails too).
        rig.connector.made[0].fail("connection refused")
        resolver.answer(.failure(CallStatus(code: .unavailable, message: "DNS timed out")))
        rig.call(2)
        rig.endTurn()
        #expect(rig.status(2)?.code == .unavailable)
        #expect(rig.status(2)?.message.contains("connection refused") == true, "\(String(describing: rig.status(2)))")
        #expect(rig.pool.lastError?.message.contains("connection refused") == true)
    }

    @Test("the least-loaded ready connection takes each call; a freed stream takes the next queued call")
    func picksAndDrains() throws {
        let rig = try Rig(connectionsPerTarget: 2)
        defer { rig.finish() }
        rig.connectAll(streamLimit: 1)
        for id in 1...3 { rig.call(id) }
        let opened = rig.connector.made.map { $0.opened.count }
        #expect(opened == [1, 1], "one stream on each connection")
        #expect(rig.pool.queuedCallCount == 1)
        let first = rig.connector.made.first { $0.opened.first?.path == "/p.S/M1" }!
        first.answer(first.opened[0].streamID, message: [1])
        #expect(first.opened.count == 2 && first.opened[1].path == "/p.S/M3", "the queued call took the freed stream")
        #expect(rig.pool.queuedCallCount == 0)
    }

    /// Answers lookups when the test says, counting them.
    final class HeldResolver: AddressResolver, @unchecked Sendable {
        // `@unchecked`: touched by the test thread only (it plays the reactor thread).
        private(set) var pending: [@Sendable (Result<[NetworkAddress], CallStatus>) -> Void] = []
        private(set) var lookups = 0
        func resolve(
            _ target: Target, on reactor: Reactor,
            completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
        ) {
            self.lookups += 1
            self.pending.append(completion)
        }
        func answer(_ result: Result<[NetworkAddress], CallStatus>) {
            let waiting = self.pending
            self.pending.removeAll()
            for completion in waiting { completion(result) }
        }
    }

    @Test("while a name does not resolve, calls ask at most once per minimumResolutionInterval and fail fast with why")
    func failingLookupsAreNotRepeatedPerCall() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver)
        defer { rig.finish() }
        rig.call(1)
        #expect(resolver.lookups == 1)
        resolver.answer(.failure(CallStatus(code: .unavailable, message: "name.test: no such name")))
        rig.endTurn()
        #expect(rig.status(1) == CallStatus(code: .unavailable, message: "name.test: no such name"))
        for id in 2...20 { rig.call(id) }
        rig.endTurn()
        #expect(resolver.lookups == 1, "the next lookup waits for minimumResolutionInterval")
        for id in 2...20 {
            #expect(rig.status(id) == CallStatus(code: .unavailable, message: "name.test: no such name"), "call \(id)")
        }
        rig.call(21, waitForReady: true)
        rig.endTurn()
        #expect(rig.status(21) == nil, "a wait-for-ready call waits for the next lookup")
    }

    @Test("an answer with no address, with a wait-for-ready call waiting, is asked again after resolveRetryDelay, as a failure is")
    func emptyAnswerAskedAgain() throws {
        // Asked again only by the periodic resolution before (or, with it off, by the next call routed): the
        // waiting call waited until its deadline though the name had addresses again.
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver, minimumResolutionInterval: .zero)
        defer { rig.finish() }
        rig.call(1, waitForReady: true)
        resolver.answer(.success([]))
        #expect(rig.reactor.timerCount == 2, "the periodic resolution and the retry of the lookup")
        for _ in 0..<200 where resolver.lookups < 2 { _ = try rig.reactor.runOnce(maxWaitMilliseconds: 20) }
        #expect(resolver.lookups == 2, "asked again after resolveRetryDelay (1 s)")
        resolver.answer(.success([NetworkAddress(ip: "127.0.0.1", port: 1)!]))
        #expect(rig.connector.made.count == 1, "the waiting call connects to the address that came back")
        #expect(rig.status(1) == nil)
    }

    @Test("a closed pool neither dials nor hooks itself to the loop again: not for connectAll, not for a call")
    func closedPoolStaysClosed() throws {
        let rig = try Rig()
        defer { rig.finish() }
        rig.call(1)
        #expect(rig.reactor.shutdownHookCount == 1)
        rig.pool.close(graceful: false)
        #expect(rig.reactor.shutdownHookCount == 0)
        // The hook kept the closed pool, its subchannels and resolver alive until the loop stopped.
        rig.pool.connectAll()
        rig.call(2)
        rig.endTurn()
        #expect(rig.status(2)?.code == .unavailable)
        #expect(rig.reactor.shutdownHookCount == 0)
        #expect(rig.connector.made.count == 1, "no new connection")
    }

    @Test("connecting a pool again while its name does not resolve asks at most once per minimumResolutionInterval")
    func connectAllRespectsTheMinimumInterval() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver, minimumResolutionInterval: .seconds(60))
        defer { rig.finish() }
        rig.pool.connectAll()
        #expect(resolver.lookups == 1)
        resolver.answer(.failure(CallStatus(code: .unavailable, message: "name.test: no such name")))
        // What `manager.connection(service:)` does each time it is asked for the service.
        for _ in 0..<5 { rig.pool.connectAll() }
        #expect(resolver.lookups == 1, "the next lookup waits for minimumResolutionInterval")
    }

    @Test("the first lookup goes at once, however long minimumResolutionInterval is (the clock counts from boot)")
    func firstLookupAtOnce() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver, minimumResolutionInterval: .seconds(1 << 40))
        defer { rig.finish() }
        rig.call(1, waitForReady: true)
        #expect(resolver.lookups == 1)
    }

    @Test("a failed lookup that keeps the last good addresses leaves an idle pool IDLE, not TRANSIENT_FAILURE")
    func failedLookupKeepsIdleState() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver, minimumResolutionInterval: .zero)
        defer { rig.finish() }
        rig.call(1)
        resolver.answer(.success([NetworkAddress(ip: "127.0.0.1", port: 1)!]))
        rig.connector.made[0].becomeReady()
        #expect(rig.pool.state == .ready)
        // The server sends GOAWAY: the connection goes IDLE, and the name is asked again; the lookup fails.
        rig.connector.made[0].goAway()
        #expect(resolver.lookups == 2)
        resolver.answer(.failure(CallStatus(code: .unavailable, message: "DNS timed out")))
        #expect(rig.pool.state == .idle)
    }

    @Test("closing a pool cancels its resolution timers at once (they no longer linger for up to 36 s)")
    func closeCancelsResolutionTimers() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver)
        rig.call(1)
        resolver.answer(.success([NetworkAddress(ip: "127.0.0.1", port: 1)!]))
        #expect(rig.reactor.timerCount == 1, "the periodic resolution")
        rig.connector.made[0].fail("connection refused")  // asks for a lookup sooner: within the minimum interval
        #expect(rig.reactor.timerCount == 3, "and the connection's backoff")
        rig.finish()
        #expect(rig.reactor.timerCount == 0)
        // A failed lookup with a wait-for-ready call queued: it is tried again later, unless the pool closes.
        let failing = HeldResolver()
        let waiting = try Rig(target: "name.test:1", resolver: failing)
        waiting.call(1, waitForReady: true)
        failing.answer(.failure(CallStatus(code: .unavailable, message: "name.test: no such name")))
        #expect(waiting.reactor.timerCount == 2, "the periodic resolution and the retry of the lookup")
        waiting.finish()
        #expect(waiting.reactor.timerCount == 0)
    }

    @Test("closing a pool cancels an eager reconnect that waits out a backoff (a GOAWAY before the connection was established)")
    func closeCancelsEagerReconnect() throws {
        let rig = try Rig()
        rig.pool.connectAll()
        #expect(rig.reactor.timerCount == 0)
        rig.connector.made[0].goAway()
        #expect(rig.reactor.timerCount == 1, "the reconnect, after the backoff's delay")
        rig.finish()
        #expect(rig.reactor.timerCount == 0)
    }

    @Test("a resolution that leaves only failing addresses fails the waiting fail-fast calls at once")
    func updateLeavingOnlyFailures() throws {
        let resolver = HeldResolver()
        let rig = try Rig(target: "name.test:1", resolver: resolver, minimumResolutionInterval: .zero)
        defer { rig.finish() }
        rig.call(1)
        rig.call(2, waitForReady: true)
        let a = NetworkAddress(ip: "127.0.0.1", port: 1)!
        let b = NetworkAddress(ip: "127.0.0.2", port: 1)!
        resolver.answer(.success([a, b]))
        #expect(rig.connector.made.count == 2)
        // A refuses (TRANSIENT_FAILURE, and the name is asked again); B is still connecting: the calls wait for it.
        rig.connector.made[0].fail("connection refused")
        rig.endTurn()
        #expect(rig.status(1) == nil)
        #expect(resolver.lookups == 2)
        // B is no longer resolved: only A, failing, is left.
        resolver.answer(.success([a]))
        rig.endTurn()
        #expect(rig.status(1) == CallStatus(code: .unavailable, message: "connection refused"))
        #expect(rig.status(2) == nil, "a wait-for-ready call waits on")
        // The lookup the failure asked for is answered too: a pending completion holds the pool (until a resolver
        // answers, as every real one does), and a lookup left unanswered would keep the test's pool and loop alive.
        resolver.answer(.failure(CallStatus(code: .unavailable, message: "the test is over")))
    }

    @Test("an eager pool (connectAll) reconnects after a GOAWAY to an established connection without waiting for a call")
    func eagerPoolReconnects() throws {
        let rig = try Rig(backoffBase: .zero)  // established as soon as it is READY
        defer { rig.finish() }
        rig.pool.connectAll()
        #expect(rig.connector.made.count == 1)
        rig.connector.made[0].becomeReady()
        rig.connector.made[0].goAway()
        #expect(rig.connector.made.count == 2, "a new connection, with no call waiting")
        #expect(rig.connector.made.last?.connectCalls == 1)
    }

    @Test("after a GOAWAY to a connection not yet established, the eager reconnect waits its backoff; a call does not")
    func eagerReconnectAfterEarlyGoAwayWaits() throws {
        let rig = try Rig()  // established after 10 s READY
        defer { rig.finish() }
        rig.pool.connectAll()
        rig.connector.made[0].becomeReady()
        rig.connector.made[0].goAway()
        #expect(rig.connector.made.count == 1, "no new connection at once")
        rig.call(1)
        #expect(rig.connector.made.count == 2, "a call connects at once all the same")
        #expect(rig.pool.queuedCallCount == 1)
    }

    @Test("maxQueuedCalls bounds the calls waiting, whatever they wait for")
    func queueBound() throws {
        let rig = try Rig(maxQueuedCalls: 2)
        defer { rig.finish() }
        for id in 1...3 { rig.call(id) }
        rig.endTurn()
        #expect(rig.status(3)?.code == .resourceExhausted)
        #expect(rig.status(1) == nil && rig.status(2) == nil)
        rig.pool.close(graceful: false)
        rig.endTurn()
        #expect(rig.status(1)?.code == .unavailable && rig.status(2)?.code == .unavailable)
    }
}
