import GRPCCMReactor
import GRPCCMWire

/// What connections and calls publish on the `EventBus`. Delivered on the reactor thread, in the deferred phase of
/// the turn in which it happened (never inside socket, TLS or nghttp2 processing), in subscription order.
///
/// Payloads reuse strings that already exist (the service name, the call's path, the status), so publishing an
/// event allocates nothing.
public enum ConnectionEvent: Sendable {
    /// A connection changed connectivity state. `reason` says why when it is a failure or a GOAWAY.
    case connectivityStateChanged(
        service: String, connectionID: Int, from: ConnectivityState, to: ConnectivityState, reason: CallStatus?)
    /// A connection attempt to `address` began.
    case connectAttemptStarted(service: String, connectionID: Int, address: NetworkAddress)
    /// The attempt completed: the server's SETTINGS arrived.
    case connectAttemptSucceeded(service: String, connectionID: Int, address: NetworkAddress)
    /// The attempt failed with `error`; the next one waits `backoff`.
    case connectAttemptFailed(service: String, connectionID: Int, address: NetworkAddress, error: CallStatus, backoff: Duration)
    /// The service's name resolved to a new set of addresses (new ones join, gone ones drain).
    case addressesResolved(service: String, addresses: [NetworkAddress])
    /// Resolving the service's name failed (no answer, no address, a timeout); the last good addresses stay in use.
    case resolutionFailed(service: String, error: CallStatus)
    /// Nothing was read for `keepAliveTimeout` after a keepalive PING (no ACK, no other bytes); the connection was
    /// closed.
    case keepaliveTimeout(service: String, connectionID: Int)
    /// The server sent GOAWAY. `tooManyPings` means it asked us to ping less: keepalive time was doubled.
    case goAwayReceived(service: String, connectionID: Int, errorCode: UInt32, debugData: String, tooManyPings: Bool)
    /// The server answered the health Watch of a connection with UNIMPLEMENTED: it has no `grpc.health.v1.Health`
    /// service, so health checking is off for that connection, which takes calls as if it said SERVING (gRFC A17).
    /// Usually a misconfiguration: `healthCheckServiceName` is set for servers that do not serve health.
    case healthCheckUnimplemented(service: String, connectionID: Int)
    /// The TLS files (certificate, key or CA bundle) changed on disk and could not be loaded: connections go on with
    /// the last good ones until the files change again. Published once per change, for the first connection to find
    /// it; a connection that then fails its handshake names it in its error too.
    case tlsFilesRefused(service: String, connectionID: Int, error: CallStatus)
    /// A call started (attempt 1 is the first).
    case callStarted(service: String, path: String, attempt: Int)
    /// One attempt of a call ended with `status` (each retry is another attempt).
    case attemptFinished(service: String, path: String, status: CallStatus, attempt: Int)
    /// The retry handler will send attempt `attempt` after `delay`, because the previous one ended with `status`.
    case retryScheduled(service: String, path: String, attempt: Int, delay: Duration, status: CallStatus)
    /// A call ended with `status` after `duration` and `attempts` attempts (0: ended before any attempt, by the
    /// circuit breaker, an interceptor, an invalid request or a closed channel). `sentBytes`/`receivedBytes` count
    /// message bytes over all attempts.
    case callFinished(
        service: String, path: String, status: CallStatus, duration: Duration, attempts: Int, sentBytes: Int,
        receivedBytes: Int)
    /// The circuit breaker of a service and method changed state (CLOSED, OPEN, HALF_OPEN).
    case circuitBreakerStateChanged(service: String, path: String, from: CircuitBreakerState, to: CircuitBreakerState)
}

extension ConnectionEvent {
    /// One of the events every call raises (as opposed to retries, connection and breaker events).
    var isPerCall: Bool {
        switch self {
        case .callStarted, .attemptFinished, .callFinished: return true
        default: return false
        }
    }
}
