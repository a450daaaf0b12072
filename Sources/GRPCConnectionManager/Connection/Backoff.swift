/// Reconnect backoff: exponential with jitter (grpc `doc/connection-backoff.md`), the Go original's defaults.
///
/// The n-th delay is `min(base * multiplier^n, max)`, then multiplied by a factor drawn uniformly from
/// `[1 - jitter, 1 + jitter]`. Every delay is jittered, the first included, so that clients that lost a server
/// together do not come back together (grpc-java#5366). `reset()` after a connection becomes ready.
struct Backoff: Sendable, Hashable {
    /// Backoff settings.
    struct Configuration: Sendable, Hashable {
        var base: Duration
        var multiplier: Double
        var jitter: Double
        var maximum: Duration
    }

    let configuration: Configuration
    private(set) var attempt = 0

    init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    /// The delay before the next attempt; advances the sequence. `unit` is a uniform random number in [0, 1).
    mutating func next(unit: Double) -> Duration {
        let base = Double(self.configuration.base.nanoseconds)
        let maximum = Double(self.configuration.maximum.nanoseconds)
        var delay = base
        var step = 0
        while step < self.attempt && delay < maximum {
            delay *= self.configuration.multiplier
            step += 1
        }
        delay = min(delay, maximum)
        let factor = 1 + self.configuration.jitter * (2 * unit - 1)
        self.attempt += 1
        return .nanoseconds(Int64(max(0, delay * factor)))
    }

    /// Back to the first delay (a connection reached READY).
    mutating func reset() {
        self.attempt = 0
    }
}
