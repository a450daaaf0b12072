/// The connections of one service: a subchannel per resolved address (times `connectionsPerTarget`), the calls
/// waiting for one of them, and the picking rule (the ready subchannel with the fewest open and queued streams).
///
/// Wait-for-ready (grpc `doc/wait-for-ready.md`): with no ready connection a call waits while some connection is
/// IDLE or CONNECTING; when all are in TRANSIENT_FAILURE a fail-fast call fails at once with the last connect
/// error, and a wait-for-ready call keeps waiting until its deadline.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
final class ServicePool: ReactorHandler, SubchannelDelegate, @unchecked Sendable {
    unowned let reactor: Reactor
    let service: String
    let target: Target
    let configuration: Configuration
    let bus: EventBus
    let connectionIDs: ConnectionIDSource
    let pipeline: CallPipeline
    /// The TLS context every connection of this service shares (nil: plaintext).
    let tls: TLSContext?
    let tlsServerName: String?

    private var addresses: [SocketAddress]?
    private var subchannels: [Subchannel] = []
    private var resolving = false
    private var lastResolution: UInt64 = 0
    private var waiting: [ClientCall] = []
    private var waitingHead = 0
    private var pickCursor = 0
    private(set) var closed = false
    private var resolutionError: Status?
    /// Set by `connectAll()`: connect as soon as addresses are known, calls or not.
    private var eager = false

    init(
        reactor: Reactor, service: String, target: Target, configuration: Configuration, bus: EventBus,
        connectionIDs: ConnectionIDSource, pipeline: CallPipeline
    ) throws(ConfigurationError) {
        if let tls = configuration.tls {
            do {
                self.tls = try TLSContext(client: tls)
            } catch {
                throw ConfigurationError(field: "tls", message: error.description)
            }
            switch target.kind {
            case .hostPort(let host, _): self.tlsServerName = tls.serverName ?? host
            case .unix: self.tlsServerName = tls.serverName ?? "localhost"
            }
        } else {
            self.tls = nil
            self.tlsServerName = nil
        }
        self.pipeline = pipeline
        self.reactor = reactor
        self.service = service
        self.target = target
        self.configuration = configuration
        self.bus = bus
        self.connectionIDs = connectionIDs
        super.init()
        pipeline.register(service: service, target: target)
        if let numeric = target.numericAddresses { self.install(numeric) }
    }

    // MARK: state for reports

    /// The aggregate state (round_robin's rule): any READY → READY; else any CONNECTING → CONNECTING; else any
    /// IDLE → IDLE; else TRANSIENT_FAILURE. SHUTDOWN once closed.
    var state: ConnectivityState {
        if self.closed { return .shutdown }
        let states = self.subchannels.map(\.state)
        if states.contains(.ready) { return .ready }
        if states.contains(.connecting) || self.resolving { return .connecting }
        if states.contains(.idle) || states.isEmpty { return self.resolutionError == nil ? .idle : .transientFailure }
        return .transientFailure
    }

    var lastError: Status? {
        self.resolutionError ?? self.subchannels.compactMap(\.lastError).first
    }

    /// Keepalive interval each subchannel will use for its next connection (tests check the too_many_pings rule).
    var subchannelKeepAliveTimes: [Duration] { self.subchannels.map(\.keepAliveTime) }

    /// The address of each subchannel, as text.
    var subchannelAddresses: [String] { self.subchannels.map { "\($0.address)" } }

    var openCallCount: Int {
        self.subchannels.reduce(0) { $0 + $1.openCallCount } + (self.waiting.count - self.waitingHead)
    }

    // MARK: calls

    /// A call arrives on the reactor thread.
    func start(_ call: ClientCall) {
        if let problem = call.invalid {
            call.finish(UnaryResponse(status: problem))
            return
        }
        if self.closed {
            call.finish(UnaryResponse(status: Status(code: .unavailable, message: "the connection is closed")))
            return
        }
        if self.reactor.isStopping {
            call.finish(UnaryResponse(status: Status(code: .unavailable, message: "the event loop is shutting down")))
            return
        }
        call.startedAt = Reactor.clock()
        self.bus.publish(.callStarted(service: self.service, path: call.path, attempt: 1))
        if let breaker = self.pipeline.breaker, !breaker.acquire(service: self.service, path: call.path) {
            // Refused without touching the network; reported as a call with no attempt.
            call.finish(
                UnaryResponse(status: Status(code: .unavailable, message: "circuit breaker is open")), retryable: false)
            return
        }
        call.attempt = 1
        if call.deadline != 0 && call.deadlineTimer == 0 {
            call.deadlineTimer = self.reactor.scheduleTimer(at: call.deadline, handler: call)
        }
        self.dispatchAttempt(call)
    }

