import GRPCCMCalls
import GRPCCMHandlers
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

/// One unary call sent as several attempts in parallel (gRFC A6 hedging): the first attempt at once, another every
/// `hedgingDelay` while none has answered, up to `maxAttempts`, each on the pool's next pick. The first attempt that
/// receives response headers, or ends OK or with a status not in `nonFatalStatusCodes`, commits: the others are
/// cancelled and the call ends with its response (whatever that status then). A non-fatal failure sends the next attempt at once; when every attempt failed non-fatally the call
/// ends with the last failure. New attempts wait while the retry throttle says no (hedging shares it).
///
/// The coordinator admits the call once (circuit breaker), publishes its start and its end (with the attempts
/// made), and is what the caller's handle cancels; each attempt is a `ClientCall` marked as a hedge, which does none
/// of that itself. Loop thread only, except `cancel`.
/// `@unchecked Sendable`: its state is touched on the loop thread only (`cancel` hops there).
final class HedgedCall: ReactorHandler, CallCoordinator, @unchecked Sendable {
    private let environment: CallEnvironment
    private let path: String
    private let policy: CallHedgingPolicy
    /// Makes attempt n (1-based) with the request metadata, its completion wired back here.
    private let makeAttempt: (_ number: Int, _ coordinator: HedgedCall, _ metadata: CallMetadata) -> ClientCall
    /// Let go of once handed to the delivery (with the observers): an owner that keeps the call's handle and that the
    /// completion captures would otherwise keep itself, and this coordinator, alive.
    private var completion: (@Sendable (UnaryResponse) -> Void)?
    /// The interceptors' observers: those that ran before the call started, then those after their async work.
    private var observers: [any CallObserver]
    /// The request metadata, final once the interceptors are done.
    private var metadata: CallMetadata
    /// The call's deadline (0: none): each attempt's, and, while interceptors work, the coordinator's own.
    private let deadline: UInt64
    /// An interceptor's async work runs before the first attempt (`preparationFinished`).
    private var preparing: Bool
    private var deadlineTimer: Reactor.TimerID = 0
    /// When `timer` fires (reactor clock), while it is armed.
    private var timerDue: UInt64 = 0

    private var attempts: [ClientCall] = []
    private var running = 0
    private var done = false
    /// How it ended (for observers that join after its end).
    private var result: UnaryResponse?
    private var timer: Reactor.TimerID = 0
    private var lastFailure: UnaryResponse?
    /// The last attempt refused before it went out (the wait queue full): the call's end when no attempt reached the
    /// server (no failure of the server's to report instead).
    private var lastRefusal: UnaryResponse?
    /// The attempt the call committed to when its response headers came (gRFC A6); 0 before.
    private var committed = 0
    private var permit: CallPermit?
    private var startedAt: UInt64 = 0
    /// When the breaker admitted it: its duration for the breaker runs from here, not from the interceptors' work.
    private var admittedAt: UInt64 = 0
    /// The channel is closing (an attempt ended by it, or found closing when one was due): no attempt is sent any
    /// more.
    private var closing = false
    /// The server pushed back "do not retry" (gRFC A6): no attempt is sent any more.
    private var pushedBack = false
    /// The attempts whose ends the observers have heard (by number, 1-based): each is told once, as it ends, or by
    /// `finish` just before the call's end (an attempt the call's end cancels, or one whose end is still on its way).
    private var attemptsReported: Set<Int> = []
    /// The attempt whose end `attemptEnded` handles (its response is lent to its delivery meanwhile, so `finish`
    /// cannot read the status from it).
    private var endingNow: (number: Int, status: CallStatus)?

    init(
        environment: CallEnvironment, path: String, policy: CallHedgingPolicy, metadata: CallMetadata, deadline: UInt64,
        preparing: Bool, observers: [any CallObserver], completion: @escaping @Sendable (UnaryResponse) -> Void,
        makeAttempt: @escaping (_ number: Int, _ coordinator: HedgedCall, _ metadata: CallMetadata) -> ClientCall
    ) {
        self.environment = environment
        self.path = path
        self.policy = policy
        self.metadata = metadata
        self.deadline = deadline
        self.preparing = preparing
        self.observers = observers
        self.completion = completion
        self.makeAttempt = makeAttempt
        super.init()
    }

