import GRPCCMWire

/// The life of one call, as a pure state machine: inputs in, actions out. No I/O, no clock, no timers, no bus. Its
/// owner, `ClientCall`, performs every action (open or reset a stream, arm the backoff, run the completion).
///
/// ```
///                     start (admitted)         streamOpened           attemptEnded (final)
///    ┌─────────┐ ─────────────────────▶ ┌─────────┐ ─────────▶ ┌──────┐ ──────────────────────────┐
///    │ CREATED │                        │ WAITING │            │ OPEN │                           │
///    └─────────┘                        └─────────┘ ◀───────── └──────┘                           ▼
///         │ start (refused)               ▲  ▲   │  attemptEnded (unprocessed, once:       ┌──────────┐
///         └───────────────────────────────┼──┼───┼──  transparent retry)                  │ FINISHED │
///                                         │  │   │                                        └──────────┘
///                    backoffElapsed       │  │   │ attemptEnded (route failed)                  ▲
///              ┌──────────────┐ ──────────┘  │   ▼                                              │
///              │ BACKING_OFF  │ ◀────────────┴─ attemptEnded (retry after a delay) ─────────────┤
///              └──────────────┘                                                                 │
///   ended (deadline, cancel, forced close): any state but FINISHED → FINISHED ──────────────────┘
///   closing (graceful): PREPARING, BACKING_OFF and WAITING → FINISHED; OPEN runs to its end, never retried
///
///    ┌─────────┐  prepare   ┌───────────┐  start (admitted or refused): as from CREATED
///    │ CREATED │ ─────────▶ │ PREPARING │  (an interceptor finishes its work off the loop; the deadline runs)
///    └─────────┘            └───────────┘
/// ```
///
/// Rules (gRFC A6, PROTOCOL-HTTP2.md):
/// - an attempt is one stream; an attempt the server provably never processed (REFUSED_STREAM, or above a GOAWAY's
///   last stream id) is sent again once, transparently, without counting as an attempt;
/// - a policy retry needs a retryable status, no response headers yet (the call is committed once they arrive), a
///   request that can be replayed (one message, not a stream), and a channel that is not closing;
/// - every path ends in FINISHED exactly once, with the status the `.finish` action carries; inputs after that are
///   ignored and return `.none`.
package struct CallStateMachine: Sendable {
    private enum State: Equatable {
        case created
        case preparing
        case waiting(Attempt)
        case open(Attempt, committed: Bool)
        case backingOff(next: Attempt, lastStatus: CallStatus)
        case finished
    }

    /// One attempt: its number (1 = the first) and whether it already used its transparent retry.
    package struct Attempt: Equatable, Sendable {
        package var number: Int
        package var transparentlyRetried: Bool
    }

    private var state: State = .created
    /// The request is a stream of messages: never replayed by policy.
    private let requestsStreamed: Bool
    /// The channel is closing: nothing starts again.
    private var closing = false

    package init(requestsStreamed: Bool) {
        self.requestsStreamed = requestsStreamed
    }

    // MARK: queries

    /// The current attempt's number (0 before the first and after the end).
    package var attempt: Int {
        switch self.state {
        case .waiting(let attempt), .open(let attempt, _): return attempt.number
        case .backingOff(let next, _): return next.number - 1
        case .created, .preparing, .finished: return 0
        }
    }

    package var isFinished: Bool { self.state == .finished }

    /// The state's name, for tests and logs: CREATED, WAITING, OPEN, OPEN_COMMITTED, BACKING_OFF or FINISHED.
    package var stateName: String {
        switch self.state {
        case .created: return "CREATED"
        case .preparing: return "PREPARING"
        case .waiting: return "WAITING"
        case .open(_, let committed): return committed ? "OPEN_COMMITTED" : "OPEN"
        case .backingOff: return "BACKING_OFF"
        case .finished: return "FINISHED"
        }
    }
    package var isPreparing: Bool { self.state == .preparing }
    package var isWaiting: Bool {
        if case .waiting = self.state { return true }
        return false
    }
    package var isOpen: Bool {
        if case .open = self.state { return true }
        return false
    }
    package var isBackingOff: Bool {
        if case .backingOff = self.state { return true }
        return false
    }

    /// Whether an attempt that fails now may be retried by policy (the policy is asked only then).
    package var mayRetryByPolicy: Bool {
        guard !self.requestsStreamed, !self.closing else { return false }
        switch self.state {
        case .waiting: return true
        case .open(_, let committed): return !committed
        case .created, .preparing, .backingOff, .finished: return false
        }
    }

    // MARK: inputs

    package enum OnStart: Equatable {
        case none
        /// Route attempt 1.
        case route
        /// Refused before any attempt: complete with this status.
        case finish(CallStatus)
    }

    /// Interceptors are still preparing the call (asynchronously): it waits for them, its deadline running.
    /// - Returns: false when the call is past CREATED (nothing to prepare).
    package mutating func prepare() -> Bool {
        guard case .created = self.state else { return false }
        self.state = .preparing
        return true
    }

    /// The call starts (from CREATED, or PREPARING once interceptors are done); `refusal` is why it may not
    /// (invalid, closing, the breaker), nil when admitted.
    package mutating func start(refusal: CallStatus?) -> OnStart {
        guard self.state == .created || self.state == .preparing else { return .none }
        if let refusal {
            self.state = .finished
            return .finish(refusal)
        }
        self.state = .waiting(Attempt(number: 1, transparentlyRetried: false))
        return .route
    }

    /// A stream opened for the waiting attempt.
    package mutating func streamOpened() {
        guard case .waiting(let attempt) = self.state else { return }
        self.state = .open(attempt, committed: false)
    }

    /// The server's response headers arrived on the open attempt (gRFC A6: the call is committed to it).
    package mutating func headersReceived() {
        guard case .open(let attempt, _) = self.state else { return }
        self.state = .open(attempt, committed: true)
    }

    package enum OnAttemptEnded: Equatable {
        case none
        /// Send the same attempt again at once (it never reached the server).
        case retryTransparently
        /// Wait `delay`, then report `backoffElapsed`.
        case retryAfter(Duration)
        /// The call is over with this status.
        case finish(CallStatus)
    }

    /// The current attempt ended with `status`: its stream closed, failed or was abandoned, or routing failed.
    /// The attempt under way would be retried transparently if the server never processed it: once per attempt, and
    /// not while closing. Past that, the retry policy decides.
    package var mayRetryTransparently: Bool {
        switch self.state {
        case .waiting(let attempt), .open(let attempt, _): return !attempt.transparentlyRetried && !self.closing
        case .created, .preparing, .backingOff, .finished: return false
        }
    }

    /// - Parameters:
    ///   - unprocessed: The server provably never processed it (REFUSED_STREAM, nothing received).
    ///   - retryDelay: The retry policy's answer when it was asked (`mayRetryByPolicy`), else nil.
    package mutating func attemptEnded(status: CallStatus, unprocessed: Bool, retryDelay: Duration?) -> OnAttemptEnded {
        let attempt: Attempt
        switch self.state {
        case .waiting(let current), .open(let current, _): attempt = current
        case .created, .preparing, .backingOff, .finished: return .none
        }
        if unprocessed && !attempt.transparentlyRetried && !self.closing {
            self.state = .waiting(Attempt(number: attempt.number, transparentlyRetried: true))
            return .retryTransparently
        }
        if let delay = retryDelay, !status.isOK, self.mayRetryByPolicy {
            self.state = .backingOff(next: Attempt(number: attempt.number + 1, transparentlyRetried: false), lastStatus: status)
            return .retryAfter(delay)
        }
        self.state = .finished
        return .finish(status)
    }

    package enum OnBackoffElapsed: Equatable {
        case none
        /// Route the next attempt.
        case route
        /// Closing meanwhile: end with the last attempt's status.
        case finish(CallStatus)
    }

    /// The wait between attempts is over.
    package mutating func backoffElapsed() -> OnBackoffElapsed {
        guard case .backingOff(let next, let lastStatus) = self.state else { return .none }
        if self.closing {
            self.state = .finished
            return .finish(lastStatus)
        }
        self.state = .waiting(next)
        return .route
    }

    package enum OnEnded: Equatable {
        case none
        /// Finish with the status; first reset the open stream (CANCEL), stop waiting for one, or stop the backoff.
        case finish(CallStatus, abandoning: Abandon)
    }

    /// What to let go of when a call ends from outside its stream.
    package enum Abandon: Equatable {
        case nothing
        case stream
        case queue
        case backoff
    }

    /// The deadline passed, the caller cancelled, or the channel was closed for good: the call ends with `status`
    /// wherever it is.
    package mutating func ended(_ status: CallStatus) -> OnEnded {
        let abandon: Abandon
        switch self.state {
        case .finished: return .none
        case .created, .preparing: abandon = .nothing
        case .waiting: abandon = .queue
        case .open: abandon = .stream
        case .backingOff: abandon = .backoff
        }
        self.state = .finished
        return .finish(status, abandoning: abandon)
    }

    /// The status of a call that the channel's close ended while it waited to retry after `last`.
    package static func closedDuringBackoff(_ status: CallStatus, after last: CallStatus) -> CallStatus {
        CallStatus(code: status.code, message: "\(status.message), while waiting to retry after \(last.code): \(last.message)")
    }

    /// The channel began to close gracefully: an open attempt runs to its end but is never retried; a waiting or
    /// backing-off call ends now with `status` (while backing off, the last attempt's status goes in its message).
    package mutating func closing(_ status: CallStatus) -> OnEnded {
        self.closing = true
        switch self.state {
        case .preparing:
            self.state = .finished
            return .finish(status, abandoning: .nothing)
        case .waiting:
            self.state = .finished
            return .finish(status, abandoning: .queue)
        case .backingOff(_, let lastStatus):
            self.state = .finished
            // The closing status, as a waiting call gets (a caller that tries again elsewhere on UNAVAILABLE does so
            // here too: the retry the policy wanted never came); what the last attempt got, in its words.
            return .finish(Self.closedDuringBackoff(status, after: lastStatus), abandoning: .backoff)
        case .created, .open, .finished:
            return .none
        }
    }
}
