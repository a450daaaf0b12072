import Foundation
import Synchronization
import Testing

@testable import GRPCCMCalls
@testable import GRPCConnectionManager
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// The etcd resolver and the registration helper against Debian's etcd-server, with grpcio backends.
@Suite("etcd discovery", .serialized)
struct EtcdTests {
    static func configuration(_ etcd: EtcdPeer) -> Configuration {
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        configuration.loadBalancingPolicy = .roundRobin
        configuration.etcd = Configuration.Etcd(endpoints: [etcd.endpoint])
        configuration.resolutionInterval = .seconds(1)
        configuration.minimumResolutionInterval = .milliseconds(50)
        return configuration
    }

    /// Which backends served `count` calls (recorded in `ledger`, every one OK).
    static func served(_ channel: GRPCChannel, _ count: Int, ledger: CompletionLedger, next id: inout Int) async -> Set<String> {
        var served: Set<String> = []
        for _ in 0..<count {
            id += 1
            let response = await channel.call("/echo.Echo/Get", [1], ledger: ledger, id: id)
            #expect(response.status == .ok, "\(response.status)")
            if let peer = response.initialMetadata["x-peer"] { served.insert(peer) }
        }
        return served
    }

    @Test("grpc-go's endpoint values are read; anything else is not an address")
    func values() {
        #expect(EtcdMessages.endpointAddress(EtcdMessages.endpointValue(address: "10.0.0.7:50051")) == "10.0.0.7:50051")
        #expect(EtcdMessages.endpointAddress(Array(#"{"Op":0,"Addr":"[::1]:80","Metadata":{"weight":3}}"#.utf8)) == "[::1]:80")
        #expect(EtcdMessages.endpointAddress(Array(#" { "Addr" : "1.2.3.4:5" } "#.utf8)) == "1.2.3.4:5")
        for bad in ["1.2.3.4:5", "{}", #"{"Addr":5}"#, #"{"Addr":"x\"y"}"#, "", #"{"Addr""#] {
            #expect(EtcdMessages.endpointAddress(Array(bad.utf8)) == nil, "\(bad)")
        }
        #expect(EtcdMessages.prefixEnd(Array("a/".utf8)) == Array("a0".utf8))
        #expect(EtcdMessages.prefixEnd([0x61, 0xFF]) == [0x62])
    }

    @Test("every call of the etcd client asks for a leader (hasleader), once, whatever the caller set")
    func callsRequireALeader() {
        for given in [[:], ["hasleader": "false"]] as [CallMetadata] {
            var call = InterceptedCall(
                service: "etcd", authority: "127.0.0.1:2379", path: EtcdMessages.rangePath, metadata: given,
                options: RequestOptions())
            guard case .proceed = RequireLeader().intercept(&call).action else {
                Issue.record("refused")
                continue
            }
            #expect(call.metadata.values(for: "hasleader") == [.string("true")])
        }
    }

