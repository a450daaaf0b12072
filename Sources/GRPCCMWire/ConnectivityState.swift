/// gRPC's five connectivity states (grpc `doc/connectivity-semantics-and-api.md`), one per connection.
///
/// Names and numbers follow grpc-go (`IDLE`=0 … `SHUTDOWN`=4) so logs, metric labels and dashboards carry over.
public enum ConnectivityState: Int, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// No connection and no attempt under way. A call (or `connect`) starts one.
    case idle = 0
    /// An attempt is under way: TCP connect, then the server's HTTP/2 SETTINGS.
    case connecting = 1
    /// Connected: the server's SETTINGS arrived and nothing has failed since. Calls go out.
    case ready = 2
    /// An attempt failed, or an established connection was lost. Backoff runs; fail-fast calls fail at once with
    /// the last error, wait-for-ready calls wait.
    case transientFailure = 3
    /// Closed by the application. Terminal: calls fail at once.
    case shutdown = 4

    public var description: String {
        switch self {
        case .idle: return "IDLE"
        case .connecting: return "CONNECTING"
        case .ready: return "READY"
        case .transientFailure: return "TRANSIENT_FAILURE"
        case .shutdown: return "SHUTDOWN"
        }
    }
}
