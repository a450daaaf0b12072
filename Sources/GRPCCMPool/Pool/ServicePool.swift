@_spi(Reactor) import GRPCCMReactor
import GRPCCMCalls
import GRPCCMTransport
import GRPCCMWire

/// How a pool connects and queues, taken from the configuration by the layer that makes pools.
package struct PoolSettings: Sendable {
    /// Connections per resolved address.
    package var connectionsPerTarget: Int
    /// Calls that may wait for a stream before new ones fail with RESOURCE_EXHAUSTED.
    package var maxQueuedCalls: Int
    package var backoff: Backoff.Configuration
    package var keepAliveTime: Duration
    package var idleTimeout: Duration
    /// Wait before resolving again after a failed resolution while wait-for-ready calls wait.
    package var resolveRetryDelay: Duration
    /// How calls are spread over the connections, and which addresses are connected.
    package var loadBalancingPolicy: LoadBalancingPolicy = .leastLoaded
    /// Connections per address that calls may open when every ready one is out of streams (gRFC A105); equal to
    /// `connectionsPerTarget` (no growth) unless configured higher.
    package var maxConnectionsPerTarget: Int = 1
    /// Host names are resolved again this often (jittered by ±20 %), besides after failures; `.zero`: never.
    package var resolutionInterval: Duration = .seconds(30)
    /// No two resolutions closer than this, whatever asks (connection failures, GOAWAYs, the period).
    package var minimumResolutionInterval: Duration = .seconds(1)
    /// gRFC A17: the health-check service name each connection watches (nil: off).
    package var healthCheckServiceName: String? = nil
    /// The largest response header list a connection takes (the configuration's, which each connection advertises):
    /// the health Watch's calls take what every other call does.
    package var maxHeaderListSize: Int = 16 << 10
    /// pick_first tries the next address when an attempt has gone this long without an answer (gRFC A61's
    /// Connection Attempt Delay, RFC 8305's recommended value).
    package var connectionAttemptDelay: Duration = .milliseconds(250)

    package init(
        connectionsPerTarget: Int, maxQueuedCalls: Int, backoff: Backoff.Configuration, keepAliveTime: Duration,
        idleTimeout: Duration, resolveRetryDelay: Duration
    ) {
        self.connectionsPerTarget = connectionsPerTarget
        self.maxQueuedCalls = maxQueuedCalls
        self.backoff = backoff
        self.keepAliveTime = keepAliveTime
        self.idleTimeout = idleTimeout
        self.resolveRetryDelay = resolveRetryDelay
    }
}

/// One `PoolSettings` for the pools of every channel made from the same configuration: a pool keeps this reference,
/// not a copy of its own (about 190 bytes a channel, with thousands of channels).
package final class SharedPoolSettings: Sendable {
    package let value: PoolSettings

    package init(_ value: PoolSettings) { self.value = value }
}

extension ClientCall: WaitQueueEntry {}

