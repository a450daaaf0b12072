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
struct CircuitBreakerStateMachine {
    typealias State = CircuitBreakerState

    enum Outcome: Sendable, Hashable {
        case success
        case failure
    }

    let configuration: CircuitBreakerConfiguration
    private(set) var state: State = .closed
    private var consecutiveFailures = 0
    private var openedAt: UInt64 = 0
    private var probesInFlight = 0
    private var probeSuccesses = 0
    private var window: SlidingWindow

    init(configuration: CircuitBreakerConfiguration) {
        self.configuration = configuration
        self.window = SlidingWindow(configuration.slidingWindow)
    }

    /// What `acquire` decided. `changed` reports a transition that happened on the way (OPEN → HALF_OPEN).
    struct OnAcquire: Equatable {
        var permitted: Bool
        var changed: (from: State, to: State)?

        static func == (lhs: OnAcquire, rhs: OnAcquire) -> Bool {
            lhs.permitted == rhs.permitted && lhs.changed?.from == rhs.changed?.from && lhs.changed?.to == rhs.changed?.to
        }
    }

    /// A call wants to go out at `now` (monotonic ns).
    mutating func acquire(now: UInt64) -> OnAcquire {
        switch self.state {
        case .closed:
            return OnAcquire(permitted: true, changed: nil)
        case .open:
            guard now &- self.openedAt >= UInt64(self.configuration.timeout.nanoseconds) else {
                return OnAcquire(permitted: false, changed: nil)
            }
            self.state = .halfOpen
            self.probesInFlight = 1
            self.probeSuccesses = 0
            return OnAcquire(permitted: true, changed: (.open, .halfOpen))
        case .halfOpen:
            guard self.probesInFlight < self.configuration.permittedCallsInHalfOpen else {
                return OnAcquire(permitted: false, changed: nil)
            }
            self.probesInFlight += 1
            return OnAcquire(permitted: true, changed: nil)
        }
    }

    /// Classifies a finished call: a failure code, or slower than the slow-call threshold, is a failure.
    func classify(_ code: StatusCode, duration: Duration) -> Outcome {
        if self.configuration.failureCodes.contains(code) { return .failure }
        if let slow = self.configuration.slowCallDurationThreshold, duration > slow { return .failure }
        return .success
    }

    /// A permitted call finished at `now`. Returns the transition it caused, if any.
    mutating func record(_ outcome: Outcome, now: UInt64) -> (from: State, to: State)? {
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
            return nil  // a call admitted before the breaker opened: ignored (gobreaker's generations)
        case .halfOpen:
            self.probesInFlight = max(0, self.probesInFlight - 1)
            if outcome == .failure { return self.open(now: now) }
            self.probeSuccesses += 1
            if self.probeSuccesses >= self.configuration.successThreshold {
                self.state = .closed
                self.consecutiveFailures = 0
                self.window = SlidingWindow(self.configuration.slidingWindow)
                return (.halfOpen, .closed)
            }
            return nil
        }
    }

    private mutating func open(now: UInt64) -> (from: State, to: State) {
        let from = self.state
        self.state = .open
        self.openedAt = now
        self.consecutiveFailures = 0
        self.probesInFlight = 0
        self.probeSuccesses = 0
        self.window = SlidingWindow(self.configuration.slidingWindow)
        return (from, .open)
    }
}

/// The outcomes a failure-rate breaker looks at: the last N calls, or the calls of the last N seconds (kept as
/// one-second buckets, as resilience4j does).
struct SlidingWindow {
    private let kind: CircuitBreakerConfiguration.SlidingWindowKind
    private var ring: [Bool] = []
    private var ringNext = 0
    private var buckets: [(second: UInt64, total: Int, failures: Int)] = []

    init(_ kind: CircuitBreakerConfiguration.SlidingWindowKind) {
        self.kind = kind
    }

    /// The window's size in calls for a count-based window.
    var capacityLimit: Int? {
        if case .count(let size) = self.kind { return size }
        return nil
    }

