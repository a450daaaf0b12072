/// What a subchannel tells its pool. Reactor thread.
protocol SubchannelDelegate: AnyObject {
    /// The subchannel changed connectivity state.
    func subchannel(_ subchannel: Subchannel, changedFrom old: ConnectivityState, to new: ConnectivityState, reason: Status?)
    /// Calls that were handed to the subchannel but never sent (GOAWAY, REFUSED_STREAM, lost before READY).
    func subchannel(_ subchannel: Subchannel, returned calls: [ClientCall], reason: Status)
    /// Whether calls wait for a connection (decides between reconnecting and resting in IDLE after a backoff).
    var hasWaitingCalls: Bool { get }
}

/// One connection slot to one address: the owner of a `ConnectionStateMachine`. It performs the machine's actions
/// (connect, arm the backoff and idle timers, drain or close the transport) and publishes every transition.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
final class Subchannel: ReactorHandler, HTTP2ClientConnectionDelegate, @unchecked Sendable {
    private enum TimerTag {
        static let backoff: UInt64 = 1
        static let idle: UInt64 = 2
    }

    unowned let reactor: Reactor
    weak var delegate: (any SubchannelDelegate)?
    let address: SocketAddress
    let authority: String
    let service: String
    let configuration: Configuration
    let bus: EventBus
    let connectionIDs: ConnectionIDSource
    let tls: TLSContext?
    let tlsServerName: String?

    private var machine: ConnectionStateMachine
    private var transport: HTTP2ClientConnection?
    /// Transports that received GOAWAY and finish their streams; kept alive until they close.
    private var draining: [ObjectIdentifier: HTTP2ClientConnection] = [:]
    private var backoffTimer: Reactor.TimerID = 0
    private var idleTimer: Reactor.TimerID = 0
    private var generator = SystemRandomNumberGenerator()
    /// The keepalive interval for new connections; doubled after GOAWAY too_many_pings (gRFC A8).
    private(set) var keepAliveTime: Duration
    private(set) var currentConnectionID = 0

    init(
        reactor: Reactor, address: SocketAddress, authority: String, service: String, configuration: Configuration,
        bus: EventBus, connectionIDs: ConnectionIDSource, tls: TLSContext? = nil,
        tlsServerName: String? = nil
    ) {
        self.tls = tls
        self.tlsServerName = tlsServerName
        self.reactor = reactor
        self.address = address
        self.authority = authority
        self.service = service
        self.configuration = configuration
        self.bus = bus
        self.connectionIDs = connectionIDs
        self.keepAliveTime = configuration.keepAliveTime
        self.machine = ConnectionStateMachine(backoff: configuration.backoffConfiguration)
    }

    var state: ConnectivityState { self.machine.state }
    var lastError: Status? { self.machine.lastError }

    /// Open plus queued streams on the current transport (for least-loaded picking).
    var load: Int {
        guard let transport = self.transport else { return 0 }
        return transport.activeStreamCount + transport.queuedCallCount
    }

    var queuedOnTransport: Int { self.transport?.queuedCallCount ?? 0 }

    // MARK: inputs from the pool

    /// Leaves IDLE if it is there.
    func connect() {
        let old = self.machine.state
        switch self.machine.connectRequested() {
        case .none: return
        case .connect:
            self.transition(from: old, reason: nil)
            self.startAttempt()
        }
    }

    /// Hands a call to the ready transport.
    func enqueue(_ call: ClientCall) {
        guard self.machine.state == .ready, let transport = self.transport else {
            self.delegate?.subchannel(self, returned: [call], reason: Status(code: .unavailable, message: "not ready"))
            return
        }
        transport.enqueue(call)
    }

    /// Closes for good (SHUTDOWN): the transport closes now, its calls end with `reason`.
    func shutdown(reason: Status, graceful: Bool) {
        let old = self.machine.state
        guard self.machine.shutdownRequested() == .close else { return }
        self.cancelTimers()
        self.transition(from: old, reason: nil)
        if let transport = self.transport {
            self.transport = nil
            if graceful && transport.activeStreamCount > 0 {
                self.draining[ObjectIdentifier(transport)] = transport
                transport.beginGracefulClose()
            } else {
                transport.shutdown(reason: reason)
            }
        }
        if !graceful {
            for transport in self.draining.values { transport.shutdown(reason: reason) }
        }
    }

    /// Calls still running on this subchannel's transports (the current one and the draining ones).
    var openCallCount: Int {
        (self.transport?.activeStreamCount ?? 0) + self.draining.values.reduce(0) { $0 + $1.activeStreamCount }
    }

    // MARK: performing actions

    private func startAttempt() {
        let id = self.connectionIDs.next()
        self.currentConnectionID = id
        let transport = HTTP2ClientConnection(
            reactor: self.reactor, address: self.address, authority: self.authority,
            configuration: self.configuration, id: id, keepAliveTime: self.keepAliveTime, tls: self.tls,
            tlsServerName: self.tlsServerName)
        transport.delegate = self
        self.transport = transport
        self.bus.publish(.connectAttemptStarted(service: self.service, connectionID: id, address: self.address))
        transport.connect()
    }

    private func transition(from old: ConnectivityState, reason: Status?) {
        let new = self.machine.state
        guard old != new else { return }
        self.bus.publish(
            .connectivityStateChanged(
                service: self.service, connectionID: self.currentConnectionID, from: old, to: new, reason: reason))
        self.delegate?.subchannel(self, changedFrom: old, to: new, reason: reason)
        if new == .ready { self.armIdleTimer() }
        if new != .ready && self.idleTimer != 0 {
            self.reactor.cancelTimer(self.idleTimer)
            self.idleTimer = 0
        }
    }

