import GRPCCMCalls
import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire
import Logging

/// Endpoints registered in etcd, for `etcd:///name` targets: every key under the prefix `name/`, read with a Range and
/// then watched with etcd's bidirectional Watch stream from the revision that Range read (no change in between is
/// missed), through this package's own client (no etcd library).
///
/// Values are what grpc-go's endpoints manager writes (`{"Op":0,"Addr":"10.0.0.7:50051","Metadata":...}`), so Go
/// services registered with it are found; the address must be numeric (`ip:port`, `[v6]:port`) and not unspecified
/// (`0.0.0.0`, `[::]`: a server's bind address, which a client would take as its own host). A value that is not
/// such an address is skipped and reported (`resolutionFailed` naming its key, the good ones still used); when none is
/// left the answer is that no server is registered, as when the prefix holds no key. A change under the prefix makes the pool
/// resolve again at once (within `minimumResolutionInterval`); a watch that breaks (etcd going away) is opened again
/// a second later from the last revision read (later while etcd keeps refusing: `EtcdWatcher`), and periodic
/// resolution goes on meanwhile.
final class EtcdResolver: AddressResolver {
    let settings: Configuration.Etcd
    /// Two client channels to etcd per loop (the pool's calls back come on that loop): one for the Range reads, one
    /// for the watch. Each balances over the members in turn: on one channel, the read a refused watch asks for
    /// moved the turn on, and with two members the reopened watch was sent back to the one refusing it every time.
    private let clients = PThreadLock<[ObjectIdentifier: Clients]>([:])

    private struct Clients {
        let reads: GRPCChannel
        let watches: GRPCChannel
    }
    /// Per loop: the pool's change callback until its first Range, then the watcher started from that Range.
    private let watches = PThreadLock<[ObjectIdentifier: Watch]>([:])
    /// Where skipped values are reported: the channel's service and each loop's bus part.
    private let problems = PThreadLock<(service: String, buses: [ObjectIdentifier: LocalEventBus])>(("", [:]))

    private enum Watch {
        case waitingForRange(@Sendable () -> Void)
        case watching(EtcdWatcher)
    }

    init(settings: Configuration.Etcd) {
        self.settings = settings
    }

    deinit {
        for key in self.clients.withLock({ Array($0.keys) }) + self.watches.withLock({ Array($0.keys) }) {
            self.stop(key)
        }
    }

    /// Stops the watcher of a loop and closes its client channels.
    private func stop(_ key: ObjectIdentifier) {
        let watch = self.watches.withLock { $0.removeValue(forKey: key) }
        if case .watching(let watcher) = watch { watcher.stop() }
        if let clients = self.clients.withLock({ $0.removeValue(forKey: key) }) {
            clients.reads.close()
            clients.watches.close()
        }
    }

    /// Values that are not addresses are reported on `buses` (one per loop) as `resolutionFailed` of `service`.
    func reportProblems(service: String, buses: [(Reactor, LocalEventBus)]) {
        self.problems.withLock { problems in
            problems.service = service
            for (reactor, bus) in buses { problems.buses[ObjectIdentifier(reactor)] = bus }
        }
    }

    private func clients(on reactor: Reactor) throws -> Clients {
        if let existing = self.clients.withLock({ $0[ObjectIdentifier(reactor)] }) { return existing }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.enableLogging = false
        func make() throws -> GRPCChannel {
            try self.settings.clientChannel(
                configuration: configuration,
                logger: Logger(label: "grpc-cm-etcd", factory: { _ in SwiftLogNoOpLogHandler() }), loops: [reactor])
        }
        let made = Clients(reads: try make(), watches: try make())
        return self.clients.withLock { clients in
            if let raced = clients[ObjectIdentifier(reactor)] { return raced }
            clients[ObjectIdentifier(reactor)] = made
            return made
        }
    }

