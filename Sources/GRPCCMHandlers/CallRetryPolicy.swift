import GRPCCMReactor
import GRPCCMWire

/// Retry settings for calls (gRFC A6 terms). Defaults are the Go original's.
public struct CallRetryPolicy: Sendable, Hashable {
    /// Attempts in total, the first included. Default 3; 1...10.
    public var maxAttempts: Int = 3
    /// Backoff before the first retry. Default 100 ms.
    public var initialBackoff: Duration = .milliseconds(100)
    /// Growth per retry. Default 2.0; any finite number above 0 (gRFC A6).
    public var backoffMultiplier: Double = 2.0
    /// Cap on the backoff. Default 3 s; above 0 (below `initialBackoff`, it caps the first delay too).
    public var maxBackoff: Duration = .seconds(3)
    /// Codes worth another attempt. Default UNAVAILABLE, DEADLINE_EXCEEDED (the server's, or a per-attempt
    /// timeout's; never the call's own deadline, which ends it), RESOURCE_EXHAUSTED, ABORTED.
    public var retryableCodes: Set<StatusCode> = [.unavailable, .deadlineExceeded, .resourceExhausted, .aborted]
    /// Deadline of each attempt (nil: only the call's deadline). When it fires the attempt ends DEADLINE_EXCEEDED
    /// and may be retried. Needs `maxAttempts` above 1 and DEADLINE_EXCEEDED among `retryableCodes` (validation
    /// refuses it otherwise: it would only end calls early).
    public var perAttemptTimeout: Duration? = nil

    /// Every field at its default.
    public init() {}

    /// The wait before retry number `retry` (1 = the first retry): full jitter, uniform in
    /// [0, min(initialBackoff × multiplier^(retry-1), maxBackoff)] (gRFC A6).
    package func backoff(retry: Int, unit: Double) -> Duration {
        var ceiling = Double(self.initialBackoff.nanoseconds)
        let cap = Double(self.maxBackoff.nanoseconds)
        var step = 1
        // At most `maxAttempts` steps; a growing one may stop at the cap (it stays there), a shrinking one may not
        // (a cap below the first delay must not keep it from shrinking under the cap).
        while step < retry && (ceiling < cap || self.backoffMultiplier < 1) {
            ceiling *= self.backoffMultiplier
            step += 1
        }
        return .nanoseconds(Int64(min(ceiling, cap) * unit))
    }

    package func validate(field: String) throws(ConfigurationError) {
        if !(1...10).contains(self.maxAttempts) {
            throw ConfigurationError(field: "\(field).maxAttempts", message: "must be 1...10")
        }
        if self.initialBackoff <= .zero {
            throw ConfigurationError(field: "\(field).initialBackoff", message: "must be greater than zero")
        }
        // gRFC A6's rules (and grpc-go's), so that a retry policy copied from a service config is taken as it is: a
        // multiplier below 1 shrinks the delays, a cap below the first delay caps it.
        if !(self.backoffMultiplier > 0) || !self.backoffMultiplier.isFinite {
            throw ConfigurationError(field: "\(field).backoffMultiplier", message: "must be a finite number greater than zero")
        }
        if self.maxBackoff <= .zero {
            throw ConfigurationError(field: "\(field).maxBackoff", message: "must be greater than zero")
        }
        // OK is an answer, never retried. (An empty list is allowed: no code is retried, a method's way to turn
        // retries off.)
        if self.retryableCodes.contains(.ok) {
            throw ConfigurationError(field: "\(field).retryableCodes", message: "must not contain OK")
        }
        if let timeout = self.perAttemptTimeout {
            if timeout <= .zero {
                throw ConfigurationError(field: "\(field).perAttemptTimeout", message: "must be greater than zero")
            }
            // The timeout is there to retry a slow attempt: with nothing to follow, it would only end the call early,
            // a second deadline nobody asked for.
            if self.maxAttempts < 2 || !self.retryableCodes.contains(.deadlineExceeded) {
                throw ConfigurationError(
                    field: "\(field).perAttemptTimeout",
                    message: "needs maxAttempts above 1 and DEADLINE_EXCEEDED among retryableCodes (no attempt could follow one that timed out)")
            }
        }
    }
}