    private func handleFailure(_ action: ConnectionStateMachine.OnFailure, old: ConnectivityState) {
        guard case .backoff(let delay, let error) = action else { return }
        self.transition(from: old, reason: error)
        self.backoffTimer = self.reactor.scheduleTimer(
            at: Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0)), handler: self, tag: TimerTag.backoff)
    }

    private func armIdleTimer() {
        guard self.configuration.idleTimeout > .zero else { return }
        if self.idleTimer != 0 { self.reactor.cancelTimer(self.idleTimer) }
        let base = self.transport?.lastStreamActivity ?? self.reactor.now
        self.idleTimer = self.reactor.scheduleTimer(
            at: max(base, self.reactor.now) &+ UInt64(self.configuration.idleTimeout.nanoseconds), handler: self,
            tag: TimerTag.idle)
    }

    private func cancelTimers() {
        for timer in [self.backoffTimer, self.idleTimer] where timer != 0 {
            self.reactor.cancelTimer(timer)
        }
        self.backoffTimer = 0
        self.idleTimer = 0
    }

    override func reactorTimerFired(tag: UInt64) {
        switch tag {
        case TimerTag.backoff:
            self.backoffTimer = 0
            let old = self.machine.state
            let action = self.machine.backoffElapsed(callsWaiting: self.delegate?.hasWaitingCalls ?? false)
            switch action {
            case .none: return
            case .connect:
                self.transition(from: old, reason: nil)
                self.startAttempt()
            case .becameIdle:
                self.transition(from: old, reason: nil)
            }
        case TimerTag.idle:
            self.idleTimer = 0
            guard self.machine.state == .ready, let transport = self.transport else { return }
            let idleFor = self.reactor.now &- transport.lastStreamActivity
            let timeout = UInt64(self.configuration.idleTimeout.nanoseconds)
            if transport.activeStreamCount > 0 || transport.queuedCallCount > 0 || idleFor < timeout {
                self.armIdleTimer()
                return
            }
            let old = self.machine.state
            guard self.machine.idleTimeoutElapsed() == .close else { return }
            self.transport = nil
            transport.shutdown(reason: Status(code: .unavailable, message: "idle timeout"))
            self.transition(from: old, reason: Status(code: .ok, message: "idle timeout"))
        default:
            break
        }
    }

    // MARK: HTTP2ClientConnectionDelegate

    func connectionReady(_ connection: HTTP2ClientConnection) {
        guard connection === self.transport else { return }
        let old = self.machine.state
        guard self.machine.connectSucceeded() == .becameReady else { return }
        self.bus.publish(
            .connectAttemptSucceeded(service: self.service, connectionID: connection.id, address: self.address))
        self.transition(from: old, reason: nil)
    }

    func connectionDraining(
        _ connection: HTTP2ClientConnection, unstarted: [ClientCall], errorCode: UInt32, debugData: String
    ) {
        let tooManyPings = errorCode == 0xb && debugData == "too_many_pings"
        if tooManyPings {
            let doubled = connection.keepAliveTime * 2
            if doubled > self.keepAliveTime { self.keepAliveTime = doubled }
        }
        self.bus.publish(
            .goAwayReceived(
                service: self.service, connectionID: connection.id, errorCode: errorCode, debugData: debugData,
                tooManyPings: tooManyPings))
        if connection === self.transport {
            self.transport = nil
            self.draining[ObjectIdentifier(connection)] = connection
            let old = self.machine.state
            if self.machine.goAwayReceived() == .drain {
                self.transition(
                    from: old, reason: Status(code: .unavailable, message: "GOAWAY \(HTTP2ErrorCode.name(errorCode))"))
            }
        }
        let reason = Status(code: .unavailable, message: "server sent GOAWAY")
        if !unstarted.isEmpty { self.delegate?.subchannel(self, returned: unstarted, reason: reason) }
    }

    func connectionClosed(_ connection: HTTP2ClientConnection, reason: Status, unstarted: [ClientCall], wasReady: Bool) {
        if self.draining.removeValue(forKey: ObjectIdentifier(connection)) != nil {
            if !unstarted.isEmpty { self.delegate?.subchannel(self, returned: unstarted, reason: reason) }
            return
        }
        guard connection === self.transport else { return }
        self.transport = nil
        if connection.keepaliveTimedOut {
            self.bus.publish(.keepaliveTimeout(service: self.service, connectionID: connection.id))
        }
        let old = self.machine.state
        let unit = Double.random(in: 0..<1, using: &self.generator)
        let action: ConnectionStateMachine.OnFailure
        if wasReady {
            action = self.machine.connectionLost(reason, randomUnit: unit)
        } else {
            action = self.machine.connectFailed(reason, randomUnit: unit)
            if case .backoff(let delay, let error) = action {
                self.bus.publish(
                    .connectAttemptFailed(
                        service: self.service, connectionID: connection.id, address: self.address, error: error,
                        backoff: delay))
            }
        }
        // Calls never sent go back to the pool before the state changes, so that fail-fast ones see TF.
        if !unstarted.isEmpty { self.delegate?.subchannel(self, returned: unstarted, reason: reason) }
        self.handleFailure(action, old: old)
    }

    func retryUnprocessed(_ call: ClientCall) {
        self.delegate?.subchannel(self, returned: [call], reason: Status(code: .unavailable, message: "stream refused"))
    }
}

/// Hands out connection ids, unique per manager (or per standalone channel). Reactor thread only.
final class ConnectionIDSource: @unchecked Sendable {
    // `@unchecked`: used on the reactor thread only.
    private var value = 0
    func next() -> Int {
        self.value += 1
        return self.value
    }
}
