/// A circuit breaker's state; raw values are the Go original's gauge encoding.
public enum CircuitBreakerState: Int, Sendable, Hashable, CustomStringConvertible {
    case closed = 0
    case open = 1
    case halfOpen = 2

    public var description: String {
        switch self {
        case .closed: return "CLOSED"
        case .open: return "OPEN"
        case .halfOpen: return "HALF_OPEN"
        }
    }
}