    /// The loop is stopping (a shutdown hook while the call lives). With attempts out, their ends end it; with none
    /// (interceptors still working, a pushback's wait) nothing else would: its timers are dropped with the loop.
    override func reactorRunSubmitted() {
        guard self.running == 0 else { return }
        self.finish(UnaryResponse(status: CallStatus(code: .unavailable, message: "the event loop has stopped")), endedLocally: true)
    }

    private var reactor: Reactor { self.environment.reactor }

    /// Loop thread: the call starts; unless interceptors still work, admission, the first attempt, the timer for the
    /// next.
    func start() {
        // Cancelled on the loop's thread before this submitted start ran: it has ended, and takes no permit.
        guard !self.done else { return }
        let environment = self.environment
        self.startedAt = Reactor.clock()
        environment.bus.publishCallEvent(.callStarted(service: environment.service, path: self.path, attempt: 1))
        self.reactor.addShutdownHook(self)
        environment.router.adopt(self)
        guard !self.preparing else {
            // A channel that closed (or a loop that began stopping) before this start ran has ended its calls already:
            // this one ends now too, not once the interceptors' work is done.
            if let refusal = self.environment.closingRefusal {
                self.finish(UnaryResponse(status: refusal), endedLocally: true)
                return
            }
            // The deadline runs while the interceptors work, as a single call's does.
            if self.deadline != 0 {
                self.deadlineTimer = self.reactor.schedule(afterNanoseconds: self.deadline &- min(self.deadline, self.startedAt)) {
                    [weak self] in
                    guard let self else { return }
                    self.deadlineTimer = 0
                    self.finish(UnaryResponse(status: CallStatus(code: .deadlineExceeded, message: "deadline exceeded")))
                }
            }
            return
        }
        self.admitAndLaunch()
    }

    /// Loop thread: the interceptors' async work is done (with the metadata and observers they left, or a failure).
    func preparationFinished(metadata: CallMetadata, observers: [any CallObserver], failure: CallStatus?) {
        guard !self.done, self.preparing else {
            // It ended while they worked: the observers that joined since hear of the end all the same.
            if let result = self.result {
                _ = self.reactor.executeDeferred { for observer in observers.reversed() { observer.callFinished(result) } }
            }
            return
        }
        self.preparing = false
        self.reactor.disarm(&self.deadlineTimer)
        self.metadata = metadata
        self.observers.append(contentsOf: observers)
        if let failure {
            self.finish(UnaryResponse(status: failure), endedLocally: true)
            return
        }
        self.admitAndLaunch()
    }

    /// The loop refused it before it started (it had stopped): the caller delivers the end, and nothing of the
    /// user's is kept (as `finish` lets go of it). Caller's thread; the loop never saw this call.
    func refusedByStoppedLoop() {
        self.completion = nil
        self.observers = []
    }

    /// Admission by the breaker, then the first attempt.
    private func admitAndLaunch() {
        let environment = self.environment
        self.admittedAt = Reactor.clock()
        // A closing channel or a stopping loop refuses it before the breaker, as a single call is: each attempt
        // would be refused the same way, and their ends would count against the breaker its successor inherits.
        if let refusal = self.environment.closingRefusal {
            self.finish(UnaryResponse(status: refusal), endedLocally: true)
            return
        }
        if let admission = environment.policies.admission {
            self.permit = admission.admit(service: environment.service, path: self.path, now: self.admittedAt)
            if self.permit == nil {
                self.finish(UnaryResponse(status: CallStatus(code: .unavailable, message: "circuit breaker is open")))
                return
            }
        }
        self.launch()
    }

