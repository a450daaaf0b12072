import GRPCCMWire

/// A circuit breaker for one service and method, as a pure state machine: time comes in with every input, so tests
/// drive it with a fake clock and no sleeps.
///
/// ```
///            failures reach the threshold                 timeout elapsed (next call)
///  ┌────────┐ ─────────────────────────────▶ ┌──────┐ ─────────────────────────────▶ ┌───────────┐
///  │ CLOSED │                                 │ OPEN │                                 │ HALF_OPEN │
///  └────────┘ ◀───────────────────────────────└──────┘ ◀───────────────────────────── └───────────┘
///       ▲          (never directly)                       a probe fails                     │
///       └──────────────────────────────────────────────────────────────────────────────────┘
///                               successThreshold probes succeed
/// ```
///
/// Two ways to trip, chosen by `CircuitBreakerConfiguration.mode`:
/// - consecutive failures (the Go original; sony/gobreaker): `failureThreshold` failures in a row open it, and any
///   success resets the count;
/// - failure rate (resilience4j): over a count- or time-based sliding window, once `minimumNumberOfCalls` outcomes
///   are in, a failure rate at or above `failureRateThreshold` opens it.
/// A call slower than `slowCallDurationThreshold` (when set) counts as a failure. While open every call is refused;
/// after `timeout` up to `permittedCallsInHalfOpen` probes go through at once (others are refused);
/// `successThreshold` successes close it, a failure opens it again.
package struct CircuitBreakerStateMachine {
    package typealias State = CircuitBreakerState

    package enum Outcome: Sendable, Hashable {
        case success
        case failure
    }

    /// What every breaker of a handler reads and none changes: one object for all of them (a machine per method
    /// would otherwise carry its own 112-byte copy).
    package final class Limits: Sendable {
        package let configuration: CircuitBreakerConfiguration
        /// `configuration.failureCodes` among the codes gRPC defines (0...16), one bit each: every call's outcome is
        /// classified, and a `Set` lookup hashed the code (about 200 instructions) where a bit test costs two.
        let failureCodeBits: UInt32

        package init(_ configuration: CircuitBreakerConfiguration) {
            self.configuration = configuration
            self.failureCodeBits = configuration.failureCodes.reduce(0) { bits, code in
                bits | (CircuitBreakerStateMachine.bit(of: code) ?? 0)
            }
        }
    }

    private let limits: Limits
    package var configuration: CircuitBreakerConfiguration { self.limits.configuration }
    package private(set) var state: State = .closed
    /// Counts state changes. A permit carries the epoch it was given in, so an outcome from before a change (a call
    /// admitted while CLOSED that ends while HALF_OPEN) never counts as a probe's.
    package private(set) var epoch: UInt64 = 0
    private var consecutiveFailures = 0
    private var openedAt: UInt64 = 0
    private var probesInFlight = 0
    private var probeSuccesses = 0
    private var window: SlidingWindow

    package init(limits: Limits) {
        self.limits = limits
        self.window = SlidingWindow(limits.configuration.slidingWindow)
    }

    package init(configuration: CircuitBreakerConfiguration) {
        self.init(limits: Limits(configuration))
    }

    /// What `acquire` decided. `changed` reports a transition that happened on the way (OPEN → HALF_OPEN).
    package struct OnAcquire: Equatable {
        package var permitted: Bool
        package var changed: (from: State, to: State)?
        /// The call is a half-open probe.
        package var probe = false
        /// The epoch it was admitted in.
        package var epoch: UInt64 = 0

        package static func == (lhs: OnAcquire, rhs: OnAcquire) -> Bool {
            lhs.permitted == rhs.permitted && lhs.changed?.from == rhs.changed?.from && lhs.changed?.to == rhs.changed?.to
        }
    }

    /// A call wants to go out at `now` (monotonic ns).
    package mutating func acquire(now: UInt64) -> OnAcquire {
        switch self.state {
        case .closed:
            return OnAcquire(permitted: true, changed: nil, probe: false, epoch: self.epoch)
        case .open:
            guard now &- self.openedAt >= UInt64(self.configuration.timeout.nanoseconds) else {
                return OnAcquire(permitted: false, changed: nil)
            }
            self.state = .halfOpen
            self.epoch &+= 1
            self.probesInFlight = 1
            self.probeSuccesses = 0
            return OnAcquire(permitted: true, changed: (.open, .halfOpen), probe: true, epoch: self.epoch)
        case .halfOpen:
            guard self.probesInFlight < self.configuration.permittedCallsInHalfOpen else {
                return OnAcquire(permitted: false, changed: nil)
            }
            self.probesInFlight += 1
            return OnAcquire(permitted: true, changed: nil, probe: true, epoch: self.epoch)
        }
    }

    /// Classifies a finished call: a failure code, or slower than the slow-call threshold, is a failure.
    package func classify(_ code: StatusCode, duration: Duration) -> Outcome {
        let isFailureCode =
            Self.bit(of: code).map { self.limits.failureCodeBits & $0 != 0 } ?? self.configuration.failureCodes.contains(code)
        if isFailureCode { return .failure }
        if let slow = self.configuration.slowCallDurationThreshold, duration > slow { return .failure }
        return .success
    }

    /// A call admitted with (`probe`, `epoch`) ended at `now` with `code` after `duration`: classifies the outcome
    /// and records it. Returns the transition it caused.
    package mutating func callEnded(
        _ code: StatusCode, duration: Duration, probe: Bool, epoch: UInt64, now: UInt64
    ) -> (from: State, to: State)? {
        // The usual call, a success code with no slow-call threshold, is classified from two fields read in place:
        // calling the non-mutating `classify` on `self` (inout here) made Swift copy the whole machine (then 200
        // bytes) to hand it over.
        let outcome: Outcome =
            if let bit = Self.bit(of: code), self.limits.failureCodeBits & bit == 0,
                self.configuration.slowCallDurationThreshold == nil
            {
                .success
            } else {
                self.classify(code, duration: duration)
            }
        return self.record(outcome, probe: probe, epoch: epoch, now: now)
    }

    /// A gRPC code's bit in `failureCodeBits`; nil for a code outside 0...16 (those are looked up in the set).
    @inline(__always)
    fileprivate static func bit(of code: StatusCode) -> UInt32? {
        (0...16).contains(code.rawValue) ? 1 << UInt32(code.rawValue) : nil
    }

    /// A call admitted in the current state finished at `now`. Returns the transition it caused, if any.
    package mutating func record(_ outcome: Outcome, now: UInt64) -> (from: State, to: State)? {
        self.record(outcome, probe: self.state == .halfOpen, epoch: self.epoch, now: now)
    }

    /// A call admitted with (`probe`, `epoch`) finished at `now` with `outcome`. Returns the transition it caused.
    ///
    /// Only outcomes of the current epoch count: a call admitted before the breaker opened says nothing about the
    /// server after it (gobreaker's generations); a probe's outcome decides HALF_OPEN.
    package mutating func record(
        _ outcome: Outcome, probe: Bool, epoch: UInt64, now: UInt64
    ) -> (from: State, to: State)? {
        guard epoch == self.epoch else { return nil }
        switch self.state {
        case .closed:
            switch self.configuration.mode {
            case .consecutiveFailures:
                if outcome == .success {
                    self.consecutiveFailures = 0
                    return nil
                }
                self.consecutiveFailures += 1
                if self.consecutiveFailures >= self.configuration.failureThreshold { return self.open(now: now) }
                return nil
            case .failureRate:
                self.window.record(failed: outcome == .failure, now: now)
                let (total, failures) = self.window.counts(now: now)
                let minimum = min(self.configuration.minimumNumberOfCalls, self.window.capacityLimit ?? Int.max)
                if total >= minimum && total > 0
                    && Double(failures) / Double(total) >= self.configuration.failureRateThreshold
                {
                    return self.open(now: now)
                }
                return nil
            }
        case .open:
            return nil
        case .halfOpen:
            guard probe else { return nil }
            self.probesInFlight = max(0, self.probesInFlight - 1)
            if outcome == .failure { return self.open(now: now) }
            self.probeSuccesses += 1
            if self.probeSuccesses >= self.configuration.successThreshold {
                self.state = .closed
                self.epoch &+= 1
                self.consecutiveFailures = 0
                self.window = SlidingWindow(self.configuration.slidingWindow)
                return (.halfOpen, .closed)
            }
            return nil
        }
    }

    /// A call admitted with (`probe`, `epoch`) ended without an outcome that says anything about the server (the
    /// client cancelled it): a probe's slot frees, nothing is counted.
    package mutating func release(probe: Bool, epoch: UInt64) {
        guard probe, epoch == self.epoch, self.state == .halfOpen else { return }
        self.probesInFlight = max(0, self.probesInFlight - 1)
    }

    private mutating func open(now: UInt64) -> (from: State, to: State) {
        let from = self.state
        self.state = .open
        self.epoch &+= 1
        self.openedAt = now
        self.consecutiveFailures = 0
        self.probesInFlight = 0
        self.probeSuccesses = 0
        self.window = SlidingWindow(self.configuration.slidingWindow)
        return (from, .open)
    }
}
