@_spi(Reactor) import GRPCCMReactor
import GRPCCMCalls
import GRPCCMTransport
import GRPCCMWire

/// What a subchannel tells its pool. Reactor thread.
package protocol SubchannelDelegate: AnyObject {
    /// The subchannel changed connectivity state.
    func subchannel(_ subchannel: Subchannel, changedFrom old: ConnectivityState, to new: ConnectivityState, reason: CallStatus?)
    /// Its connection may take more streams now.
    func subchannelHasCapacity(_ subchannel: Subchannel)
    /// Whether calls wait for a connection (decides between reconnecting and resting in IDLE after a backoff).
    var hasWaitingCalls: Bool { get }
    /// A subchannel shut down gracefully has no connection left: its last draining one closed.
    func subchannelFinishedDraining(_ subchannel: Subchannel)
    /// The server sent GOAWAY too_many_pings: `time` is the keepalive interval from now on, for the next connections
    /// of every subchannel of this pool (the others would hear the same). Live connections keep theirs.
    func subchannel(_ subchannel: Subchannel, raisedKeepAliveTimeTo time: Duration)
}

/// One connection slot to one address: the owner of a `ConnectionStateMachine`. It performs the machine's actions
/// (connect, arm the backoff and idle timers, drain or close the connection) and publishes every transition. Its
/// connections come from a `TransportConnector`, so it is tested without sockets.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class Subchannel: ReactorHandler, HTTP2TransportDelegate, @unchecked Sendable {
    private enum TimerTag {
        static let backoff: UInt64 = 1
        static let idle: UInt64 = 2
        static let healthRetry: UInt64 = 3
    }

    /// Client-side health (gRFC A17) over a READY connection: the state the pool sees is READY only while the
    /// server's health service says SERVING (or does not exist).
    private enum Health {
        /// Not checked (off, or the server answered UNIMPLEMENTED): healthy.
        case unchecked
        /// Waiting for the first answer (or for the watch to start again): CONNECTING to the pool.
        case waiting
        case serving
        /// NOT_SERVING, or any other answer: TRANSIENT_FAILURE to the pool, the connection kept.
        case notServing(CallStatus)
    }

    package unowned let reactor: Reactor
    /// Unowned, not weak (a weak reference would put the pool's every retain on the slow path): the pool owns its
    /// subchannels and detaches itself before it goes.
    @exclusivity(unchecked)
    package unowned(unsafe) var delegate: (any SubchannelDelegate)?
    /// Its owner's: given to each of its connections (`HTTP2Transport.streamDemand`).
    package var streamDemand: StreamDemand?
    package let address: NetworkAddress
    package let service: String
    private let connector: any TransportConnector
    private let bus: LocalEventBus
    private let connectionIDs: ConnectionIDSource
    private let idleTimeout: Duration

    @exclusivity(unchecked)
    private var machine: ConnectionStateMachine
    @exclusivity(unchecked)
    private var transport: (any HTTP2Transport)?
    /// Connections that received GOAWAY (or were closed gracefully) and finish their streams; kept until they close.
    @exclusivity(unchecked)
    private var draining: [ObjectIdentifier: any HTTP2Transport] = [:]
    @exclusivity(unchecked)
    private var backoffTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var idleTimer: Reactor.TimerID = 0
    /// A reconnect that no call asked for, armed by the pool (`scheduleReconnect`); 0: none.
    @exclusivity(unchecked)
    private var reconnectTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var generator = SystemRandomNumberGenerator()
    /// The keepalive interval for new connections; doubled after GOAWAY too_many_pings (gRFC A8), up to a cap.
    @exclusivity(unchecked)
    package private(set) var keepAliveTime: Duration
    @exclusivity(unchecked)
    package private(set) var currentConnectionID = 0
    /// gRFC A17: the service name whose health each connection watches (`""`: the whole server); nil: off.
    @exclusivity(unchecked)
    package var healthCheckServiceName: String?
    /// The response header list limit of the Watch's calls, as of every call on the connection.
    @exclusivity(unchecked)
    package var maxHeaderListSize = 16 << 10
    @exclusivity(unchecked)
    private var health = Health.unchecked
    @exclusivity(unchecked)
    private var healthWatch: HealthWatch?
    @exclusivity(unchecked)
    private var healthRetryTimer: Reactor.TimerID = 0
    /// Watches started since one last said something (grpc-go's count): 0 means the next may start at once, n the
    /// backoff before the next grows with n.
    @exclusivity(unchecked)
    private var healthSilentWatches = 0

    /// The longest keepalive interval `too_many_pings` can push us to: doubling stops here (no overflow, and a
    /// connection still notices a dead peer within a few hours).
    package static let maximumKeepAliveTime: Duration = .seconds(4 * 3600)

    package init(
        reactor: Reactor, address: NetworkAddress, service: String, connector: any TransportConnector, bus: LocalEventBus,
        connectionIDs: ConnectionIDSource, backoff: Backoff.Configuration, keepAliveTime: Duration, idleTimeout: Duration
    ) {
        self.reactor = reactor
        self.address = address
        self.service = service
        self.connector = connector
        self.bus = bus
        self.connectionIDs = connectionIDs
        self.idleTimeout = idleTimeout
        self.keepAliveTime = keepAliveTime
        self.machine = ConnectionStateMachine(backoff: backoff)
    }

    deinit {
        self.healthWatch?.stop()
        for transport in [self.transport].compactMap({ $0 }) + Array(self.draining.values) {
            transport.detachDelegate()
            transport.close(reason: CallStatus(code: .unavailable, message: "connection abandoned"))
        }
    }

    /// The connection's state, as health checking adjusts READY (CONNECTING until the first answer, TRANSIENT_FAILURE
    /// while not serving).
    package var state: ConnectivityState {
        let state = self.machine.state
        guard state == .ready else { return state }
        switch self.health {
        case .unchecked, .serving: return .ready
        case .waiting: return .connecting
        case .notServing: return .transientFailure
        }
    }

    /// Failing, as far as a fail-fast call is concerned (gRFC A62's sticky TRANSIENT_FAILURE): its last attempt
    /// failed, and it waits out the backoff or is trying again; or its server's health check says not serving. Not
    /// the moment after losing an established connection (the reconnect is immediate), and not IDLE: nothing is
    /// trying there, and the attempt a call starts is news worth waiting for.
    package var isFailing: Bool {
        switch self.state {
        case .transientFailure: return self.machine.state == .ready || self.machine.lastAttemptFailed
        case .connecting: return self.machine.state == .connecting && self.machine.lastAttemptFailed
        case .idle, .ready, .shutdown: return false
        }
    }

    /// Connecting again on its own: its backoff after a failed attempt ran out while calls waited. No call asked for
    /// this attempt (`connect()`, from IDLE, is how one asks), so none waits for it: the pool fails its waiting
    /// fail-fast calls when such a retry is all that is left, as it fails a new one then.
    package private(set) var retryingUnasked = false

    package var lastError: CallStatus? {
        if self.machine.state == .ready, case .notServing(let reason) = self.health { return reason }
        return self.machine.lastError
    }

    /// Takes the service's keepalive interval for its next connection, when longer than its own (another connection
    /// heard too_many_pings).
    package func adoptKeepAliveTime(_ time: Duration) {
        if time > self.keepAliveTime { self.keepAliveTime = min(time, Self.maximumKeepAliveTime) }
    }

    /// How long a reconnect from IDLE that no call asked for should wait (see `ConnectionStateMachine`).
    package var automaticReconnectDelay: Duration { self.machine.automaticReconnectDelay }

    /// Runs `reconnect` after `delay`, unless this subchannel shuts down first (its timers go then); one armed at a
    /// time. The pool's eager reconnect after a lost connection.
    package func scheduleReconnect(after delay: Duration, _ reconnect: @escaping () -> Void) {
        self.reactor.disarm(&self.reconnectTimer)
        self.reconnectTimer = self.reactor.schedule(afterNanoseconds: UInt64(max(delay.nanoseconds, 0))) {
            [weak self] in
            self?.reconnectTimer = 0
            reconnect()
        }
    }

    /// Streams that may open on the current connection now.
    package var availableStreams: Int {
        guard self.state == .ready, let transport = self.transport else { return 0 }
        return transport.availableStreams
    }

    /// Ready, with its connection at the server's MAX_CONCURRENT_STREAMS (gRFC A105's reason to grow).
    package var atServerStreamLimit: Bool {
        self.state == .ready && self.transport?.atServerStreamLimit == true
    }

    /// The current connection (tests look inside it).
    package var currentTransport: (any HTTP2Transport)? { self.transport }

    /// Open streams on the current connection (for least-loaded picking).
    package var load: Int { self.transport?.openStreamCount ?? 0 }

    /// No connection left, current or draining (a subchannel shut down gracefully may go then).
    package var isDrained: Bool { self.transport == nil && self.draining.isEmpty }

    /// Calls still running on this subchannel's connections (the current one and the draining ones).
    package var openStreamCount: Int {
        (self.transport?.openStreamCount ?? 0) + self.draining.values.reduce(0) { $0 + $1.openStreamCount }
    }

    // MARK: inputs from the pool

    /// Leaves IDLE if it is there.
    package func connect() {
        let old = self.state
        switch self.machine.connectRequested() {
        case .none: return
        case .connect:
            self.retryingUnasked = false
            self.transition(from: old, reason: nil)
            self.startAttempt()
        }
    }

    /// Lets go of the connection, whatever it is doing, back to IDLE: pick_first chose another address (gRFC A62
    /// drops the others). An attempt under way is closed (one up but waiting for its health check's first answer
    /// too), a connection with streams finishes them first (GOAWAY), a backoff's timer goes. Nothing failed, so the
    /// backoff stays as it was.
    package func release() {
        let old = self.state
        guard self.machine.released() == .close else { return }
        self.cancelTimers()
        self.stopHealthWatch()
        let reason = CallStatus(code: .ok, message: "another address was chosen")
        self.letGoOfTransport(graceful: true, reason: CallStatus(code: .cancelled, message: reason.message))
        // Reported with OK, as an idle timeout is: the pool does not reconnect it unasked.
        self.transition(from: old, reason: reason)
    }

    /// Opens a stream for `call` on the ready connection, if it has a stream to spare (else the call waits in the
    /// pool's queue rather than in nghttp2's).
    package func open(_ call: ClientCall) -> ClientCall.OpenOutcome {
        guard self.state == .ready, let transport = self.transport, transport.availableStreams > 0 else {
            return .tryElsewhere
        }
        return call.open(on: transport)
    }

    /// Closes for good (SHUTDOWN). Graceful: the connections finish their open streams first (GOAWAY tells the
    /// server); otherwise they close now and their streams fail with `reason`.
    package func shutdown(reason: CallStatus, graceful: Bool) {
        let old = self.state
        if self.machine.shutdownRequested() == .close {
            self.cancelTimers()
            self.stopHealthWatch()
            self.transition(from: old, reason: nil)
            self.letGoOfTransport(graceful: graceful, reason: reason)
        }
        if !graceful {
            for transport in Array(self.draining.values) { transport.close(reason: reason) }
        }
    }

    // MARK: performing actions

    /// The current connection goes: graceful with streams open, it finishes them first (GOAWAY) and is kept until it
    /// closes; otherwise it closes now, its streams failing with `reason`.
    private func letGoOfTransport(graceful: Bool, reason: CallStatus) {
        guard let transport = self.transport else { return }
        self.transport = nil
        if graceful && transport.openStreamCount > 0 {
            self.draining[ObjectIdentifier(transport)] = transport
            transport.beginGracefulClose()
        } else {
            transport.close(reason: reason)
        }
    }

    private func startAttempt() {
        if self.reactor.isStopping {
            // No new connection on a loop that is going away: fail the attempt as a refused connect would.
            self.connectFailed(CallStatus(code: .unavailable, message: "the event loop is shutting down"), id: 0)
            return
        }
        let id = self.connectionIDs.next()
        self.currentConnectionID = id
        let transport = self.connector.makeTransport(
            address: self.address, id: id, keepAliveTime: self.keepAliveTime, delegate: self)
        transport.streamDemand = self.streamDemand
        self.transport = transport
        self.bus.publish(.connectAttemptStarted(service: self.service, connectionID: id, address: self.address))
        transport.connect()
    }

    private func transition(from old: ConnectivityState, reason: CallStatus?) {
        let new = self.state
        guard old != new else { return }
        self.bus.publish(
            .connectivityStateChanged(
                service: self.service, connectionID: self.currentConnectionID, from: old, to: new, reason: reason))
        // Armed once READY, not again at each change of health while READY (a watch restarted every few seconds
        // would have kept it from ever firing); when it fires, it measures from the last call's activity.
        if self.machine.state == .ready && self.idleTimer == 0 { self.armIdleTimer(fromNow: true) }
        if self.machine.state != .ready && self.idleTimer != 0 {
            self.reactor.cancelTimer(self.idleTimer)
            self.idleTimer = 0
        }
        self.delegate?.subchannel(self, changedFrom: old, to: new, reason: reason)
    }

    private func handleFailure(_ action: ConnectionStateMachine.OnFailure, old: ConnectivityState) {
        guard case .backoff(let delay, let error) = action else { return }
        self.backoffTimer = self.reactor.scheduleTimer(
            at: Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0)), handler: self, tag: TimerTag.backoff)
        self.transition(from: old, reason: error)
    }

    /// Arms the idle timer for when the connection will have gone the idle timeout without a call: that long after
    /// its last stream ended; or that long from now (`fromNow`) when it has just become usable (READY, and serving
    /// once its health check answered, which may have taken longer than the timeout) or calls are open (the end of
    /// each stamps the time again). (From now in every case, a connection whose call ended just after the timer
    /// was armed went idle only after twice the timeout.)
    private func armIdleTimer(fromNow: Bool) {
        guard self.idleTimeout > .zero else { return }
        if self.idleTimer != 0 { self.reactor.cancelTimer(self.idleTimer) }
        let now = self.reactor.now
        let timeout = UInt64(self.idleTimeout.nanoseconds)
        let due = fromNow ? now &+ timeout : max((self.transport?.lastStreamActivity ?? now) &+ timeout, now)
        self.idleTimer = self.reactor.scheduleTimer(at: due, handler: self, tag: TimerTag.idle)
    }

    private func cancelTimers() {
        self.reactor.disarm(&self.backoffTimer)
        self.reactor.disarm(&self.idleTimer)
        self.reactor.disarm(&self.reconnectTimer)
    }

    // MARK: client-side health (gRFC A17)

    /// Starts the Watch on the ready connection `transport` (when configured); the subchannel waits for its answer.
    private func startHealthWatch(on transport: any HTTP2Transport) {
        guard let name = self.healthCheckServiceName else { return }
        self.health = .waiting
        self.healthSilentWatches += 1
        self.healthWatch = HealthWatch(
            transport: transport, serviceName: name, reactor: self.reactor, service: self.service,
            maxHeaderListSize: self.maxHeaderListSize
        ) { [unowned(unsafe) self] report in
            self.healthReported(report, from: transport)
        }
    }

    /// The connection went away (or the subchannel did): no more watching, nothing more to retry.
    private func stopHealthWatch() {
        self.healthWatch?.stop()
        self.healthWatch = nil
        if self.healthRetryTimer != 0 {
            self.reactor.cancelTimer(self.healthRetryTimer)
            self.healthRetryTimer = 0
        }
        self.health = .unchecked
        self.healthSilentWatches = 0
    }

    private func healthReported(_ report: HealthWatch.Report, from transport: any HTTP2Transport) {
        guard transport === self.transport, self.machine.state == .ready else { return }
        let old = self.state
        switch report {
        case .status(.serving):
            self.health = .serving
            self.healthSilentWatches = 0
        case .status(let status):
            self.health = .notServing(CallStatus(code: .unavailable, message: "health check: \(status)"))
            self.healthSilentWatches = 0
        case .ended(let status):
            self.healthWatch = nil
            if status.code == .unimplemented {
                // The server has no health service: the connection counts as healthy (gRFC A17), and the application
                // hears of it once per connection (it is most likely a misconfiguration).
                self.health = .unchecked
                self.bus.publish(.healthCheckUnimplemented(service: self.service, connectionID: transport.id))
            } else {
                // A Watch that said something and ended (a proxy's stream idle timeout ends long watches) is started
                // again at once, CONNECTING meanwhile: the connection is fine, and calls queued on it for a free
                // stream must not fail for it. One that ended without a word is a failing health service: as
                // grpc-go, TRANSIENT_FAILURE (a fail-fast call is not kept waiting for health nobody reports) until
                // the next one starts, after a backoff that grows with each silent one.
                let silent = self.healthSilentWatches
                let delay: Duration
                if silent == 0 {
                    self.health = .waiting
                    delay = .zero
                } else {
                    let end = status.message.isEmpty ? "\(status.code)" : "\(status.code): \(status.message)"
                    self.health = .notServing(CallStatus(code: .unavailable, message: "health check: the Watch ended, \(end)"))
                    delay = min(Duration.seconds(1) * (1 << min(silent - 1, 5)), Duration.seconds(30))
                }
                self.healthRetryTimer = self.reactor.scheduleTimer(
                    at: Reactor.clock() &+ UInt64(delay.nanoseconds), handler: self, tag: TimerTag.healthRetry)
            }
        }
        self.transition(from: old, reason: self.state == .transientFailure ? self.lastError : nil)
    }

    package override func reactorTimerFired(tag: UInt64) {
        switch tag {
        case TimerTag.backoff:
            self.backoffTimer = 0
            let old = self.state
            switch self.machine.backoffElapsed(callsWaiting: self.delegate?.hasWaitingCalls ?? false) {
            case .none: return
            case .connect:
                self.retryingUnasked = true
                self.transition(from: old, reason: nil)
                self.startAttempt()
            case .becameIdle:
                self.transition(from: old, reason: nil)
            }
        case TimerTag.healthRetry:
            self.healthRetryTimer = 0
            guard self.machine.state == .ready, let transport = self.transport else { return }
            let old = self.state
            self.startHealthWatch(on: transport)  // CONNECTING until it answers
            self.transition(from: old, reason: nil)
        case TimerTag.idle:
            self.idleTimer = 0
            guard self.machine.state == .ready, let transport = self.transport else { return }
            let idleFor = self.reactor.now &- transport.lastStreamActivity
            // The health watch's own stream does not keep a connection busy.
            let calls = transport.openStreamCount - (self.healthWatch == nil ? 0 : 1)
            if calls > 0 || idleFor < UInt64(self.idleTimeout.nanoseconds) {
                self.armIdleTimer(fromNow: calls > 0)
                return
            }
            let old = self.state
            guard self.machine.idleTimeoutElapsed() == .close else { return }
            self.stopHealthWatch()
            self.transport = nil
            transport.close(reason: CallStatus(code: .unavailable, message: "idle timeout"))
            self.transition(from: old, reason: CallStatus(code: .ok, message: "idle timeout"))
        default:
            break
        }
    }

    // MARK: HTTP2TransportDelegate

    package func transportReady(_ transport: any HTTP2Transport) {
        guard transport === self.transport else { return }
        let old = self.state
        guard self.machine.connectSucceeded(now: self.reactor.now) == .becameReady else { return }
        self.bus.publish(
            .connectAttemptSucceeded(service: self.service, connectionID: transport.id, address: self.address))
        self.startHealthWatch(on: transport)
        self.transition(from: old, reason: nil)
    }

    package func transportTLSFilesRefused(_ transport: any HTTP2Transport, reason: String) {
        self.bus.publish(
            .tlsFilesRefused(
                service: self.service, connectionID: transport.id, error: CallStatus(code: .unavailable, message: reason)))
    }

    package func transportDraining(
        _ transport: any HTTP2Transport, errorCode: UInt32, debugData: String, tookStreams: Bool
    ) {
        let tooManyPings = errorCode == 0xb && debugData == "too_many_pings"
        if tooManyPings {
            let doubled = min(transport.keepAliveTime * 2, Self.maximumKeepAliveTime)
            if doubled > self.keepAliveTime {
                self.keepAliveTime = doubled
                self.delegate?.subchannel(self, raisedKeepAliveTimeTo: doubled)
            }
        }
        self.bus.publish(
            .goAwayReceived(
                service: self.service, connectionID: transport.id, errorCode: errorCode, debugData: debugData,
                tooManyPings: tooManyPings))
        guard transport === self.transport else { return }
        let old = self.state
        self.stopHealthWatch()
        self.transport = nil
        self.draining[ObjectIdentifier(transport)] = transport
        let unit = Double.random(in: 0..<1, using: &self.generator)
        let reason = CallStatus(code: .unavailable, message: "GOAWAY \(HTTP2ErrorCode.name(errorCode))")
        let refusal = CallStatus(
            code: .unavailable,
            message: "GOAWAY \(HTTP2ErrorCode.name(errorCode)) to two new connections in a row, before either was established")
        switch self.machine.goAwayReceived(refusal, refused: !tookStreams, randomUnit: unit, now: self.reactor.now) {
        case .none: break
        case .drain: self.transition(from: old, reason: reason)
        case .drainAndBackoff(let delay, let error):
            // Not published as connectAttemptFailed: the attempt was reported as having connected, and one outcome
            // per attempt is what the events promise.
            self.handleFailure(.backoff(delay: delay, error: error), old: old)
        }
    }

    package func transportHasCapacity(_ transport: any HTTP2Transport) {
        guard transport === self.transport, self.state == .ready else { return }
        self.delegate?.subchannelHasCapacity(self)
    }

    package func transportClosed(
        _ transport: any HTTP2Transport, reason: CallStatus, wasReady: Bool, keepaliveTimedOut: Bool
    ) {
        if self.draining.removeValue(forKey: ObjectIdentifier(transport)) != nil {
            if self.draining.isEmpty && self.machine.state == .shutdown { self.delegate?.subchannelFinishedDraining(self) }
            return
        }
        guard transport === self.transport else { return }
        let oldState = self.state
        self.stopHealthWatch()
        self.transport = nil
        if keepaliveTimedOut {
            self.bus.publish(.keepaliveTimeout(service: self.service, connectionID: transport.id))
        }
        if wasReady {
            let old = oldState
            let action = self.machine.connectionLost(
                reason, randomUnit: Double.random(in: 0..<1, using: &self.generator), now: self.reactor.now)
            self.handleFailure(action, old: old)
        } else {
            self.connectFailed(reason, id: transport.id)
        }
    }

    private func connectFailed(_ reason: CallStatus, id: Int) {
        let old = self.state
        let action = self.machine.connectFailed(reason, randomUnit: Double.random(in: 0..<1, using: &self.generator))
        if case .backoff(let delay, let error) = action {
            self.bus.publish(
                .connectAttemptFailed(
                    service: self.service, connectionID: id, address: self.address, error: error, backoff: delay))
        }
        self.handleFailure(action, old: old)
    }
}