    /// Sends the next attempt (if the policy and the throttle allow) and arms the timer for the one after.
    private func launch() {
        guard !self.done, self.committed == 0 else { return }
        self.reactor.disarm(&self.timer)
        // No further attempt: the call ends with the last one out (or now, if none is).
        if self.closing || self.pushedBack {
            // The last attempt out has ended: its answer (a graceful close lets attempts out run to their ends and
            // answer, as a single call's open attempt does).
            if self.running == 0 {
                self.finish(
                    self.lastFailure ?? UnaryResponse(status: self.environment.router.closingStatus), endedLocally: self.closing)
            }
            return
        }
        // Closing since the first attempt (a graceful close): the attempts already out may finish, as the close lets
        // them; a new one would only be refused, and that refusal taken for the server's failure.
        if self.environment.router.isClosing || self.reactor.isStopping {
            self.closing = true
            if self.running == 0 {
                self.finish(self.lastFailure ?? UnaryResponse(status: self.environment.router.closingStatus), endedLocally: true)
            }
            return
        }
        guard self.attempts.count < self.policy.maxAttempts,
            self.attempts.isEmpty || self.environment.policies.retry?.hedgingAllowed(service: self.environment.service) ?? true
        else {
            if self.running == 0 {
                if let failure = self.lastFailure {
                    self.finish(failure)
                } else {
                    let refusal = self.lastRefusal
                    self.finish(
                        refusal ?? UnaryResponse(status: CallStatus(code: .unavailable, message: "no hedged attempt could be sent")),
                        endedLocally: refusal != nil)
                }
            }
            return
        }
        let attempt = self.makeAttempt(self.attempts.count + 1, self, self.metadata)
        self.attempts.append(attempt)
        self.running += 1
        if self.attempts.count < self.policy.maxAttempts { self.armTimer(after: self.policy.hedgingDelay) }
        attempt.start()
    }

