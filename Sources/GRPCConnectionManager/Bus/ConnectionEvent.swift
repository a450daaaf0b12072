/// What connections and calls publish on the `EventBus`. Delivered on the reactor thread, synchronously, in
/// subscription order.
///
/// Payloads reuse strings that already exist (the service name, the call's path, the status), so publishing an
/// event allocates nothing.
public enum ConnectionEvent: Sendable {
    /// A connection changed connectivity state. `reason` says why when it is a failure or a GOAWAY.
    case connectivityStateChanged(
        service: String, connectionID: Int, from: ConnectivityState, to: ConnectivityState, reason: Status?)
    /// A connection attempt to `address` began.
    case connectAttemptStarted(service: String, connectionID: Int, address: SocketAddress)
    /// The attempt completed: the server's SETTINGS arrived.
    case connectAttemptSucceeded(service: String, connectionID: Int, address: SocketAddress)
    /// The attempt failed with `error`; the next one waits `backoff`.
    case connectAttemptFailed(service: String, connectionID: Int, address: SocketAddress, error: Status, backoff: Duration)
    /// A keepalive PING went unanswered for `keepAliveTimeout`; the connection was closed.
    case keepaliveTimeout(service: String, connectionID: Int)
    /// The server sent GOAWAY. `tooManyPings` means it asked us to ping less: keepalive time was doubled.
    case goAwayReceived(service: String, connectionID: Int, errorCode: UInt32, debugData: String, tooManyPings: Bool)
    /// A call started (attempt 1 is the first).
    case callStarted(service: String, path: String, attempt: Int)
    /// A call ended with `status` after `duration`.
    case callFinished(service: String, path: String, status: Status, duration: Duration, attempt: Int)
}