    mutating func record(failed: Bool, now: UInt64) {
        switch self.kind {
        case .count(let size):
            if self.ring.count < size {
                self.ring.append(failed)
            } else {
                self.ring[self.ringNext] = failed
                self.ringNext = (self.ringNext + 1) % size
            }
        case .time(let seconds):
            let second = now / 1_000_000_000
            self.buckets.removeAll { second &- $0.second >= UInt64(seconds) }
            if let last = self.buckets.indices.last, self.buckets[last].second == second {
                self.buckets[last].total += 1
                self.buckets[last].failures += failed ? 1 : 0
            } else {
                self.buckets.append((second, 1, failed ? 1 : 0))
            }
        }
    }

    func counts(now: UInt64) -> (total: Int, failures: Int) {
        switch self.kind {
        case .count:
            return (self.ring.count, self.ring.filter { $0 }.count)
        case .time(let seconds):
            let second = now / 1_000_000_000
            let live = self.buckets.filter { second &- $0.second < UInt64(seconds) }
            return (live.reduce(0) { $0 + $1.total }, live.reduce(0) { $0 + $1.failures })
        }
    }
}

/// Circuit breaker settings. Defaults are the Go original's (consecutive-failure mode).
public struct CircuitBreakerConfiguration: Sendable, Hashable {
    /// How the breaker decides to open.
    public enum Mode: Sendable, Hashable {
        /// `failureThreshold` failures in a row (the Go original).
        case consecutiveFailures
        /// A failure rate over `slidingWindow` (resilience4j).
        case failureRate
    }

    /// A count-based window (the last N calls) or a time-based one (the last N seconds).
    public enum SlidingWindowKind: Sendable, Hashable {
        case count(Int)
        case time(seconds: Int)
    }

    /// Default `.consecutiveFailures`.
    public var mode: Mode = .consecutiveFailures
    /// Consecutive failures that open the breaker. Default 5.
    public var failureThreshold: Int = 5
    /// Successful probes in half-open that close it. Default 2.
    public var successThreshold: Int = 2
    /// How long it stays open before probing. Default 30 s.
    public var timeout: Duration = .seconds(30)
    /// Codes that count as failures. Default UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; other codes are
    /// successes.
    public var failureCodes: Set<StatusCode> = [.unavailable, .deadlineExceeded, .resourceExhausted]
    /// Failure-rate mode: the rate (0...1) at or above which it opens. Default 0.5.
    public var failureRateThreshold: Double = 0.5
    /// Failure-rate mode: outcomes needed before the rate counts. Default 10 (capped at a count window's size).
    public var minimumNumberOfCalls: Int = 10
    /// Failure-rate mode: the window. Default the last 100 calls.
    public var slidingWindow: SlidingWindowKind = .count(100)
    /// Calls slower than this count as failures (nil: off). Default off.
    public var slowCallDurationThreshold: Duration? = nil
    /// Concurrent probes allowed in half-open; others fail fast. Default 1.
    public var permittedCallsInHalfOpen: Int = 1

    public init() {}

    func validate() throws(ConfigurationError) {
        if self.failureThreshold < 1 {
            throw ConfigurationError(field: "circuitBreaker.failureThreshold", message: "must be at least 1")
        }
        if self.successThreshold < 1 {
            throw ConfigurationError(field: "circuitBreaker.successThreshold", message: "must be at least 1")
        }
        if self.timeout <= .zero {
            throw ConfigurationError(field: "circuitBreaker.timeout", message: "must be greater than zero")
        }
        if !(self.failureRateThreshold > 0 && self.failureRateThreshold <= 1) {
            throw ConfigurationError(field: "circuitBreaker.failureRateThreshold", message: "must be within (0, 1]")
        }
        if self.minimumNumberOfCalls < 1 {
            throw ConfigurationError(field: "circuitBreaker.minimumNumberOfCalls", message: "must be at least 1")
        }
        switch self.slidingWindow {
        case .count(let size) where size < 1, .time(let size) where size < 1:
            throw ConfigurationError(field: "circuitBreaker.slidingWindow", message: "must be at least 1")
        default: break
        }
        if self.permittedCallsInHalfOpen < 1 {
            throw ConfigurationError(field: "circuitBreaker.permittedCallsInHalfOpen", message: "must be at least 1")
        }
    }
}
