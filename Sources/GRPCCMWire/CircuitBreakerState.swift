/// A circuit breaker's state; raw values are the Go original's gauge encoding.
public enum CircuitBreakerState: Int, Sendable, Hashable, CustomStringConvertible {
    /// Calls go through; failures are counted.
    case closed = 0
    /// Calls fail at once with UNAVAILABLE until the open time has passed.
    case open = 1
    /// A limited number of probe calls go through; their outcome closes or reopens the breaker.
    case halfOpen = 2

    public var description: String {
        switch self {
        case .closed: return "CLOSED"
        case .open: return "OPEN"
        case .halfOpen: return "HALF_OPEN"
        }
    }
}