    func resolve(
        _ target: Target, on reactor: Reactor,
        completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
    ) {
        guard case .etcd(let name) = target.kind else {
            _ = reactor.execute { completion(.failure(CallStatus(code: .internal, message: "\(target) is not an etcd target"))) }
            return
        }
        let clients: Clients
        do {
            clients = try self.clients(on: reactor)
        } catch {
            _ = reactor.execute { completion(.failure(CallStatus(code: .unavailable, message: "etcd: \(error)"))) }
            return
        }
        let prefix = name + "/"
        clients.reads.unary(
            path: EtcdMessages.rangePath, request: EtcdMessages.rangeRequest(prefix: prefix),
            options: RequestOptions(timeout: self.settings.timeout)
        ) { response in
            let answer = Self.addresses(response, prefix: prefix, endpoint: self.settings.endpointsText)
            if let revision = answer.revision {
                self.rangeRead(revision: revision, prefix: prefix, client: clients.watches, reactor: reactor)
            }
            if !answer.skipped.isEmpty { self.report(answer.skipped, prefix: prefix, reactor: reactor) }
            completion(answer.result)
        }
    }

    /// A Range read `revision`: the first starts the watch from the next one; later ones move its restart point.
    private func rangeRead(revision: Int64, prefix: String, client: GRPCChannel, reactor: Reactor) {
        let key = ObjectIdentifier(reactor)
        let started = self.watches.withLock { watches -> EtcdWatcher? in
            switch watches[key] {
            case .waitingForRange(let changed):
                let watcher = EtcdWatcher(client: client, reactor: reactor, prefix: prefix) { _ in changed() }
                watches[key] = .watching(watcher)
                return watcher
            case .watching(let watcher):
                watcher.advance(to: revision)
                return nil
            case nil:
                return nil
            }
        }
        started?.advance(to: revision)
        started?.start()
    }

    private func report(_ keys: [String], prefix: String, reactor: Reactor) {
        let (service, bus) = self.problems.withLock { ($0.service, $0.buses[ObjectIdentifier(reactor)]) }
        let status = CallStatus(
            code: .unavailable,
            message: "etcd at \(self.settings.endpointsText): under \(prefix) skipped values that are not addresses (keys \(keys))")
        bus?.publish(.resolutionFailed(service: service, error: status))
    }

    /// The addresses a Range answer holds (or why there are none), the revision it read, and the keys skipped.
    static func addresses(
        _ response: UnaryResponse, prefix: String, endpoint: String
    ) -> (result: Result<[NetworkAddress], CallStatus>, revision: Int64?, skipped: [String]) {
        guard response.status.isOK else {
            let status = CallStatus(
                code: .unavailable,
                message: "etcd at \(endpoint): Range of \(prefix) failed: \(response.status.code): \(response.status.message)")
            return (.failure(status), nil, [])
        }
        guard let (revision, pairs) = EtcdMessages.rangeResponse(response.message) else {
            return (.failure(CallStatus(code: .unavailable, message: "etcd at \(endpoint): malformed Range response")), nil, [])
        }
        var addresses: [NetworkAddress] = []
        var seen: Set<NetworkAddress> = []
        var unusable: [String] = []
        for (key, value) in pairs {
            guard let text = EtcdMessages.endpointAddress(value), let parsed = try? Target(parsing: text),
                let address = parsed.numericAddresses?.first, case .hostPort = parsed.kind,
                EtcdRegistration.dialable(address)
            else {
                unusable.append(key)
                continue
            }
            if seen.insert(address).inserted { addresses.append(address) }
        }
        // An answer, whatever it holds: with no address (every endpoint deregistered, what is left not addresses)
        // the pool lets the addresses go, as grpc-go's etcd resolver has them go, skipping what it cannot read. The
        // last good addresses would be servers that left (their addresses perhaps someone else's by now), and the
        // change the watch reported would never count as read (asked again every few seconds, for good).
        return (.success(addresses), revision, unusable)
    }

    func watch(_ target: Target, on reactor: Reactor, changed: @escaping @Sendable () -> Void) {
        guard case .etcd = target.kind else { return }
        self.watches.withLock { $0[ObjectIdentifier(reactor)] = .waitingForRange(changed) }
    }