    @Test("registered grpcio backends are found; calls follow additions and removals; no call is lost")
    func followsRegistrations() async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        let peers = try ["a", "b", "c"].map { try PythonPeer(name: $0) }
        defer { for peer in peers { peer.stop() } }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: [etcd.endpoint])
        var registrations: [EtcdRegistration] = []
        for peer in peers.prefix(2) {
            registrations.append(
                try await EtcdRegistration.register(name: "services/echo", address: peer.target, etcd: settings, eventLoop: loop))
        }
        let channel = try GRPCChannel(target: "etcd:///services/echo", configuration: Self.configuration(etcd), eventLoop: loop)
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 10, ledger: ledger, next: &id) == ["a", "b"])

        let third = try await EtcdRegistration.register(
            name: "services/echo", address: peers[2].target, etcd: settings, eventLoop: loop)
        var seen: Set<String> = []
        for _ in 0..<200 where !seen.contains("c") {
            seen.formUnion(await Self.served(channel, 3, ledger: ledger, next: &id))
        }
        #expect(seen.contains("c"), "the watch brought the new backend")

        await registrations[0].deregister()
        var withoutA = false
        for _ in 0..<200 where !withoutA {
            withoutA = await !Self.served(channel, 6, ledger: ledger, next: &id).contains("a")
        }
        #expect(withoutA, "the removed backend drains")
        #expect(await Self.served(channel, 9, ledger: ledger, next: &id) == ["b", "c"])
        #expect(ledger.completed == id && ledger.duplicates == 0)
        await registrations[1].deregister()
        await third.deregister()
    }

    @Test("every endpoint deregistered (a value that is not an address left): fail-fast calls fail, a wait-for-ready call waits for the next registration")
    func emptyRegistryIsAnAnswer() async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        let peers = try ["old", "new"].map { try PythonPeer(name: $0) }
        defer { for peer in peers { peer.stop() } }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: [etcd.endpoint])
        let old = try await EtcdRegistration.register(name: "services/gone", address: peers[0].target, etcd: settings, eventLoop: loop)
        // Someone else's key under the prefix, not an address: skipped, and it is no server either once `old` left.
        let raw = try GRPCChannel(target: etcd.endpoint, eventLoop: loop)
        _ = try await raw.unary(
            path: EtcdMessages.putPath,
            request: EtcdMessages.putRequest(key: "services/gone/lock", value: Array("not json".utf8), lease: 0))
        let channel = try GRPCChannel(target: "etcd:///services/gone", configuration: Self.configuration(etcd), eventLoop: loop)
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 2, ledger: ledger, next: &id) == ["old"])
        await old.deregister()
        // The server that left serves no more calls (kept, it would until it went away itself, or its address
        // served someone else).
        #expect(await eventually(timeout: 10) {
            let response = await channel.call("/echo.Echo/Get", [1], timeout: .seconds(2))
            return response.status.code == .unavailable && response.status.message.contains("no address")
        })
        let waiting = PThreadLock<UnaryResponse?>(nil)
        channel.unary(path: "/echo.Echo/Get", request: [2], options: RequestOptions(timeout: .seconds(20), waitForReady: true)) {
            response in waiting.withLock { $0 = response }
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(waiting.withLock { $0 } == nil, "it waits")
        let new = try await EtcdRegistration.register(name: "services/gone", address: peers[1].target, etcd: settings, eventLoop: loop)
        #expect(await eventually(timeout: 10) { waiting.withLock { $0 } != nil })
        #expect(waiting.withLock { $0 }?.status == .ok)
        #expect(waiting.withLock { $0 }?.initialMetadata["x-peer"] == "new")
        await new.deregister()
    }

    @Test("a value that is not an address is skipped; etcd going away keeps the last good addresses")
    func badInputKeepsService() async throws {
        let etcd = try EtcdPeer()
        let peer = try PythonPeer(name: "only")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: [etcd.endpoint])
        let registration = try await EtcdRegistration.register(
            name: "services/mixed", address: peer.target, etcd: settings, eventLoop: loop)
        // A value written by someone else, not an address.
        let raw = try GRPCChannel(target: etcd.endpoint, eventLoop: loop)
        _ = try await raw.unary(
            path: EtcdMessages.putPath,
            request: EtcdMessages.putRequest(key: "services/mixed/garbage", value: Array("not json".utf8), lease: 0))
        // And a server's bind address, which a client would dial as its own host.
        _ = try await raw.unary(
            path: EtcdMessages.putPath,
            request: EtcdMessages.putRequest(
                key: "services/mixed/any", value: EtcdMessages.endpointValue(address: "0.0.0.0:\(peer.port)"), lease: 0))
        let channel = try GRPCChannel(target: "etcd:///services/mixed", configuration: Self.configuration(etcd), eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 3, ledger: ledger, next: &id) == ["only"])
        #expect(
            await eventually {
                recorder.count {
                    if case .resolutionFailed(_, let error) = $0 {
                        return error.message.contains("services/mixed/garbage") && error.message.contains("services/mixed/any")
                    }
                    return false
                } > 0
            }, "the skipped value is reported")

        etcd.stop()
        #expect(
            await eventually(timeout: 10) {
                recorder.count { if case .resolutionFailed(_, let error) = $0 { return error.message.contains("etcd") } else { return false } } > 0
            })
        #expect(await Self.served(channel, 3, ledger: ledger, next: &id) == ["only"])
        #expect(ledger.completed == id && ledger.duplicates == 0)
        _ = registration
    }

    @Test("a change the watch reports is read though the lookup it starts fails (etcd stopped for a moment), with periodic lookups off")
    func changeOutlivesAFailedRead() async throws {
        let etcd = try EtcdPeer()
        defer {
            kill(etcd.pid, SIGCONT)
            etcd.stop()
        }
        let peers = [try PythonPeer(name: "a"), try PythonPeer(name: "b")]
        defer { peers.forEach { $0.stop() } }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: [etcd.endpoint])
        var configuration = Self.configuration(etcd)
        configuration.resolutionInterval = .zero  // lookups only when asked: nothing else reads a change again
        configuration.minimumResolutionInterval = .seconds(2)
        configuration.etcd?.timeout = .milliseconds(500)
        configuration.maxReconnectDelay = .milliseconds(300)
        let a = try await EtcdRegistration.register(name: "services/late", address: peers[0].target, etcd: settings, eventLoop: loop)
        let channel = try GRPCChannel(target: "etcd:///services/late", configuration: configuration, eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        /// The addresses the pool took last hold `count`.
        func resolved(_ count: Int) -> Bool {
            let last = recorder.all.last { if case .addressesResolved = $0 { true } else { false } }
            if case .addressesResolved(_, let addresses) = last { return addresses.count == count }
            return false
        }
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 2, ledger: ledger, next: &id) == ["a"])
        let b = try await EtcdRegistration.register(name: "services/late", address: peers[1].target, etcd: settings, eventLoop: loop)
        #expect(await eventually(timeout: 10) { resolved(2) })
        // Within the minimum interval of that lookup: the read of this change waits for it, and meets etcd stopped.
        let reported = channel.inspect { $0.changesReported }
        await a.deregister()
        #expect(await eventually { channel.inspect { $0.changesReported } > reported }, "the watch heard the removal")
        kill(etcd.pid, SIGSTOP)
        #expect(await eventually(timeout: 10) { recorder.count { if case .resolutionFailed = $0 { true } else { false } } > 0 })
        kill(etcd.pid, SIGCONT)
        // Read again after the retry delay; before, the change stayed unread (it took another failure to ask).
        #expect(await eventually(timeout: 10) { resolved(1) }, "a's removal reached the pool")
        #expect(await Self.served(channel, 4, ledger: ledger, next: &id) == ["b"])
        #expect(ledger.duplicates == 0)
        await b.deregister()
    }

    /// Puts `key` (a value without a lease) through `raw`, then reads `prefix`: etcd's revision after the put.
    static func put(_ key: String, readingPrefix prefix: String, through raw: GRPCChannel) async throws -> Int64 {
        _ = try await raw.unary(path: EtcdMessages.putPath, request: EtcdMessages.putRequest(key: key, value: [1], lease: 0))
        let response = try await raw.unary(path: EtcdMessages.rangePath, request: EtcdMessages.rangeRequest(prefix: prefix))
        return EtcdMessages.rangeResponse(response.message)?.revision ?? 0
    }

    /// A watcher's test rig: an etcd, a loop, a channel to etcd (`raw`), and a watcher of `prefix` (not started) that
    /// counts the changes it hears.
    final class WatchRig: Sendable {
        let etcd: EtcdPeer
        let loop: ReactorLoop
        let raw: GRPCChannel
        let prefix: String
        let watcher: EtcdWatcher
        private let heard = PThreadLock(0)
        private let reported = PThreadLock(0)
        /// What the watcher told: changes etcd reported, and the stream's ends (after which it reads again).
        var changes: Int { self.heard.withLock { $0 } }
        /// Only the changes etcd reported on the stream (an end of the stream is not one).
        var reportedChanges: Int { self.reported.withLock { $0 } }

        init(prefix: String) throws {
            self.etcd = try EtcdPeer()
            self.loop = try ReactorLoop()
            self.loop.start()
            // No circuit breaker: the puts that fail fast while etcd restarts (five at most, 10 ms apart) would open
            // it for 30 s, and every put after etcd came back was refused (the test then passed only when the
            // reopened stream happened to end, which also reports a change).
            var configuration = Configuration()
            configuration.enableCircuitBreaker = false
            self.raw = try GRPCChannel(target: self.etcd.endpoint, configuration: configuration, eventLoop: self.loop)
            self.prefix = prefix
            let heard = self.heard
            let reported = self.reported
            self.watcher = EtcdWatcher(client: self.raw, reactor: self.loop.reactor, prefix: prefix) { byEtcd in
                heard.withLock { $0 += 1 }
                if byEtcd { reported.withLock { $0 += 1 } }
            }
        }

        /// Puts `key` and reads the prefix: etcd's revision after the put.
        func put(_ key: String) async throws -> Int64 { try await EtcdTests.put(key, readingPrefix: self.prefix, through: self.raw) }

        func stop() {
            self.watcher.stop()
            self.loop.shutdown()
            self.etcd.stop()
        }
    }

    @Test("a watch etcd cancels (its revision compacted away) is reopened: later changes are heard")
    func compactedWatchIsReopened() async throws {
        let rig = try WatchRig(prefix: "w/")
        defer { rig.stop() }
        let (raw, loop, watcher) = (rig.raw, rig.loop, rig.watcher)
        for index in 0..<5 { _ = try await rig.put("w/\(index)") }
        let revision = try await rig.put("w/5")
        // CompactionRequest { revision = 1 }: every revision before the current one is gone.
        _ = try await raw.unary(path: "/etcdserverpb.KV/Compact", request: ProtobufWire.varintField(1, UInt64(revision)))
        // A watch from revision 2, compacted: etcd cancels it and keeps the stream.
        watcher.advance(to: 1)
        loop.reactor.execute { watcher.start() }
        #expect(await eventually { rig.changes >= 1 }, "the cancelled watch asks for a new read")
        // The read a resolver then makes moves the restart point; the reopened watch hears the next change.
        watcher.advance(to: revision)
        try await Task.sleep(for: .milliseconds(1500))
        let before = rig.reportedChanges
        _ = try await rig.put("w/new")
        #expect(await eventually { rig.reportedChanges > before }, "a change after the reopen is heard")
    }

    @Test("a watch stopped while its stream is being made (stop() from another thread) does not leave the stream open")
    func stopDuringStartLeavesNoStream() async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        /// Stops the watcher from inside the watch call's making: after start() found it running, before it
        /// recorded the stream (where another thread's stop() can land).
        struct StopWhileMade: CallInterceptor {
            let watcher: PThreadLock<EtcdWatcher?>
            func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
                if call.path == EtcdMessages.watchPath { self.watcher.withLock { $0 }?.stop() }
                return .proceed
            }
        }
        let stopping = PThreadLock<EtcdWatcher?>(nil)
        let raw = try GRPCChannel(target: etcd.endpoint, interceptors: [StopWhileMade(watcher: stopping)], eventLoop: loop)
        let ended = PThreadLock<CallStatus?>(nil)
        _ = raw.events.subscribe { event in
            if case .callFinished(_, EtcdMessages.watchPath, let status, _, _, _, _) = event { ended.withLock { $0 = status } }
        }
        let watcher = EtcdWatcher(client: raw, reactor: loop.reactor, prefix: "s/") { _ in }
        stopping.withLock { $0 = watcher }
        loop.reactor.execute { watcher.start() }
        #expect(await eventually { ended.withLock { $0 }?.code == .cancelled }, "the stream made during stop() was cancelled")
    }

    @Test("a watch etcd keeps refusing (or that cannot reach it) is reopened less and less often, not every second")
    func refusedWatchBacksOff() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // Nothing listens there: each stream ends at once, UNAVAILABLE, never confirmed.
        let raw = try GRPCChannel(target: "127.0.0.1:\(freePort())", eventLoop: loop)
        let opened = Atomic<Int>(0)
        _ = raw.events.subscribe { event in
            if case .callFinished(_, EtcdMessages.watchPath, _, _, _, _, _) = event { opened.add(1, ordering: .relaxed) }
        }
        let watcher = EtcdWatcher(client: raw, reactor: loop.reactor, prefix: "s/") { _ in }
        loop.reactor.execute { watcher.start() }
        // Every second, 7 streams in 6.5 s; at 1, 2, 4 s (each ±20 %) after the ends, 4 at most.
        try await Task.sleep(for: .milliseconds(6500))
        watcher.stop()
        let count = opened.load(ordering: .relaxed)
        #expect((2...4).contains(count), "\(count) streams")
        #expect(EtcdWatcher.reopenDelay(refusals: 50) <= .seconds(12))
    }

    @Test("a watch backing off while etcd was away reopens at once when a read succeeds, and a second after its next end")
    func backedOffWatchReopensOnARead() async throws {
        let rig = try WatchRig(prefix: "b/")
        defer { rig.stop() }
        let (etcd, loop, watcher) = (rig.etcd, rig.loop, rig.watcher)
        let revision = try await rig.put("b/0")
        watcher.advance(to: revision)
        loop.reactor.execute { watcher.start() }
        #expect(await eventually { etcd.openStreams("Watch") == 1 })
        // etcd away for 9 s: the stream ends, then reopens fail at about 1, 2, 4 and 8 s; the next waits about 8 s
        // more (6.4 s at the least).
        etcd.halt()
        try await Task.sleep(for: .seconds(9))
        try etcd.resume()
        // A read succeeds (the pool's would): the watch goes at once, not when its delay is out.
        var read: Int64?
        #expect(await eventually(timeout: 10) {
            read = try? await rig.put("b/1")
            return read != nil
        })
        watcher.advance(to: read ?? revision)
        #expect(await eventually(timeout: 1.5) { etcd.openStreams("Watch") == 1 }, "reopened on the read")
        // Confirmed, it starts the count over: its end (etcd restarted) reopens it a second later.
        try etcd.restart()
        #expect(await eventually(timeout: 10) { etcd.openStreams("Watch") == 1 }, "reopened after its end")
    }

    @Test("a read whose revision is below the watch's (etcd restored or replaced) moves the watch back: changes are heard")
    func revisionGoingBackIsFollowed() async throws {
        let rig = try WatchRig(prefix: "r/")
        defer { rig.stop() }
        let (loop, watcher) = (rig.loop, rig.watcher)
        let revision = try await rig.put("r/1")
        // Watching from where a bigger cluster had got to, before it was replaced by this one.
        watcher.advance(to: revision + 1000)
        loop.reactor.execute { watcher.start() }
        // etcd goes away and comes back: the stream ends, and the read a resolver then makes reports this cluster's
        // revision, lower than the watch's.
        try rig.etcd.restart()
        #expect(await eventually(timeout: 10) { rig.changes >= 1 }, "the ended stream asks for a read")
        watcher.advance(to: revision)
        // The watch reopens a second after the end: changes are made until one is heard.
        // Only what etcd reports counts: the end of a stream the restart left behind also tells the watcher to read.
        let before = rig.reportedChanges
        var key = 1
        #expect(
            await eventually(timeout: 10) {
                key += 1
                _ = try? await rig.put("r/\(key)")
                return rig.reportedChanges > before
            }, "a change after the reopen is heard")
    }

    @Test("a read below the revision a running watch started after (etcd restored, reopened before the read) ends it: it reopens from the read")
    func watchAheadOfTheReadRestarts() async throws {
        let rig = try WatchRig(prefix: "a/")
        defer { rig.stop() }
        let (loop, watcher) = (rig.loop, rig.watcher)
        let revision = try await rig.put("a/1")
        // The stream under way watches from a revision this cluster has not reached: it hears nothing. (Its own first
        // answer now ends it as well, `watchOntoLostDataFollows`; a read's word matters where reads and watches reach
        // different members, which one etcd cannot show.)
        watcher.advance(to: revision + 1000)
        loop.reactor.execute { watcher.start() }
        #expect(await eventually(timeout: 10) { rig.etcd.watchers == 1 })
        // A read says where the cluster is: the stream ends (asking for a read), and reopens from there.
        watcher.advance(to: revision)
        #expect(await eventually(timeout: 10) { rig.changes >= 1 }, "the stream ahead of the read ended")
        let before = rig.reportedChanges
        var key = 1
        #expect(
            await eventually(timeout: 10) {
                key += 1
                _ = try? await rig.put("a/\(key)")
                return rig.reportedChanges > before
            }, "a change after the reopen is heard")
    }

    @Test("a watch reopened onto an etcd that lost its data reopens from etcd's own revision, with no read to tell it")
    func watchOntoLostDataFollows() async throws {
        let rig = try WatchRig(prefix: "l/")
        defer { rig.stop() }
        let (loop, watcher) = (rig.loop, rig.watcher)
        var revision: Int64 = 0
        for index in 0..<20 { revision = try await rig.put("l/\(index)") }
        // The last read: far ahead of where a fresh etcd starts. The rig makes no other read.
        watcher.advance(to: revision)
        loop.reactor.execute { watcher.start() }
        #expect(await eventually(timeout: 10) { rig.etcd.watchers == 1 })
        try rig.etcd.wipe()
        // The stream ends with the old process; the reopen a second later starts after `revision`, which the fresh
        // etcd has not reached: its answer says so, and the watch reopens from etcd's revision.
        #expect(await eventually(timeout: 10) { rig.etcd.watchers == 1 })
        let before = rig.reportedChanges
        // A few puts only: enough of them would take the fresh etcd past `revision`, and a watch from there would
        // hear them without the fix.
        var heard = false
        for key in 0..<3 where !heard {
            _ = try? await rig.put("l/new\(key)")
            heard = await eventually(timeout: 3) { rig.reportedChanges > before }
        }
        #expect(heard, "a change after the wipe is heard (the watch waited past revision \(revision) before)")
    }

    @Test("several etcd endpoints: one that is down is passed over; when the one in use goes, the next serves")
    func failsOverBetweenEndpoints() async throws {
        // Two single-member etcds that know nothing of each other: which one answered shows in what it holds.
        let first = try EtcdPeer()
        defer { first.stop() }
        let second = try EtcdPeer()
        defer { second.stop() }
        let peers = try ["a", "b"].map { try PythonPeer(name: $0) }
        defer { for peer in peers { peer.stop() } }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let down = "127.0.0.1:\(freePort())"  // nothing listens there
        // The registration passes over the endpoint that is down.
        let inSecond = try await EtcdRegistration.register(
            name: "services/ha", address: peers[0].target, etcd: .init(endpoints: [down, second.endpoint]), eventLoop: loop)
        #expect(inSecond.key == "services/ha/\(peers[0].target)")
        // The first etcd holds "a" too (a key without a lease: it outlives no one here).
        let raw = try GRPCChannel(target: first.endpoint, eventLoop: loop)
        _ = try await raw.unary(
            path: EtcdMessages.putPath,
            request: EtcdMessages.putRequest(
                key: "services/ha/\(peers[0].target)", value: EtcdMessages.endpointValue(address: peers[0].target), lease: 0))
        raw.close()

        var configuration = Self.configuration(first)
        configuration.etcd = Configuration.Etcd(endpoints: [down, first.endpoint, second.endpoint])
        let channel = try GRPCChannel(target: "etcd:///services/ha", configuration: configuration, eventLoop: loop)
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 4, ledger: ledger, next: &id) == ["a"])

        // The first etcd goes; "b" is registered with the second alone. The resolver finds it only through the
        // second: its Watch, or its Range, on the connection that moved there.
        first.stop()
        let b = try await EtcdRegistration.register(
            name: "services/ha", address: peers[1].target, etcd: .init(endpoints: [second.endpoint]), eventLoop: loop)
        var seen: Set<String> = []
        for _ in 0..<300 where !seen.contains("b") {
            seen.formUnion(await Self.served(channel, 2, ledger: ledger, next: &id))
        }
        #expect(seen.contains("b"), "the resolver reads the second etcd once the first is gone")
        #expect(ledger.completed == id && ledger.duplicates == 0)
        await b.deregister()
        await inSecond.deregister()
    }

    @Test("a real three-member cluster: the member in use stops, then quorum is lost and regained; discovery follows")
    func threeMemberCluster() async throws {
        let cluster = try EtcdCluster()
        defer { cluster.stopAll() }
        let peers = try ["a", "b"].map { try PythonPeer(name: $0) }
        defer { for peer in peers { peer.stop() } }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: cluster.endpoints)
        let a = try await EtcdRegistration.register(
            name: "services/raft", address: peers[0].target, etcd: settings, ttl: .seconds(3), eventLoop: loop)
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        configuration.loadBalancingPolicy = .roundRobin
        configuration.etcd = settings
        configuration.resolutionInterval = .seconds(1)
        configuration.minimumResolutionInterval = .milliseconds(50)
        let channel = try GRPCChannel(target: "etcd:///services/raft", configuration: configuration, eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 4, ledger: ledger, next: &id) == ["a"])

        // The first member stops (the client's first choice, perhaps the leader): two of three go on, and a backend
        // registered now is found through them.
        cluster.stop(0)
        let b = try await EtcdRegistration.register(
            name: "services/raft", address: peers[1].target, etcd: settings, ttl: .seconds(3), eventLoop: loop)
        // (Its watch, if it was on the member that stopped, is reopened on another a second later, from the revision
        // it had read: the registration is heard then, if not before.)
        var seen: Set<String> = []
        let clock = ContinuousClock()
        let began = clock.now
        while !seen.contains("b") && clock.now - began < .seconds(20) {
            seen.formUnion(await Self.served(channel, 2, ledger: ledger, next: &id))
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(seen.contains("b"), "the resolver follows the cluster past its first member")

        // Quorum lost: one member of three left, without a leader (every call the client makes needs one). Calls go
        // on to the addresses last known.
        cluster.stop(1)
        let outage = ContinuousClock.now
        let failedBefore = recorder.count { if case .resolutionFailed = $0 { true } else { false } }
        #expect(await eventually(timeout: 15) {
            recorder.count { if case .resolutionFailed = $0 { true } else { false } } > failedBefore
        }, "the resolver found no leader to ask")
        #expect(await Self.served(channel, 6, ledger: ledger, next: &id) == ["a", "b"])
        // The outage outlasts the leases' 3 s TTL: no keepalive can reach a leader meanwhile.
        try await Task.sleep(until: outage + .seconds(4))
        #expect(await Self.served(channel, 4, ledger: ledger, next: &id) == ["a", "b"])

        // Quorum regained: a change made now is heard (the watch resumed), and b's lease outlived the outage.
        try cluster.start(0)
        try cluster.start(1)
        await a.deregister()
        var onlyB = false
        let regained = clock.now
        while !onlyB && clock.now - regained < .seconds(20) {
            onlyB = await Self.served(channel, 4, ledger: ledger, next: &id) == ["b"]
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(onlyB, "a's deregistration reached the resolver after the outage")
        let reader = try GRPCChannel(target: "etcd:///services/raft", configuration: configuration, eventLoop: loop)
        #expect(await Self.served(reader, 2, ledger: ledger, next: &id) == ["b"], "b's key is still there for a new reader")
        #expect(ledger.completed == id && ledger.duplicates == 0)
        await b.deregister()
    }

    @Test("the member serving a registration's keepalives stops answering (connection up): the lease is kept through another")
    func keepAliveLeavesASilentMember() async throws {
        let cluster = try EtcdCluster()
        defer { cluster.stopAll() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: cluster.endpoints)
        // A TTL of 3 s: a keepalive every second.
        let registration = try await EtcdRegistration.register(
            name: "services/silent", address: "127.0.0.1:1", etcd: settings, ttl: .seconds(3), eventLoop: loop)
        var serving: Int?
        #expect(await eventually {
            serving = (0..<3).first { (cluster.messagesReceived($0, "LeaseKeepAlive") ?? 0) > 0 }
            return serving != nil
        })
        guard let silent = serving, let pid = cluster.pid(silent) else { return }
        // Stopped, not killed: the kernel keeps its connections and acknowledges what is sent, so nothing at the
        // TCP level fails, and HTTP/2 keepalive would notice only after 30 s. The other two keep quorum.
        kill(pid, SIGSTOP)
        defer { kill(pid, SIGCONT) }
        let others = (0..<3).filter { $0 != silent }
        let before = others.map { cluster.messagesReceived($0, "LeaseKeepAlive") ?? 0 }.reduce(0, +)
        // Twice the TTL: the lease lapsed (and the key went) unless the keepalives moved to another member.
        try await Task.sleep(for: .seconds(6))
        let after = others.map { cluster.messagesReceived($0, "LeaseKeepAlive") ?? 0 }.reduce(0, +)
        #expect(after - before >= 3, "keepalives reached another member: \(after - before)")
        let reader = try GRPCChannel(target: cluster.endpoints[others[0]], eventLoop: loop)
        let response = try await reader.unary(
            path: EtcdMessages.rangePath, request: EtcdMessages.rangeRequest(prefix: "services/silent/"))
        #expect(EtcdMessages.rangeResponse(response.message)?.pairs.map(\.key) == ["services/silent/127.0.0.1:1"])
        kill(pid, SIGCONT)
        await registration.deregister()
    }

    @Test("a member that answers but cannot serve (UNAVAILABLE to everything: cut off from its leader) is left behind")
    func unservingMemberIsLeftBehind() async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        // First in the list, and it connects: every call on it, unary or stream, gets UNAVAILABLE at once.
        let refusing = try ScriptedPeer("early-status", ["14"])
        defer { refusing.stop() }
        let backend = try PythonPeer(name: "a")
        defer { backend.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // etcd serving first (a fresh one elects itself leader before it answers): the other member of a cluster.
        let raw = try GRPCChannel(target: etcd.endpoint, eventLoop: loop)
        _ = try await raw.unary(path: EtcdMessages.rangePath, request: EtcdMessages.rangeRequest(prefix: "services/split/"))
        raw.close()
        let settings = Configuration.Etcd(endpoints: [refusing.target, etcd.endpoint])
        // The lease and the key: each call the refusing member answers is retried on the next.
        let registration = try await EtcdRegistration.register(
            name: "services/split", address: backend.target, etcd: settings, ttl: .seconds(2), eventLoop: loop)
        var configuration = Self.configuration(etcd)
        configuration.etcd = settings
        let channel = try GRPCChannel(target: "etcd:///services/split", configuration: configuration, eventLoop: loop)
        let ledger = CompletionLedger()
        var id = 0
        #expect(await Self.served(channel, 3, ledger: ledger, next: &id) == ["a"])
        // The resolver's watch settles on the member that serves (reopened in turn, it is refused by the other).
        #expect(await eventually(timeout: 10) { etcd.watchers == 1 }, "\(String(describing: etcd.watchers))")
        // Past the lease's TTL twice over: the keepalive stream found the member that serves (reopened there), so
        // the key is still there for a new reader.
        try await Task.sleep(for: .seconds(4))
        let reader = try GRPCChannel(target: "etcd:///services/split", configuration: configuration, eventLoop: loop)
        #expect(await Self.served(reader, 2, ledger: ledger, next: &id) == ["a"])
        #expect(ledger.completed == id && ledger.duplicates == 0)
        await registration.deregister()
    }

    @Test("a manager's close ends its etcd watches (and their connection), though the manager lives on")
    func closeEndsTheWatch() async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        let backend = try PythonPeer(name: "a")
        defer { backend.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let registration = try await EtcdRegistration.register(
            name: "services/closing", address: backend.target, etcd: .init(endpoints: [etcd.endpoint]), eventLoop: loop)
        let manager = try ConnectionManager(configuration: Self.configuration(etcd), eventLoop: loop)
        let channel = try manager.connection(service: "closing", address: "etcd:///services/closing")
        #expect(await channel.call("/echo.Echo/Get", [1], timeout: .seconds(5)).status == .ok)
        #expect(await eventually(timeout: 10) { etcd.watchers == 1 }, "the resolver watches the prefix")
        await manager.close()
        #expect(await eventually(timeout: 10) { etcd.watchers == 0 }, "the watch ended with the close: \(String(describing: etcd.watchers))")
        withExtendedLifetime(manager) {}
        await registration.deregister()
    }

    /// A fresh etcd and a started loop: `body` gets the settings to register with and `keys()`, the keys under
    /// `prefix` now (read through a client of its own).
    static func withEtcdKeys(
        under prefix: String, _ body: (Configuration.Etcd, ReactorLoop, () async throws -> [String]) async throws -> Void
    ) async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let raw = try GRPCChannel(target: etcd.endpoint, eventLoop: loop)
        func keys() async throws -> [String] {
            let response = try await raw.unary(path: EtcdMessages.rangePath, request: EtcdMessages.rangeRequest(prefix: prefix))
            return EtcdMessages.rangeResponse(response.message)?.pairs.map(\.key) ?? []
        }
        try await body(Configuration.Etcd(endpoints: [etcd.endpoint]), loop, keys)
    }

    @Test("the registration keeps its key past the lease's TTL, and deregister removes it")
    func leaseIsKeptAlive() async throws {
        try await Self.withEtcdKeys(under: "services/ttl/") { settings, loop, keys in
            let registration = try await EtcdRegistration.register(
                name: "services/ttl", address: "127.0.0.1:1", etcd: settings, ttl: .seconds(2), eventLoop: loop)
            #expect(try await keys() == ["services/ttl/127.0.0.1:1"])
            // Twice the TTL: without keepalives the lease, and the key with it, would be gone.
            try await Task.sleep(for: .seconds(4))
            #expect(try await keys() == ["services/ttl/127.0.0.1:1"])
            await registration.deregister()
            #expect(try await keys() == [])
        }
    }

    @Test("deregister from a cancelled task (a server's task tree cancelled at shutdown) still removes the key")
    func deregisterFromACancelledTask() async throws {
        try await Self.withEtcdKeys(under: "services/cancelled/") { settings, loop, keys in
            let registration = try await EtcdRegistration.register(
                name: "services/cancelled", address: "127.0.0.1:1", etcd: settings, eventLoop: loop)
            #expect(try await keys() == ["services/cancelled/127.0.0.1:1"])
            let leaving = Task {
                // Cancelled before it starts: the revoke inherited the cancellation and was never made.
                while !Task.isCancelled { await Task.yield() }
                await registration.deregister()
            }
            leaving.cancel()
            await leaving.value
            #expect(try await keys() == [], "removed at once, not after the lease's TTL (10 s)")
        }
    }

    @Test("two registrations of one address (a server restarted in place): the first one's deregister leaves the key the second put")
    func deregisterLeavesASuccessorsKey() async throws {
        try await Self.withEtcdKeys(under: "services/twice/") { settings, loop, keys in
            let old = try await EtcdRegistration.register(
                name: "services/twice", address: "127.0.0.1:1", etcd: settings, ttl: .seconds(2), eventLoop: loop)
            let new = try await EtcdRegistration.register(
                name: "services/twice", address: "127.0.0.1:1", etcd: settings, ttl: .seconds(2), eventLoop: loop)
            await old.deregister()
            #expect(try await keys() == ["services/twice/127.0.0.1:1"], "the successor's key stays")
            // Past the TTL: it is kept alive on the successor's lease, not a leftover about to expire.
            try await Task.sleep(for: .seconds(3))
            #expect(try await keys() == ["services/twice/127.0.0.1:1"])
            await new.deregister()
            #expect(try await keys() == [])
        }
    }

    @Test("after etcd restarts, the registration keeps one keepalive going, not one more per reopened stream")
    func keepAliveChainsDoNotMultiply() async throws {
        let etcd = try EtcdPeer()
        defer { etcd.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let settings = Configuration.Etcd(endpoints: [etcd.endpoint])
        // A TTL of 3 s: a keepalive every second.
        let registration = try await EtcdRegistration.register(
            name: "services/restarts", address: "127.0.0.1:1", etcd: settings, ttl: .seconds(3), eventLoop: loop)
        for _ in 0..<3 {
            try etcd.restart()
            // The keepalive stream is reopened on the new process.
            #expect(await eventually(timeout: 10) { (etcd.messagesReceived("LeaseKeepAlive") ?? 0) > 0 })
        }
        // Each stream's ping chain used to outlive it: after three restarts (and the reopens tried while etcd was
        // down) several chains pinged the last stream. One chain sends about 3 in 3 s.
        let before = etcd.messagesReceived("LeaseKeepAlive") ?? 0
        try await Task.sleep(for: .seconds(3))
        let sent = (etcd.messagesReceived("LeaseKeepAlive") ?? 0) - before
        #expect((1...4).contains(sent), "keepalives in 3 s at one per second (two chains send 6): \(sent)")
        // One stream open, not one more left behind by each reopen that raced a stalled keepalive.
        #expect(await eventually { etcd.openStreams("LeaseKeepAlive") == 1 })
        await registration.deregister()
    }

    @Test("an etcd target without configuration.etcd is refused, naming the field")
    func needsConfiguration() {
        #expect(throws: ConfigurationError.self) { try GRPCChannel(target: "etcd:///services/x") }
        var configuration = Configuration()
        configuration.etcd = Configuration.Etcd(endpoints: ["not an address"])
        #expect(throws: ConfigurationError.self) { try configuration.validate() }
        #expect(throws: ConfigurationError.self) { try Target(parsing: "etcd:///") }
    }

    @Test("a registration that no etcd target could find is refused before etcd is asked")
    func registrationInputs() async {
        let etcd = Configuration.Etcd(endpoints: ["127.0.0.1:1"])  // never dialled: refused first
        for (name, address, reason) in [
            ("", "127.0.0.1:5000", "name"), ("svc/", "127.0.0.1:5000", "name"), ("my svc", "127.0.0.1:5000", "name"),
            ("svc", "myhost:5000", "numeric"), ("svc", "1.2.3.4:5000\",\"Op\":1", "numeric"), ("svc", "unix:/tmp/s", "numeric"),
            ("svc", "0.0.0.0:5000", "unspecified"), ("svc", "[::]:5000", "unspecified"), ("svc", "[0:0::0]:5000", "unspecified"),
        ] {
            do {
                _ = try await EtcdRegistration.register(name: name, address: address, etcd: etcd)
                Issue.record("registered \(name) \(address)")
            } catch {
                #expect(error.status.code == .invalidArgument && error.status.message.contains(reason), "\(error.status)")
            }
        }
        #expect(EtcdRegistration.problem(name: "services/echo", address: "[::1]:5000") == nil)
    }
}