    /// Attempt `number` ended (its completion: the loop's deferred phase).
    func attemptEnded(_ number: Int, _ response: UnaryResponse) {
        self.running -= 1
        guard !self.done else { return }
        // Observers hear of each attempt as it ends (this is its completion, the deferred phase), once the end is
        // handled: `willRetry` when it sent the next attempt or left one due. An end that ends the call is heard
        // from `finish`, before the call's end.
        let attemptsBefore = self.attempts.count
        self.endingNow = (number, response.status)
        defer {
            self.endingNow = nil
            if !self.done && !self.observers.isEmpty && self.attemptsReported.insert(number).inserted {
                let willRetry =
                    self.committed == 0
                    && (self.attempts.count > attemptsBefore || self.timer != 0 && self.attempts.count < self.policy.maxAttempts)
                for observer in self.observers {
                    observer.attemptFinished(attempt: number, status: response.status, willRetry: willRetry)
                }
            }
        }
        if self.committed != 0 && self.committed != number { return }  // a loser, cancelled at the commit
        let code = response.status.code
        // Ended by this side (the channel closing): no other attempt is sent (nothing is retried once closing
        // began). The attempts still running on the server run on, as a graceful close lets them; when none is left
        // the call ends, and, like a single call's such end, counts for nothing in the breaker. The committed
        // attempt's end is the call's at once: the others are losers, whose ends no longer count (committed while the
        // close ended them all, it would otherwise wait for ever).
        if self.attempts.indices.contains(number - 1) && self.attempts[number - 1].endedLocally {
            guard self.environment.router.isClosing || self.reactor.isStopping else {
                // Refused before it went out (the wait queue was full, RESOURCE_EXHAUSTED): no answer of the server's
                // and no close. A later hedge may still go; with none running, and none due before the deadline (no
                // attempt runs to end the call at it), the call ends now with the last failure the server gave, or
                // this refusal.
                self.lastRefusal = response
                let nextInTime = self.timer != 0 && (self.deadline == 0 || self.timerDue < self.deadline)
                if self.running == 0 && !nextInTime {
                    self.finish(self.lastFailure ?? response, endedLocally: self.lastFailure == nil)
                }
                return
            }
            self.closing = true
            if self.running == 0 || self.committed == number { self.finish(response, endedLocally: true) }
            return
        }
        let nonFatal = !response.status.isOK && self.policy.nonFatalStatusCodes.contains(code)
        let pushback = response.status.isOK ? .none : RetryPushback(response.trailingMetadata.values(for: "grpc-retry-pushback-ms"))
        // The throttle learns the server's answer (gRFC A6): a non-fatal code, or a pushback, is a failure.
        if !self.environment.router.isClosing {
            self.environment.policies.retry?.hedgedAttemptEnded(
                service: self.environment.service,
                succeeded: response.status.isOK ? true : (nonFatal || pushback == .stop) ? false : nil)
        }
        if self.committed == number || !nonFatal {
            self.finish(response)
            return
        }
        self.lastFailure = response
        switch pushback {
        case .stop:
            // "Do not retry": no further attempt; the ones out may still answer.
            self.pushedBack = true
            self.reactor.disarm(&self.timer)
        case .after(let delay):
            // The next attempt when the server asked, not at once (nor at the old delay), unless that is past the
            // call's deadline: then none, as a retry is not made that could not start before it.
            self.reactor.disarm(&self.timer)
            let startsInTime = self.deadline == 0 || Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0)) < self.deadline
            if self.attempts.count < self.policy.maxAttempts && !self.closing && startsInTime { self.armTimer(after: delay) }
        case .none:
            // A non-fatal failure: the next attempt goes now instead of after the delay.
            self.launch()
        }
        if self.running == 0 && !self.done && self.timer == 0 { self.finish(response) }
    }

    /// The next attempt after `delay`.
    private func armTimer(after delay: Duration) {
        self.timerDue = Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0))
        self.timer = self.reactor.schedule(afterNanoseconds: UInt64(max(delay.nanoseconds, 0))) { [weak self] in
            guard let self else { return }
            self.timer = 0
            self.launch()
        }
    }

    /// Attempt `number` received response headers: the call is committed to it. The timer stops at once and no
    /// attempt is launched from now on (a hedge timer or another attempt's end later in the same turn would have sent
    /// one); its end, whatever the status, is the call's. The other attempts are cancelled in the turn's deferred
    /// phase: this runs inside nghttp2's processing of the headers, where no stream may be ended.
    func responseHeadersReceived(_ number: Int) {
        guard !self.done, self.committed == 0 else { return }
        self.committed = number
        self.reactor.disarm(&self.timer)
        _ = self.reactor.executeDeferred { [self] in
            guard !self.done else { return }
            for (index, attempt) in self.attempts.enumerated() where index + 1 != number && !attempt.isFinished {
                attempt.end(CallStatus(code: .cancelled, message: "another hedged attempt won"))
            }
        }
    }

    /// The channel began closing: no attempt is sent any more. With none out (the interceptors still working, or a
    /// pushback's delay under way) the call ends now, as a single call waiting between attempts does; otherwise the
    /// attempts' ends end it.
    func channelClosing(_ reason: CallStatus) {
        guard !self.done else { return }
        self.closing = true
        self.reactor.disarm(&self.timer)
        if self.running == 0 { self.finishClosed(reason) }
    }

    /// Ends the call that the channel's close found with no attempt out: with `reason`, as a single call waiting
    /// between attempts ends, the last failure's status in its message when there was one (the next attempt would
    /// have gone but for the close).
    private func finishClosed(_ reason: CallStatus) {
        let status = self.lastFailure.map { CallStateMachine.closedDuringBackoff(reason, after: $0.status) } ?? reason
        self.finish(UnaryResponse(status: status), endedLocally: true)
    }

    /// The caller cancelled (any thread).
    func cancel() {
        let status = CallStatus(code: .cancelled, message: "cancelled by the client")
        if self.reactor.inReactorThread {
            self.finish(UnaryResponse(status: status), cancelledByClient: true)
        } else if !self.reactor.execute({ self.finish(UnaryResponse(status: status), cancelledByClient: true) }) {
            // The loop has stopped: its calls already ended.
        }
    }

    /// The call's one end: the losers cancelled, the breaker and the bus told, observers, then the completion.
    /// `endedLocally`: this side ended it (the caller, or the channel closing), which tells the breaker nothing.
    private func finish(_ response: UnaryResponse, cancelledByClient: Bool = false, endedLocally: Bool = false) {
        guard !self.done else { return }
        self.done = true
        self.result = response
        if !self.reactor.isStopped { self.reactor.removeShutdownHook(self) }
        self.environment.router.release(self)
        self.reactor.disarm(&self.timer)
        self.reactor.disarm(&self.deadlineTimer)
        // The attempts' ends the observers have not heard yet, heard before the call's: each one's own end (the one
        // that ended the call, one whose completion is still on its way), or the cancel that ends it now.
        let cancel = CallStatus(
            code: .cancelled, message: cancelledByClient ? "cancelled by the client" : "another hedged attempt won")
        var attemptEnds: [(number: Int, status: CallStatus)] = []
        for (index, attempt) in self.attempts.enumerated() {
            if !attempt.isFinished { attempt.end(cancel) }
            if !self.observers.isEmpty && self.attemptsReported.insert(index + 1).inserted {
                let own = self.endingNow.flatMap { $0.number == index + 1 ? $0.status : nil } ?? attempt.finalStatus
                attemptEnds.append((index + 1, own ?? cancel))
            }
        }
        let environment = self.environment
        let now = Reactor.clock()
        let duration = Duration.nanoseconds(Int64(bitPattern: now &- self.startedAt))
        if let permit = self.permit, let admission = environment.policies.admission {
            admission.callEnded(
                permit, service: environment.service, path: self.path, status: response.status,
                duration: .nanoseconds(Int64(bitPattern: now &- self.admittedAt)), now: now,
                endedLocally: cancelledByClient || endedLocally)
        }
        // A call cancelled before its start ran was never reported as started, so neither is its end.
        if self.startedAt != 0 {
            environment.bus.publishCallEvent(
                .callFinished(
                    service: environment.service, path: self.path, status: response.status, duration: duration,
                    attempts: self.attempts.count, sentBytes: self.attempts.reduce(0) { $0 + $1.sentBytes },
                    receivedBytes: self.attempts.reduce(0) { $0 + $1.receivedBytes }))
        }
        // Each attempt's completion holds this coordinator: letting go of the attempts breaks the cycle (the ones
        // still ending are held by their pool until they do).
        self.attempts.removeAll()
        // Never inside the call that started it: `start` may fail at once (the breaker), so the end waits for the
        // deferred phase like any completion.
        let observers = self.observers
        let attemptsEnded = attemptEnds
        let completion = self.completion
        self.observers = []
        self.completion = nil
        let deliver: @Sendable () -> Void = {
            for (number, status) in attemptsEnded {
                for observer in observers { observer.attemptFinished(attempt: number, status: status, willRetry: false) }
            }
            for observer in observers.reversed() { observer.callFinished(response) }
            completion?(response)
        }
        // In a deferred phase, as every completion runs, after the call's own events. A loop that has stopped takes no
        // more work: the end then runs on a thread of its own, as a call's does.
        if !self.reactor.executeDeferred(deliver) { spawnDetachedThread(deliver) }
    }
}

/// gRFC A6 hedging for a method or service (`Configuration.hedging`): several attempts in parallel, the first good
/// answer wins.
public struct CallHedgingPolicy: Sendable, Hashable {
    /// Attempts at most, the first included: 2...5 (gRFC A6 caps it at 5). Default 2.
    public var maxAttempts: Int = 2
    /// The wait before each further attempt while none has answered. Default 100 ms; `.zero` sends them all at once.
    public var hedgingDelay: Duration = .milliseconds(100)
    /// Codes after which the call goes on with the other attempts (the next one sent at once); any other code ends
    /// the call. Default UNAVAILABLE.
    public var nonFatalStatusCodes: Set<StatusCode> = [.unavailable]

    /// A policy with these fields (validated with the configuration that holds it).
    public init(maxAttempts: Int = 2, hedgingDelay: Duration = .milliseconds(100), nonFatalStatusCodes: Set<StatusCode> = [.unavailable]) {
        self.maxAttempts = maxAttempts
        self.hedgingDelay = hedgingDelay
        self.nonFatalStatusCodes = nonFatalStatusCodes
    }
}