    /// The pool on `reactor` closes: its watcher stops and its client channel closes (a Range still under way ends
    /// with it and starts no watcher: the loop's entry is gone).
    func stopWatching(_ target: Target, on reactor: Reactor) {
        self.stop(ObjectIdentifier(reactor))
    }
}

/// One Watch stream over a key prefix; reopened a second after it ends, until stopped, or later while etcd keeps
/// refusing it (no leader; a watch it confirms then cancels) or cannot be reached: 1, 2, 4, 8 s, then every 10 s
/// (±20 %), so that a fleet does not ask a struggling cluster for a watch every second each. A Range that succeeds
/// meanwhile (etcd is back) reopens it at once. Loop thread, except `stop()` and `advance(to:)`.
/// `@unchecked Sendable`: `state` is behind its lock; the rest is immutable.
final class EtcdWatcher: @unchecked Sendable {
    private let client: GRPCChannel
    private let reactor: Reactor
    private let prefix: String
    /// Told that the names may have changed: with `true` when etcd reported changes under the prefix, `false` when
    /// a stream that was up ended (what changed meanwhile is unknown).
    private let changed: @Sendable (_ reported: Bool) -> Void
    private let state = PThreadLock<State>(State())

    private struct State {
        /// The stream under way (or the last one).
        var call: StreamingCall?
        var stopped = false
        /// The revision the last Range read: a new stream starts after it.
        var revision: Int64 = 0
        /// The revision the stream under way started after.
        var watchedAfter: Int64 = 0
        /// Streams in a row that etcd refused, or that never reached it: the next reopen waits longer.
        var refusals = 0
        /// How the stream under way has fared: etcd confirmed it (`created`), etcd cancelled it, this side ended it.
        var confirmed = false
        var cancelledByEtcd = false
        var endedHere = false
        /// The reopen waiting for its delay (0: none).
        var reopenTimer: Reactor.TimerID = 0
    }

    /// How long after a stream's end the next one opens: a second, doubled for each refusal in a row after the
    /// first, at most 10 s, ±20 %.
    static func reopenDelay(refusals: Int) -> Duration {
        var seconds = 1.0
        for _ in 1..<max(refusals, 1) { seconds = min(seconds * 2, 10) }
        return .nanoseconds(Int64(seconds * Double.random(in: 0.8...1.2) * 1e9))
    }

    init(client: GRPCChannel, reactor: Reactor, prefix: String, changed: @escaping @Sendable (_ reported: Bool) -> Void) {
        self.client = client
        self.reactor = reactor
        self.prefix = prefix
        self.changed = changed
    }

    /// A Range read `revision`: a stream opened from now on starts after it. Taken as it is, even when lower than
    /// the last: etcd's revision goes back when its cluster is restored from a snapshot or replaced, and a watch from
    /// a revision still to come is accepted without a word and hears nothing until the new cluster gets there. For
    /// that reason a stream under way that started after a later revision than this read is ended (and reopened
    /// from here a second later): it may have been reopened, after the cluster came back, before this read said how
    /// far back it went. (A stale read, older than one before it, costs a change heard twice: one more read.) The
    /// stream's own first answer says where etcd is too (`start`), so a reopen onto such a cluster mends itself
    /// without waiting for a read.
    /// A read that succeeded also says etcd answers again: a reopen waiting out a long delay goes at once.
    func advance(to revision: Int64) {
        let (ahead, backingOff) = self.state.withLock { state -> (StreamingCall?, Bool) in
            state.revision = revision
            let ahead = revision < state.watchedAfter ? state.call : nil
            if ahead != nil { state.endedHere = true }
            // A reopen under way and not confirmed yet: if etcd refuses it all the same, its end waits a second.
            if state.reopenTimer == 0 && !state.confirmed { state.refusals = 0 }
            return (ahead, state.reopenTimer != 0 && state.refusals > 1)
        }
        ahead?.cancel()
        if backingOff { self.reactor.execute { self.reopenNow() } }
    }

