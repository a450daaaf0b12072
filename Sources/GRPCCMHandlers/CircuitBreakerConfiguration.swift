import GRPCCMWire

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
        /// The outcomes of the last N calls.
        case count(Int)
        /// The outcomes of the calls that ended in the last N seconds.
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

    /// Every field at its default.
    public init() {}

    package func validate() throws(ConfigurationError) {
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
        // Either would count every healthy call as a failure, and open the breaker on a healthy server.
        if self.failureCodes.contains(.ok) {
            throw ConfigurationError(field: "circuitBreaker.failureCodes", message: "must not contain OK")
        }
        if let threshold = self.slowCallDurationThreshold, threshold <= .zero {
            throw ConfigurationError(field: "circuitBreaker.slowCallDurationThreshold", message: "must be greater than zero (nil: off)")
        }
        if self.permittedCallsInHalfOpen < 1 {
            throw ConfigurationError(field: "circuitBreaker.permittedCallsInHalfOpen", message: "must be at least 1")
        }
    }
}