    /// Sends an attempt (the first, or a retry after its backoff).
    func dispatchAttempt(_ call: ClientCall) {
        call.armAttemptTimeout(self.pipeline.retry?.perAttemptTimeout(path: call.path))
        self.dispatch(call)
    }

    /// An attempt ended: publish it (the retry throttle learns from it).
    func attemptFinished(_ call: ClientCall, status: Status) {
        self.bus.publish(.attemptFinished(service: self.service, path: call.path, status: status, attempt: call.attempt))
    }

    /// Asks the retry handler for another attempt; publishes the retry it schedules.
    func retryDelay(for call: ClientCall, response: UnaryResponse, committed: Bool, attemptTimedOut: Bool) -> Duration? {
        guard let retry = self.pipeline.retry, !self.closed, !response.status.isOK else { return nil }
        guard
            let delay = retry.retryDelay(
                service: self.service, path: call.path, status: response.status, trailers: response.trailingMetadata,
                attempt: call.attempt, committed: committed, attemptTimedOut: attemptTimedOut, deadline: call.deadline,
                now: Reactor.clock())
        else { return nil }
        self.bus.publish(
            .retryScheduled(
                service: self.service, path: call.path, attempt: call.attempt + 1, delay: delay, status: response.status))
        return delay
    }

    /// A call finished (its single completion point calls this): publish it.
    @inline(__always)
    func callFinished(_ call: ClientCall, status: Status) {
        if self.bus.hasSubscribers {
            let duration = Duration.nanoseconds(Int64(bitPattern: Reactor.clock() &- call.startedAt))
            self.bus.publish(
                .callFinished(
                    service: self.service, path: call.path, status: status, duration: duration, attempts: call.attempt,
                    sentBytes: call.sentBytes, receivedBytes: call.receivedBytes))
        }
    }

    private func dispatch(_ call: ClientCall) {
        if call.isFinished { return }
        if let subchannel = self.pickReady() {
            subchannel.enqueue(call)
            return
        }
        if self.addresses == nil || self.subchannels.isEmpty {
            self.resolve()
        } else if !call.waitForReady && self.allInTransientFailure {
            call.finish(UnaryResponse(status: self.failFastStatus()))
            return
        }
        if self.waiting.count - self.waitingHead >= self.configuration.maxQueuedCalls {
            call.finish(
                UnaryResponse(
                    status: Status(
                        code: .resourceExhausted,
                        message: "too many calls waiting for a connection (maxQueuedCalls \(self.configuration.maxQueuedCalls))")))
            return
        }
        call.markWaiting()
        self.waiting.append(call)
        for subchannel in self.subchannels where subchannel.state == .idle {
            subchannel.connect()
        }
    }

    private var allInTransientFailure: Bool {
        !self.subchannels.isEmpty && self.subchannels.allSatisfy { $0.state == .transientFailure }
    }

    private func failFastStatus() -> Status {
        let reason = self.lastError?.message ?? "no connection available"
        return Status(code: .unavailable, message: reason)
    }

    /// The ready subchannel with the least load, starting the scan at a rotating cursor so that ties spread.
    private func pickReady() -> Subchannel? {
        let count = self.subchannels.count
        guard count > 0 else { return nil }
        if count == 1 {
            let only = self.subchannels[0]
            return only.state == .ready ? only : nil
        }
        var best: Subchannel?
        var bestLoad = Int.max
        self.pickCursor = (self.pickCursor + 1) % count
        for offset in 0..<count {
            let candidate = self.subchannels[(self.pickCursor + offset) % count]
            guard candidate.state == .ready else { continue }
            let load = candidate.load
            if load < bestLoad {
                best = candidate
                bestLoad = load
            }
        }
        return best
    }

    private func drainWaiting() {
        while self.waitingHead < self.waiting.count {
            let call = self.waiting[self.waitingHead]
            if call.isFinished {
                self.waitingHead += 1
                continue
            }
            guard let subchannel = self.pickReady() else { break }
            self.waitingHead += 1
            subchannel.enqueue(call)
        }
        self.compactWaiting()
    }

    private func failWaitingFailFast() {
        let status = self.failFastStatus()
        var kept: [ClientCall] = []
        for call in self.waiting[self.waitingHead...] where !call.isFinished {
            if call.waitForReady {
                kept.append(call)
            } else {
                call.finish(UnaryResponse(status: status))
            }
        }
        self.waiting = kept
        self.waitingHead = 0
    }

    private func compactWaiting() {
        if self.waitingHead == self.waiting.count {
            self.waiting.removeAll(keepingCapacity: true)
            self.waitingHead = 0
        } else if self.waitingHead > 256 && self.waitingHead * 2 > self.waiting.count {
            self.waiting.removeFirst(self.waitingHead)
            self.waitingHead = 0
        }
    }