    /// Loop thread: the reopen waiting out its delay goes now, the refusals forgotten.
    private func reopenNow() {
        let timer = self.state.withLock { state -> Reactor.TimerID in
            defer {
                state.reopenTimer = 0
                state.refusals = 0
            }
            return state.reopenTimer
        }
        guard timer != 0 else { return }
        self.reactor.cancelTimer(timer)
        self.start()
    }

    func start() {
        let (stopped, revision) = self.state.withLock { state in
            // Before the stream exists: its answers may come at once.
            state.confirmed = false
            state.cancelledByEtcd = false
            state.endedHere = false
            state.reopenTimer = 0
            return (state.stopped, state.revision)
        }
        guard !stopped else { return }
        let callbacks = StreamingCallbacks(
            onMessage: { [weak self] message in
                guard let self else { return }
                let (events, canceled, createdAt) = EtcdMessages.watchResponse(message)
                if createdAt != nil || canceled {
                    self.state.withLock { state in
                        if createdAt != nil { state.confirmed = true }
                        if canceled { state.cancelledByEtcd = true }
                    }
                }
                if let current = createdAt, current < revision {
                    // etcd is behind the revision this stream starts after: its data went back since the last read
                    // (restored from a snapshot, a member wiped). The watch would hear nothing until etcd got there:
                    // it ends, and reopens from etcd's own revision (the end has the name read again too).
                    self.advance(to: current)
                }
                if events > 0 { self.changed(true) }
                if canceled {
                    // etcd ended this watch but keeps the stream (its revision was compacted away, say): end the
                    // stream too, so that the name is read again and the watch reopened from what that read.
                    self.state.withLock { $0.call }?.cancel()
                }
            },
            onFinish: { [weak self] _ in
                // etcd went away, or cancelled the watch: what changed meanwhile is unknown, so resolve again (a
                // stream that never got going missed nothing its predecessor's end did not), and watch again in a
                // second, or later while etcd keeps refusing. A stream this side ended (a read from behind its
                // start) says nothing of etcd.
                guard let self else { return }
                let outcome = self.state.withLock { state -> (refusals: Int, wasUp: Bool)? in
                    guard !state.stopped else { return nil }
                    if state.endedHere || (state.confirmed && !state.cancelledByEtcd) {
                        state.refusals = 0
                    } else {
                        state.refusals += 1
                    }
                    return (state.refusals, state.confirmed)
                }
                guard let outcome else { return }
                if outcome.wasUp { self.changed(false) }
                let delay = Self.reopenDelay(refusals: outcome.refusals)
                let timer = self.reactor.schedule(afterNanoseconds: UInt64(delay.nanoseconds)) { [weak self] in
                    guard let self else { return }
                    // Not when a read sent it off early (`reopenNow`), which forgot this timer.
                    let due = self.state.withLock { state -> Bool in
                        defer { state.reopenTimer = 0 }
                        return state.reopenTimer != 0
                    }
                    if due { self.start() }
                }
                self.state.withLock { $0.reopenTimer = timer }
            })
        // The client asks for a leader (`RequireLeader`): etcd refuses the watch of a member cut off from its leader,
        // which would stay silent for ever, instead of keeping it.
        let call = self.client.bidirectionalStreaming(path: EtcdMessages.watchPath, callbacks: callbacks)
        _ = call.send(EtcdMessages.watchCreateRequest(prefix: self.prefix, startRevision: revision + 1))
        // `stop()` (any thread) may have come while the call was made, and found only the last stream to cancel; so
        // may a read from behind this stream's start (tests advance from their own thread): either ends this one.
        let unwanted = self.state.withLock { state -> Bool in
            state.call = call
            state.watchedAfter = revision
            let unwanted = state.stopped || state.revision < revision
            if unwanted { state.endedHere = true }
            return unwanted
        }
        if unwanted { call.cancel() }
    }

    func stop() {
        let call = self.state.withLock { state -> StreamingCall? in
            state.stopped = true
            return state.call
        }
        call?.cancel()
    }
}