/// The connections of one service: a subchannel per resolved address (times `connectionsPerTarget`), the calls
/// waiting for a stream, and the picking rule. It is the calls' `CallRouter`: every attempt asks it for a stream.
///
/// One queue: a call waits here whenever no connection can take a stream now (none is ready, or every ready one is
/// at the server's MAX_CONCURRENT_STREAMS), and every waiting call counts against `maxQueuedCalls`. A connection that
/// frees a stream, or becomes ready, takes the next calls.
///
/// Wait-for-ready (grpc `doc/wait-for-ready.md`): with no ready connection a call waits while some connection is
/// IDLE or CONNECTING; when all are failing (in TRANSIENT_FAILURE, or trying again after a failure: gRFC A62's
/// sticky TRANSIENT_FAILURE) a fail-fast call fails at once with the last connect error, and a wait-for-ready call
/// keeps waiting until its deadline.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only, but for the immutable fields.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class ServicePool: ReactorHandler, CallRouter, SubchannelDelegate, @unchecked Sendable {
    package unowned let reactor: Reactor
    /// The same reactor, read unretained on the loop's own paths (see `Reactor`).
    private let loopReactor: Unmanaged<Reactor>
    package let service: String
    package let target: Target
    private let shared: SharedPoolSettings
    private let connector: any TransportConnector
    private let resolver: any AddressResolver
    /// The resolver's fixed addresses for `target` (a numeric address, a Unix path): installed at once, and never
    /// resolved. nil: the target is resolved.
    private let fixedAddresses: [NetworkAddress]?
    private let bus: LocalEventBus
    private let connectionIDs: ConnectionIDSource

    @exclusivity(unchecked)
    private var addresses: [NetworkAddress]?
    @exclusivity(unchecked)
    private var subchannels: [Subchannel] = []
    @exclusivity(unchecked)
    private var resolving = false
    @exclusivity(unchecked)
    private var lastResolution: UInt64 = 0
    /// The next periodic resolution (0: none armed); cancelled when the pool closes.
    @exclusivity(unchecked)
    private var periodicResolutionTimer: Reactor.TimerID = 0
    /// Subchannels whose address went away, finishing their calls (graceful shutdown) before they go.
    @exclusivity(unchecked)
    private var retiring: [Subchannel] = []
    /// The resolver's watch has been started (once per pool).
    @exclusivity(unchecked)
    private var watching = false
    /// A resolution asked for (by the resolver's watch, a failure) waiting for `minimumResolutionInterval` (0: none).
    @exclusivity(unchecked)
    private var changeResolutionTimer: Reactor.TimerID = 0
    /// A failed lookup with wait-for-ready calls queued is tried again after `resolveRetryDelay` (0: not armed).
    @exclusivity(unchecked)
    private var resolveRetryTimer: Reactor.TimerID = 0
    /// A re-resolution was asked for while a lookup was under way: it follows that lookup's answer.
    @exclusivity(unchecked)
    private var resolveAfterLookup = false
    /// Changes the resolver's watch reported, and how many of them a lookup that succeeded had begun after: while
    /// the second is behind, a failed lookup is tried again (the watch reports each change once; nothing else would
    /// read it while the periodic lookup is far off, or off).
    @exclusivity(unchecked)
    package private(set) var changesReported = 0
    @exclusivity(unchecked)
    private var changesRead = 0
    /// `changesReported` when the lookup under way began.
    @exclusivity(unchecked)
    private var changesAtLookup = 0
    @exclusivity(unchecked)
    private var queue: WaitQueue<ClientCall> {
        didSet { self.streamDemand.waiting = !self.queue.isEmpty }
    }
    /// Whether `queue` has calls, for the connections (they report freed capacity only then).
    private let streamDemand = StreamDemand()
    @exclusivity(unchecked)
    private var picker: Picker
    @exclusivity(unchecked)
    private var registry = CallRegistry()
    /// Hedged calls' coordinators, until they end: closing must reach one with no attempt out (waiting for its
    /// interceptors, or for a pushback's delay), which nothing else would end.
    @exclusivity(unchecked)
    private var coordinators: [ObjectIdentifier: any CallCoordinator] = [:]
    @exclusivity(unchecked)
    private var hooked = false
    @exclusivity(unchecked)
    private(set) var closed = false
    @exclusivity(unchecked)
    package private(set) var closingStatus = CallStatus(code: .unavailable, message: "the connection is closed")
    @exclusivity(unchecked)
    private var resolutionError: CallStatus?
    /// Set by `connectAll()`: connect as soon as addresses are known, calls or not.
    @exclusivity(unchecked)
    private var eager = false
    /// The keepalive interval for new connections: the configuration's, doubled for the whole pool (this loop's
    /// part of the service) after a GOAWAY too_many_pings: a new subchannel must not start over at the interval the
    /// server refused.
    @exclusivity(unchecked)
    private var keepAliveTime: Duration
    /// pick_first: the next address is tried when this fires with none connected yet (0: not armed).
    @exclusivity(unchecked)
    private var attemptDelayTimer: Reactor.TimerID = 0
    /// pick_first: `connectNextAddress` is under way (an attempt that fails at once calls it again from inside).
    @exclusivity(unchecked)
    private var pickingNextAddress = false

    /// A pool with settings of its own (tests).
    package convenience init(
        reactor: Reactor, service: String, target: Target, settings: PoolSettings, connector: any TransportConnector,
        bus: LocalEventBus, connectionIDs: ConnectionIDSource, resolver: any AddressResolver = SystemResolver()
    ) {
        self.init(
            reactor: reactor, service: service, target: target, settings: SharedPoolSettings(settings), connector: connector,
            bus: bus, connectionIDs: connectionIDs, resolver: resolver)
    }

    package init(
        reactor: Reactor, service: String, target: Target, settings: SharedPoolSettings, connector: any TransportConnector,
        bus: LocalEventBus, connectionIDs: ConnectionIDSource, resolver: any AddressResolver = SystemResolver()
    ) {
        self.reactor = reactor
        self.loopReactor = Unmanaged.passUnretained(reactor)
        self.resolver = resolver
        self.fixedAddresses = resolver.fixedAddresses(for: target)
        self.service = service
        self.target = target
        self.shared = settings
        self.connector = connector
        self.bus = bus
        self.connectionIDs = connectionIDs
        self.queue = WaitQueue(capacity: settings.value.maxQueuedCalls)
        self.keepAliveTime = settings.value.keepAliveTime
        self.picker = Picker(policy: settings.value.loadBalancingPolicy)
        super.init()
        if let fixed = self.fixedAddresses { self.install(fixed) }
    }

    deinit {
        for subchannel in self.subchannels { subchannel.delegate = nil }
    }

    // MARK: state for reports

    /// The aggregate state (round_robin's rule): any READY → READY; else any CONNECTING → CONNECTING; else any
    /// IDLE → IDLE; else TRANSIENT_FAILURE. SHUTDOWN once closed. Whether a connection counts as failing is
    /// `Subchannel.isFailing` (sticky, as gRFC A62 has it), not its state alone.
    package var state: ConnectivityState {
        if self.closed { return .shutdown }
        var sawConnecting = self.resolving
        var sawIdle = false
        for subchannel in self.subchannels {
            switch subchannel.state {
            case .ready: return .ready
            // A retry after a failed attempt counts as failing; the moment after losing an established connection
            // (its reconnect is immediate) as connecting.
            case .connecting, .transientFailure: if !subchannel.isFailing { sawConnecting = true }
            case .idle: sawIdle = true
            case .shutdown: break
            }
        }
        if sawConnecting { return .connecting }
        // A failed lookup keeps the last good addresses: with those, the pool is as its connections are.
        if sawIdle { return .idle }
        if self.subchannels.isEmpty { return self.resolutionError == nil ? .idle : .transientFailure }
        return .transientFailure
    }

    /// Why calls fail: a failing connection's error (a failed lookup keeps the last good addresses, and what fails
    /// the calls then is connecting to them), else the failed lookup's, else any connection's last.
    package var lastError: CallStatus? {
        self.subchannels.lazy.filter(\.isFailing).compactMap(\.lastError).first ?? self.resolutionError
            ?? self.subchannels.lazy.compactMap(\.lastError).first
    }

    /// Keepalive interval each subchannel will use for its next connection (tests check the too_many_pings rule).
    package var subchannelKeepAliveTimes: [Duration] { self.subchannels.map(\.keepAliveTime) }

    /// The current connection of each subchannel that has one (tests look inside them).
    package var currentTransports: [any HTTP2Transport] { self.subchannels.compactMap(\.currentTransport) }

    /// The state of each subchannel, in the pool's order (tests).
    package var subchannelStates: [ConnectivityState] { self.subchannels.map(\.state) }

    /// The address of each subchannel, as text.
    package var subchannelAddresses: [String] { self.subchannels.map { "\($0.address)" } }

    /// Calls started and not yet ended (waiting, open, or between attempts).
    package var openCallCount: Int { self.registry.count }

    /// Calls waiting for a stream.
    package var queuedCallCount: Int { self.queue.count }

    /// Calls waiting between attempts.
    package var backingOffCallCount: Int { self.registry.all.filter(\.isBackingOff).count }

    // MARK: CallRouter

    /// Closed by its owner. A stopping loop is not included: a call checks that on its own reactor, which it holds
    /// strongly, where reading it through this pool's unowned reference costs a strong retain and a release.
    package var isClosing: Bool { self.closed }

    /// Closed, or the loop is going away: nothing new starts.
    private var isClosingOrStopping: Bool {
        self.closed || self.loopReactor._withUnsafeGuaranteedRef { $0.isStopping }
    }

    package func adopt(_ call: ClientCall) {
        self.hookShutdown()
        self.registry.insert(call)
    }

    package func adopt(_ coordinator: any CallCoordinator) {
        self.coordinators[ObjectIdentifier(coordinator)] = coordinator
    }

    package func release(_ coordinator: any CallCoordinator) {
        self.coordinators.removeValue(forKey: ObjectIdentifier(coordinator))
    }

    package func release(_ call: ClientCall) {
        self.registry.remove(call)
    }

    package func withdraw(_ call: ClientCall) {
        self.queue.withdraw(call)
    }

    package func route(_ call: ClientCall) {
        if self.isClosingOrStopping {
            call.routeFailed(self.closed ? self.closingStatus : CallStatus(code: .unavailable, message: "the event loop is shutting down"))
            return
        }
        if self.open(call) { return }
        if self.addresses == nil || self.subchannels.isEmpty {
            // Not a lookup per call while a name does not resolve: at most one per minimumResolutionInterval.
            self.resolveWhenAllowed()
            if !call.waitForReady, !self.resolving, let error = self.resolutionError {
                // The last lookup failed and the next is not due yet: a fail-fast call fails with why, now.
                call.routeFailed(error)
                return
            }
        } else if !call.waitForReady && self.allFailing {
            call.routeFailed(self.failFastStatus())
            return
        }
        guard self.queue.enqueue(call) else {
            call.routeRefused(
                CallStatus(
                    code: .resourceExhausted,
                    message: "too many calls waiting for a connection (maxQueuedCalls \(self.shared.value.maxQueuedCalls))"))
            return
        }
        self.connectIdle()
        self.growForStreams()
    }

    /// Connects what the policy wants connected now: every IDLE subchannel, or for `pickFirst` the next address
    /// (`connectNextAddress`).
    private func connectIdle() {
        if self.picker.policy == .pickFirst {
            self.connectNextAddress(movingOn: false)
            return
        }
        for subchannel in self.subchannels where subchannel.state == .idle { subchannel.connect() }
    }

    /// pick_first's next attempt (gRFC A61, Happy Eyeballs): connects the first IDLE address (its
    /// `connectionsPerTarget` subchannels), unless one is up, or one is on its way and this is not `movingOn`. It moves
    /// on when an address's attempts have all failed, and when the last one started has gone `connectionAttemptDelay`
    /// without an answer: a blackholed address costs that, not `connectTimeout`. The attempts under way go on; the
    /// first address to connect is kept and the others are let go of (`subchannel(_:changedFrom:to:reason:)`).
    private func connectNextAddress(movingOn: Bool) {
        // Called again from inside (an attempt that failed at once reports it as it is started): the loop below moves
        // on by itself when a whole address failed so.
        guard !self.pickingNextAddress else { return }
        if let inUse = self.addressInUse {
            // Its address's other connections (`connectionsPerTarget`) come back when asked for.
            for subchannel in self.subchannels where subchannel.address == inUse && subchannel.state == .idle {
                subchannel.connect()
            }
            return
        }
        if !movingOn && self.subchannels.contains(where: { $0.state == .connecting }) { return }
        self.pickingNextAddress = true
        defer { self.pickingNextAddress = false }
        while let address = self.subchannels.first(where: { $0.state == .idle })?.address {
            self.reactor.disarm(&self.attemptDelayTimer)
            for subchannel in self.subchannels where subchannel.address == address && subchannel.state == .idle {
                subchannel.connect()
            }
            // Every attempt ended at once (nothing routes there, a loop that stops): on to the next address.
            guard self.subchannels.contains(where: { $0.address == address && $0.state == .connecting }) else { continue }
            if self.subchannels.contains(where: { $0.state == .idle }) { self.armAttemptDelay() }
            return
        }
    }

    /// pick_first's chosen address: the one a ready subchannel connects to.
    private var addressInUse: NetworkAddress? { self.subchannels.first { $0.state == .ready }?.address }

    /// The Connection Attempt Delay: when it passes with no address connected, the next one is tried too.
    private func armAttemptDelay() {
        let delay = UInt64(max(self.shared.value.connectionAttemptDelay.nanoseconds, 0))
        self.attemptDelayTimer = self.reactor.schedule(afterNanoseconds: delay) { [weak self] in
            guard let self else { return }
            self.attemptDelayTimer = 0
            // Only while something wants a connection: the calls that asked may all have ended meanwhile.
            guard !self.isClosingOrStopping, self.eager || !self.queue.isEmpty else { return }
            self.connectNextAddress(movingOn: true)
        }
    }

    /// Opens a stream for `call` on the best connection that can take one. False when none can now.
    private func open(_ call: ClientCall) -> Bool {
        var refused = 0  // subchannels that said "try elsewhere" during this pick, as a bit set (first 64)
        for _ in 0..<max(self.subchannels.count, 1) {
            // A pool of one connection reads it alone here: a local copy of the whole array for every open cost a
            // retain and a release of the array.
            guard let index = self.pick(refused: refused) else { return false }
            switch self.subchannels[index].open(call) {
            case .done, .notWaiting: return true
            case .tryElsewhere: if index < 64 { refused |= 1 << index } else { return false }
            }
        }
        return false
    }

    /// The subchannel to try next, skipping those in `refused`. A pool of one connection (the usual case) needs no
    /// pick: the picker's closure would read the connection's load for nothing (two retain/release pairs a call),
    /// and whether it has a stream to spare the subchannel checks as it opens (`Subchannel.open`).
    @inline(__always)
    private func pick(refused: Int) -> Int? {
        if self.subchannels.count == 1 { return refused == 0 ? 0 : nil }
        let subchannels = self.subchannels
        return self.picker.pick(count: subchannels.count) { index in
            let subchannel = subchannels[index]
            let usable = subchannel.availableStreams > 0 && (index >= 64 || refused & (1 << index) == 0)
            return (usable, subchannel.load)
        }
    }

    /// Every connection is failing (`Subchannel.isFailing`): a new fail-fast call fails at once then, with the last
    /// error, instead of waiting for a retry that may take the whole connect timeout (a blackholed address).
    private var allFailing: Bool {
        !self.subchannels.isEmpty && self.subchannels.allSatisfy(\.isFailing)
    }

    /// The fail-fast calls already waiting give up when every connection is failing and none is on an attempt a
    /// call asked for: each waits for the first attempts it found (or started) to answer, not for the retries a
    /// failed connection's backoff starts on its own, even one under way when it began to wait. A new call fails at
    /// once then (`allFailing`); one that has waited since must not outwait it (connections that fail a few seconds
    /// apart, each retrying while the other tries, would otherwise keep it waiting until the backoffs outgrow the
    /// stagger: minutes).
    private var nothingLeftToWaitFor: Bool {
        !self.subchannels.isEmpty
            && self.subchannels.allSatisfy { $0.isFailing && ($0.state == .transientFailure || $0.retryingUnasked) }
    }

    private func failFastStatus() -> CallStatus {
        CallStatus(code: .unavailable, message: self.lastError?.message ?? "no connection available")
    }

    /// Hands waiting calls to connections that can take them, in order.
    private func drainQueue() {
        while !self.queue.isEmpty {
            // Whether any can take one: not asked of the picker, whose pick moves round_robin's turn (the call's
            // own pick moved it again, and every drained call went to the same connection).
            guard self.subchannels.contains(where: { $0.availableStreams > 0 }), let call = self.queue.dequeue() else {
                return
            }
            if !self.open(call) {
                if call.isWaitingForStream { self.queue.requeueFirst(call) }
                return
            }
        }
    }

    private func failWaitingFailFast() {
        let status = self.failFastStatus()
        for call in self.queue.removeAll() {
            if call.waitForReady {
                _ = self.queue.enqueue(call)
            } else {
                call.routeFailed(status)
            }
        }
    }

    // MARK: resolution

    private func install(_ addresses: [NetworkAddress]) {
        self.addresses = addresses
        // Keep every subchannel whose address is still there (extra ones opened for stream capacity too), add what
        // `connectionsPerTarget` asks for, close the others. pick_first tries them in its own order.
        // By address, so that a long list (an etcd prefix of thousands of servers) costs a pass, not one per address
        // over every subchannel, on the loop thread.
        var remaining: [NetworkAddress: [Subchannel]] = [:]
        for subchannel in self.subchannels { remaining[subchannel.address, default: []].append(subchannel) }
        var next: [Subchannel] = []
        let order = self.picker.policy == .pickFirst ? LoadBalancingPolicy.pickFirstOrder(addresses) : addresses
        for address in order {
            let kept = remaining.removeValue(forKey: address) ?? []
            next.append(contentsOf: kept)
            for _ in kept.count..<max(kept.count, self.shared.value.connectionsPerTarget) {
                next.append(self.makeSubchannel(address))
            }
        }
        let previous = self.subchannels
        self.subchannels = next
        // In the order they were in (the dictionary's would change from run to run).
        for stale in previous where remaining[stale.address] != nil {
            stale.shutdown(reason: CallStatus(code: .unavailable, message: "address no longer resolved"), graceful: true)
            // Kept until its connections have finished their calls: dropping it would close them under the calls.
            if !stale.isDrained { self.retiring.append(stale) }
        }
    }

    private func makeSubchannel(_ address: NetworkAddress) -> Subchannel {
        let subchannel = Subchannel(
            reactor: self.reactor, address: address, service: self.service, connector: self.connector,
            bus: self.bus, connectionIDs: self.connectionIDs, backoff: self.shared.value.backoff,
            keepAliveTime: self.keepAliveTime, idleTimeout: self.shared.value.idleTimeout)
        subchannel.delegate = self
        subchannel.streamDemand = self.streamDemand
        subchannel.healthCheckServiceName = self.shared.value.healthCheckServiceName
        subchannel.maxHeaderListSize = self.shared.value.maxHeaderListSize
        return subchannel
    }

    /// gRFC A105: a call waits although connections are up, because every ready one is at the server's
    /// MAX_CONCURRENT_STREAMS. Open one more connection to the address with the fewest, up to
    /// `maxConnectionsPerTarget`, rather than queue. Nothing while a connection is on its way (it may bring room).
    /// pick_first grows only to the address it uses: the others stay as they are.
    private func growForStreams() {
        let limit = self.shared.value.maxConnectionsPerTarget
        guard limit > self.shared.value.connectionsPerTarget, var addresses = self.addresses, !addresses.isEmpty else { return }
        var inUse: NetworkAddress?
        if self.picker.policy == .pickFirst {
            inUse = self.addressInUse
            guard let inUse else { return }
            addresses = [inUse]
        }
        var sawReady = false
        for subchannel in self.subchannels where inUse == nil || subchannel.address == inUse {
            switch subchannel.state {
            case .connecting, .idle: return
            case .ready:
                if !subchannel.atServerStreamLimit { return }
                sawReady = true
            case .transientFailure, .shutdown: break
            }
        }
        guard sawReady else { return }
        var best: (address: NetworkAddress, count: Int)?
        for address in addresses {
            let count = self.subchannels.reduce(0) { $0 + ($1.address == address ? 1 : 0) }
            if count < limit && count < (best?.count ?? Int.max) { best = (address, count) }
        }
        guard let address = best?.address else { return }
        let subchannel = self.makeSubchannel(address)
        self.subchannels.append(subchannel)
        subchannel.connect()
    }

    /// Asks the resolver (c-ares on this loop, or getaddrinfo on a helper thread); the answer comes back on the
    /// loop. Numeric addresses and Unix paths need none.
    private func resolve() {
        guard !self.resolving, self.fixedAddresses == nil, !self.isClosingOrStopping else { return }
        if !self.watching {
            self.watching = true
            self.resolver.watch(self.target, on: self.reactor) { [weak self] in
                guard let self else { return }
                self.changesReported &+= 1
                self.resolveWhenAllowed()
            }
        }
        self.resolving = true
        self.changesAtLookup = self.changesReported
        self.lastResolution = Reactor.clock()
        let pool = self
        self.resolver.resolve(self.target, on: self.reactor) { result in pool.resolved(result) }
    }

    /// The resolver says the answer changed: resolve now, or as soon as `minimumResolutionInterval` allows (a change
    /// is never dropped, only batched with those that follow it).
    private func resolveWhenAllowed() {
        guard !self.isClosingOrStopping else { return }
        if self.resolving {
            // Asked again once the lookup under way answers: a timer here would fire (and re-arm) every turn until
            // then when the minimum interval is zero.
            self.resolveAfterLookup = true
            return
        }
        let minimum = UInt64(max(self.shared.value.minimumResolutionInterval.nanoseconds, 0))
        let since = Reactor.clock() &- self.lastResolution
        // The first lookup goes at once: the clock counts from boot, which may be less than the minimum ago.
        if self.lastResolution == 0 || since >= minimum {
            self.resolve()
            return
        }
        guard self.changeResolutionTimer == 0 else { return }
        self.changeResolutionTimer = self.reactor.schedule(afterNanoseconds: minimum - since) { [weak self] in
            guard let self else { return }
            self.changeResolutionTimer = 0
            self.resolveWhenAllowed()
        }
    }

    /// A connection failed or went away, so the backend may have moved: resolves now, or once
    /// `minimumResolutionInterval` has passed since the last lookup (a storm of failures or GOAWAYs must not become a
    /// storm of lookups, but neither may the request be dropped: the periodic lookup may be far off, or off).
    /// Numeric targets never resolve.
    private func resolveAgainSoon() {
        guard self.fixedAddresses == nil else { return }
        self.resolveWhenAllowed()
    }

    /// The next periodic resolution, `resolutionInterval` ± 20 % from now (the jitter keeps a fleet of clients
    /// from asking the DNS server in step).
    private func schedulePeriodicResolution() {
        let interval = self.shared.value.resolutionInterval.nanoseconds
        guard interval > 0, self.periodicResolutionTimer == 0 else { return }
        let delay = Double(interval) * Double.random(in: 0.8...1.2)
        self.periodicResolutionTimer = self.reactor.schedule(afterNanoseconds: UInt64(delay)) { [weak self] in
            guard let self else { return }
            self.periodicResolutionTimer = 0
            // Deferred, not dropped, when a lookup ran lately (a GOAWAY's): dropped, no timer was left armed and the
            // name was never asked again.
            self.resolveWhenAllowed()
        }
    }

    private func resolved(_ result: Result<[NetworkAddress], CallStatus>) {
        self.resolving = false
        guard !self.isClosingOrStopping else { return }
        defer {
            if self.resolveAfterLookup {
                self.resolveAfterLookup = false
                self.resolveWhenAllowed()
            }
        }
        if case .success = result { self.changesRead = self.changesAtLookup }
        switch result {
        case .success(let addresses) where addresses.isEmpty:
            // An answer, not a failure (a DNS lookup with no address is one; an etcd prefix with no key is not):
            // nothing serves the name now. The addresses go, draining: calls must not keep reaching a server that
            // left, whose address may be another's by now. Fail-fast calls fail; wait-for-ready ones wait for one.
            self.resolutionError = CallStatus(
                code: .unavailable, message: "name resolution returned no address for \(self.target)")
            if self.addresses != [] {
                self.bus.publish(.addressesResolved(service: self.service, addresses: []))
                self.install([])
            }
            self.schedulePeriodicResolution()
            self.failWaitingFailFast()
            // Wait-for-ready calls wait for an address: asked again as after a failure (the periodic lookup may be
            // far off, or off).
            if !self.queue.isEmpty { self.scheduleResolveRetry() }
        case .success(let addresses):
            self.resolutionError = nil
            // A pool already in use connects an address that joins at once (so that round_robin and least-loaded
            // spread calls onto it); pick_first keeps to its one connection (connectIdle's rule).
            let inUse = self.subchannels.contains { $0.state != .idle }
            if let current = self.addresses, Set(addresses) == Set(current) {
                // The same addresses, maybe in another order (DNS servers rotate their answers): no change to report,
                // but pick_first tries them in the new order from now on.
                if addresses != current { self.install(addresses) }
            } else {
                self.bus.publish(.addressesResolved(service: self.service, addresses: addresses))
                self.install(addresses)
                // The addresses that went may have been the only ones not failing: nothing is left to wait for.
                if self.nothingLeftToWaitFor { self.failWaitingFailFast() }
            }
            self.schedulePeriodicResolution()
            if self.eager || !self.queue.isEmpty || inUse {
                self.connectIdle()
            }
        case .failure(let status):
            self.resolutionError = status
            self.bus.publish(.resolutionFailed(service: self.service, error: status))
            // The last good addresses stay; the name is asked again on schedule.
            self.schedulePeriodicResolution()
            if self.subchannels.isEmpty { self.failWaitingFailFast() }
            // Tried again after a while when wait-for-ready calls wait with nothing to connect to, or when the watch
            // reported a change no lookup has read yet (the periodic lookup may be far off, or off).
            if (self.subchannels.isEmpty && !self.queue.isEmpty) || self.changesRead != self.changesReported {
                self.scheduleResolveRetry()
            }
        }
    }

    /// A lookup again after `resolveRetryDelay` (once armed, not again until it fires).
    private func scheduleResolveRetry() {
        guard self.resolveRetryTimer == 0 else { return }
        let delay = UInt64(max(self.shared.value.resolveRetryDelay.nanoseconds, 0))
        self.resolveRetryTimer = self.reactor.schedule(afterNanoseconds: delay) { [weak self] in
            guard let self else { return }
            self.resolveRetryTimer = 0
            self.resolveWhenAllowed()
        }
    }

    // MARK: SubchannelDelegate

    package var hasWaitingCalls: Bool { !self.queue.isEmpty }

    package func subchannel(
        _ subchannel: Subchannel, changedFrom old: ConnectivityState, to new: ConnectivityState, reason: CallStatus?
    ) {
        guard !self.closed else { return }
        switch new {
        case .ready:
            if self.picker.policy == .pickFirst {
                // The first address to connect is the one: the others are let go of, whatever they were doing
                // (an attempt, a health check yet to answer, a backoff that would redial them).
                self.reactor.disarm(&self.attemptDelayTimer)
                for other in self.subchannels where other.address != subchannel.address { other.release() }
            }
            self.drainQueue()
            // Calls still waiting with this one full too: the next connection (gRFC A105).
            if !self.queue.isEmpty { self.growForStreams() }
        case .transientFailure:
            // Re-resolve when a connection fails, then fail the fail-fast calls if no connection is left to try.
            self.resolveAgainSoon()
            if self.nothingLeftToWaitFor { self.failWaitingFailFast() }
            // pick_first moves on to the next address at once, once this address has no attempt left under way
            // (its `connectionsPerTarget` connections are one attempt); the others reconnect after their own
            // backoff.
            if self.picker.policy == .pickFirst && (self.eager || !self.queue.isEmpty)
                && !self.subchannels.contains(where: { $0.address == subchannel.address && $0.state == .connecting })
            {
                self.connectNextAddress(movingOn: true)
            }
        case .idle:
            // A ready connection that went away (a GOAWAY, the server closing it): the backend may have moved. Not
            // one this side let go of (an idle timeout, pick_first's choice of another address: reported with OK).
            if old == .ready && reason?.code != .ok { self.resolveAgainSoon() }
            // Reconnect without waiting for a call: in an eager pool (`connectAll`), and, but for pick_first, in a
            // pool whose other connections serve calls meanwhile (round_robin's rule: every address stays
            // connected while the channel is used). Otherwise the calls all go to those others, none ever waits,
            // and the pool shrinks towards one connection as connections go (a server's maximum connection age).
            // Not when the idle timeout closed it (reported with OK): that is what the user asked for.
            let othersServing = self.picker.policy != .pickFirst
                && self.subchannels.contains { $0 !== subchannel && ($0.state == .ready || $0.state == .connecting) }
            let reconnectEagerly = (self.eager || othersServing) && reason?.code != .ok
            if !self.queue.isEmpty {
                self.reconnect(subchannel)
            } else if reconnectEagerly {
                // Unasked, after the backoff's delay when the server sent GOAWAY before the connection was
                // established (a call that comes meanwhile connects at once).
                let delay = subchannel.automaticReconnectDelay
                guard delay > .zero else {
                    self.reconnect(subchannel)
                    return
                }
                subchannel.scheduleReconnect(after: delay) { [weak self, weak subchannel] in
                    guard let self, let subchannel, !self.closed, subchannel.state == .idle else { return }
                    self.reconnect(subchannel)
                }
            }
        case .connecting, .shutdown:
            break
        }
    }

    /// Connects `subchannel` again, IDLE after its connection went: pick_first connects its first IDLE address.
    private func reconnect(_ subchannel: Subchannel) {
        if self.picker.policy == .pickFirst { self.connectIdle() } else { subchannel.connect() }
    }

    package func subchannel(_ subchannel: Subchannel, raisedKeepAliveTimeTo time: Duration) {
        guard time > self.keepAliveTime else { return }
        self.keepAliveTime = time
        for other in self.subchannels where other !== subchannel { other.adoptKeepAliveTime(time) }
    }

    package func subchannelFinishedDraining(_ subchannel: Subchannel) {
        self.retiring.removeAll { $0 === subchannel }
    }

    package func subchannelHasCapacity(_ subchannel: Subchannel) {
        if !self.queue.isEmpty { self.drainQueue() }
    }

    // MARK: closing

    /// Stops taking calls. Graceful: calls on a stream run to their end (and are never retried), then the connections
    /// close; calls waiting for a stream or between attempts end now. Not graceful (or a second time): everything
    /// ends now with `reason`, draining connections and their calls included.
    package func close(graceful: Bool, reason: CallStatus = CallStatus(code: .unavailable, message: "the connection is closed")) {
        if !self.closed {
            self.closed = true
            self.closingStatus = reason
            // No more lookups: the resolution timers go now, not when they fire (up to 36 s later) to do nothing.
            self.reactor.disarm(&self.periodicResolutionTimer)
            self.reactor.disarm(&self.changeResolutionTimer)
            self.reactor.disarm(&self.resolveRetryTimer)
            self.reactor.disarm(&self.attemptDelayTimer)
            // Nor changes: a resolver's watch (etcd's stream and connection) ends with the pool, not when the
            // channel is let go of (a manager keeps its closed channels).
            self.resolver.stopWatching(self.target, on: self.reactor)
            // Calls first learn that nothing is retried any more; then the waiting ones go.
            for call in self.registry.all { call.channelClosing(reason) }
            for call in self.queue.removeAll() { call.routeFailed(reason) }
            for coordinator in Array(self.coordinators.values) { coordinator.channelClosing(reason) }
        }
        if !graceful {
            // The calls end first, as ended by the closing (not the server's failures, for the breaker), and only
            // then the connections: a stream failed by its connection's close would end with the transport's words.
            self.closingStatus = reason
            for call in self.registry.all { call.endByClosing(reason) }
        }
        for subchannel in self.subchannels { subchannel.shutdown(reason: reason, graceful: graceful) }
        if !graceful {
            for subchannel in self.retiring { subchannel.shutdown(reason: reason, graceful: false) }
            self.retiring.removeAll()
            if self.hooked {
                self.hooked = false
                self.reactor.removeShutdownHook(self)
            }
        }
    }

    /// Connects every IDLE subchannel (used when a service is registered, so that health reports READY early).
    package func connectAll() {
        // Closed: nothing to connect (a `connect()` on a closed channel, a manager's lookup racing its close).
        guard !self.closed else { return }
        // Its connections are made before any call: a stopping loop must shut them down through this pool too (their
        // subchannels' SHUTDOWN, not a connection's close, is what the metrics' state gauge ends on).
        self.hookShutdown()
        self.eager = true
        // Not a lookup per `connection(service:)` while the name does not resolve: at most one per minimum interval.
        if self.addresses == nil { self.resolveWhenAllowed() }
        self.connectIdle()
    }

    /// Closes with the loop if it stops first (once a call or `connectAll` gave this pool something to end).
    private func hookShutdown() {
        // Not once closed: the call it would be for is refused, and the hook would keep the closed pool (and its
        // subchannels and resolver) until the loop stops.
        guard !self.hooked, !self.closed else { return }
        self.hooked = true
        self.reactor.addShutdownHook(self)
    }

    /// The reactor is stopping: every call ends now.
    package override func reactorRunSubmitted() {
        self.hooked = false
        self.close(graceful: false, reason: CallStatus(code: .unavailable, message: "the event loop is shutting down"))
    }
}