    // MARK: resolution

    private func install(_ addresses: [SocketAddress]) {
        self.addresses = addresses
        let wanted = addresses.flatMap { Array(repeating: $0, count: self.configuration.connectionsPerTarget) }
        // Keep subchannels whose address is still there; close the others.
        var remaining = self.subchannels
        var next: [Subchannel] = []
        for address in wanted {
            if let index = remaining.firstIndex(where: { $0.address == address }) {
                next.append(remaining.remove(at: index))
            } else {
                let subchannel = Subchannel(
                    reactor: self.reactor, address: address, authority: self.target.authority, service: self.service,
                    configuration: self.configuration, bus: self.bus,
                    connectionIDs: self.connectionIDs, tls: self.tls, tlsServerName: self.tlsServerName)
                subchannel.delegate = self
                next.append(subchannel)
            }
        }
        for stale in remaining {
            stale.shutdown(reason: Status(code: .unavailable, message: "address no longer resolved"), graceful: true)
        }
        self.subchannels = next
    }

    /// getaddrinfo blocks, so it runs on a helper thread and reports back through the inbox. Numeric addresses and
    /// Unix paths need none.
    private func resolve() {
        guard !self.resolving, self.target.numericAddresses == nil, !self.closed else { return }
        self.resolving = true
        self.lastResolution = Reactor.clock()
        let target = self.target
        let reactor = self.reactor
        let pool = self
        spawnDetachedThread {
            let result = target.resolveBlocking()
            reactor.execute { pool.resolved(result) }
        }
    }

    private func resolved(_ result: Result<[SocketAddress], Status>) {
        self.resolving = false
        guard !self.closed else { return }
        switch result {
        case .success(let addresses):
            self.resolutionError = nil
            if addresses != self.addresses { self.install(addresses) }
            if self.eager || self.waiting.count > self.waitingHead {
                for subchannel in self.subchannels where subchannel.state == .idle { subchannel.connect() }
            }
        case .failure(let status):
            self.resolutionError = status
            if self.subchannels.isEmpty {
                self.failWaitingFailFast()
                // Wait-for-ready calls keep waiting; try again after the first backoff step.
                if self.waiting.count > self.waitingHead {
                    self.reactor.schedule(afterNanoseconds: UInt64(self.configuration.maxReconnectDelay.nanoseconds)) {
                        [weak self] in self?.resolve()
                    }
                }
            }
        }
    }

    // MARK: SubchannelDelegate

    var hasWaitingCalls: Bool {
        self.waiting[self.waitingHead...].contains { !$0.isFinished }
    }

    func subchannel(
        _ subchannel: Subchannel, changedFrom old: ConnectivityState, to new: ConnectivityState, reason: Status?
    ) {
        switch new {
        case .ready:
            self.drainWaiting()
        case .transientFailure:
            // Re-resolve when a connection fails (rate-limited to once a second), then fail the fail-fast calls
            // if no connection is left to try.
            if self.target.numericAddresses == nil && Reactor.clock() &- self.lastResolution > 1_000_000_000 {
                self.resolve()
            }
            if self.allInTransientFailure { self.failWaitingFailFast() }
        case .idle:
            if self.hasWaitingCalls { subchannel.connect() }
        case .connecting, .shutdown:
            break
        }
    }

    func subchannel(_ subchannel: Subchannel, returned calls: [ClientCall], reason: Status) {
        for call in calls where !call.isFinished {
            if self.closed {
                call.finish(UnaryResponse(status: reason))
            } else {
                call.markWaiting()
                self.dispatch(call)
            }
        }
    }

    // MARK: closing

    /// Stops taking calls. Graceful: open calls finish, then the connections close; waiting calls fail now.
    func close(graceful: Bool, reason: Status = Status(code: .unavailable, message: "the connection is closed")) {
        guard !self.closed else {
            if !graceful { for subchannel in self.subchannels { subchannel.shutdown(reason: reason, graceful: false) } }
            return
        }
        self.closed = true
        for call in self.waiting[self.waitingHead...] where !call.isFinished {
            call.finish(UnaryResponse(status: reason))
        }
        self.waiting = []
        self.waitingHead = 0
        for subchannel in self.subchannels { subchannel.shutdown(reason: reason, graceful: graceful) }
    }

    /// Connects every IDLE subchannel (used when a service is registered, so that health reports READY early).
    func connectAll() {
        self.eager = true
        if self.addresses == nil { self.resolve() }
        for subchannel in self.subchannels where subchannel.state == .idle { subchannel.connect() }
    }
}
