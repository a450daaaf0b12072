import GRPCCMReactor

/// Reconnect backoff: exponential with jitter (grpc `doc/connection-backoff.md`), the Go original's defaults.
///
/// The n-th delay is `min(base * multiplier^n, max)`, then multiplied by a factor drawn uniformly from
/// `[1 - jitter, 1 + jitter]`. Every delay is jittered, the first included, so that clients that lost a server
/// together do not come back together (grpc-java#5366). `reset()` after a connection becomes ready.
package struct Backoff: Sendable, Hashable {
    /// Backoff settings.
    package struct Configuration: Sendable, Hashable {
        package var base: Duration
        package var multiplier: Double
        package var jitter: Double
        package var maximum: Duration

        package init(base: Duration, multiplier: Double, jitter: Double, maximum: Duration) {
            self.base = base
            self.multiplier = multiplier
            self.jitter = jitter
            self.maximum = maximum
        }
    }

    package let configuration: Configuration
    package private(set) var attempt = 0
    /// The last delay before its jitter (nanoseconds): the next is this times the multiplier, one step, so that a
    /// delay costs the same after a week of failures as after one (a multiplier of 1 never reaches the maximum).
    private var unjittered = 0.0

    package init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    /// The delay before the next attempt; advances the sequence. `unit` is a uniform random number in [0, 1).
    package mutating func next(unit: Double) -> Duration {
        let maximum = Double(self.configuration.maximum.nanoseconds)
        let delay = self.attempt == 0
            ? min(Double(self.configuration.base.nanoseconds), maximum)
            : min(self.unjittered * self.configuration.multiplier, maximum)
        self.unjittered = delay
        let factor = 1 + self.configuration.jitter * (2 * unit - 1)
        self.attempt &+= 1
        // Clamped below 2^63 ns before it becomes an Int64: a maximum set near Duration's end ("never") would
        // otherwise trap once jitter pushes it past.
        return .nanoseconds(Int64(min(max(0, delay * factor), Self.longest)))
    }

    /// The largest Double below 2^63 that is a whole number of nanoseconds (about 292 years).
    private static let longest = Double(Int64.max).nextDown

    /// Back to the first delay (a connection reached READY).
    package mutating func reset() {
        self.attempt = 0
        self.unjittered = 0
    }
}
