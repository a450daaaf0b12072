import GRPCCMCalls
import GRPCCMReactor
import GRPCCMWire
import Logging

/// Structured logs through the user's `Logger` (swift-log), from the bus. A library logs for the operator who asks:
/// calls, retries, connection attempts and failures, state changes, keepalive timeouts, GOAWAYs (too_many_pings
/// included) and circuit breaker transitions at debug (a library logs below the application's levels, and an outage
/// must not flood its logs with one record per retry or reconnect); attempts at trace. Reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class LoggingHandler: @unchecked Sendable {
    // `@unchecked`: the logger is used on the reactor thread only (bus dispatch); the targets are behind a lock.
    private let logger: Logger
    /// The per-call records' levels, read once: the logger is our own copy, and asking its handler on every
    /// event cost more than the rest of the handler (callgrind).
    private let debugEnabled: Bool
    private let traceEnabled: Bool
    /// Service name → target text, for call records. Written when a channel is made (any thread), read on the loop
    /// for debug records only: a lock, not loop confinement.
    private let targetsByService = PThreadLock<[String: String]>([:])

    package func setTarget(_ target: String, for service: String) {
        // Only call records (debug and trace) read it: without them the table is never allocated.
        guard self.debugEnabled else { return }
        self.targetsByService.withLock { $0[service] = target }
    }

    private func target(of service: String) -> String {
        self.targetsByService.withLock { $0[service] ?? "" }
    }

    init(logger: Logger, bus: LocalEventBus) {
        self.logger = logger
        self.debugEnabled = logger.logLevel <= .debug
        self.traceEnabled = logger.logLevel <= .trace
        // Per-call records are debug and trace ones: at info and above, calls need not raise events for us at all.
        bus.subscribe(callEvents: self.debugEnabled || self.traceEnabled) { event in self.log(event) }  // held by the bus: see CallPipeline
    }

    private func log(_ event: ConnectionEvent) {
        switch event {
        case .callStarted(let service, let path, let attempt):
            self.debug(
                "call started",
                metadata: [
                    "grpc.service": "\(service)", "grpc.method": "\(path)", "grpc.target": "\(self.target(of: service))",
                    "grpc.attempt": "\(attempt)",
                ])
        case .callFinished(let service, let path, let status, let duration, let attempts, _, _):
            self.debug(
                "call finished",
                metadata: [
                    "grpc.service": "\(service)", "grpc.method": "\(path)", "grpc.target": "\(self.target(of: service))",
                    "grpc.attempts": "\(attempts)", "grpc.code": "\(status.code)",
                    "grpc.duration_ms": "\(Double(duration.nanoseconds) / 1e6)",
                ])
        case .attemptFinished(let service, let path, let status, let attempt):
            guard self.traceEnabled else { return }
            self.logger.trace(
                "attempt finished",
                metadata: [
                    "grpc.service": "\(service)", "grpc.method": "\(path)", "grpc.attempt": "\(attempt)",
                    "grpc.code": "\(status.code)",
                ])
        case .retryScheduled(let service, let path, let attempt, let delay, let status):
            self.debug(
                "retrying call",
                metadata: [
                    "grpc.service": "\(service)", "grpc.method": "\(path)", "grpc.attempt": "\(attempt)",
                    "grpc.backoff_ms": "\(Double(delay.nanoseconds) / 1e6)", "grpc.code": "\(status.code)",
                    "grpc.message": "\(status.message)",
                ])
        case .connectivityStateChanged(let service, let id, let from, let to, let reason):
            self.debug(
                "connectivity state changed",
                metadata: [
                    "grpc.service": "\(service)", "grpc.connection_id": "\(id)", "grpc.state.old": "\(from)",
                    "grpc.state.new": "\(to)", "grpc.reason": "\(reason?.message ?? "")",
                ])
        case .connectAttemptFailed(let service, let id, let address, let error, let backoff):
            self.debug(
                "connect attempt failed",
                metadata: [
                    "grpc.service": "\(service)", "grpc.connection_id": "\(id)", "grpc.address": "\(address)",
                    "grpc.error": "\(error.message)", "grpc.backoff_ms": "\(Double(backoff.nanoseconds) / 1e6)",
                ])
        case .addressesResolved(let service, let addresses):
            self.debug(
                "name resolved", metadata: ["grpc.service": "\(service)", "grpc.addresses": "\(addresses.map(\.description))"])
        case .resolutionFailed(let service, let error):
            self.debug(
                "name resolution failed; the last good addresses stay in use",
                metadata: ["grpc.service": "\(service)", "grpc.error": "\(error.message)"])
        case .keepaliveTimeout(let service, let id):
            self.debug(
                "keepalive timeout: connection closed",
                metadata: ["grpc.service": "\(service)", "grpc.connection_id": "\(id)"])
        case .tlsFilesRefused(let service, let id, let error):
            self.debug(
                "TLS files could not be reloaded; the last good ones stay in use",
                metadata: ["grpc.service": "\(service)", "grpc.connection_id": "\(id)", "grpc.error": "\(error.message)"])
        case .healthCheckUnimplemented(let service, let id):
            self.debug(
                "health check off for this connection: the server has no grpc.health.v1.Health service (UNIMPLEMENTED)",
                metadata: ["grpc.service": "\(service)", "grpc.connection_id": "\(id)"])
        case .goAwayReceived(let service, let id, let code, let debug, let tooManyPings):
            if tooManyPings {
                self.debug(
                    "server sent GOAWAY too_many_pings: keepalive time doubled for new connections",
                    metadata: ["grpc.service": "\(service)", "grpc.connection_id": "\(id)"])
            } else {
                self.debug(
                    "GOAWAY received",
                    metadata: [
                        "grpc.service": "\(service)", "grpc.connection_id": "\(id)",
                        "grpc.http2_error": "\(HTTP2ErrorCode.name(code))", "grpc.debug": "\(debug)",
                    ])
            }
        case .circuitBreakerStateChanged(let service, let path, let from, let to):
            self.debug(
                "circuit breaker state changed",
                metadata: [
                    "grpc.service": "\(service)", "grpc.method": "\(path)", "grpc.breaker.old": "\(from)",
                    "grpc.breaker.new": "\(to)",
                ])
        case .connectAttemptStarted(let service, let id, let address):
            self.debug(
                "connect attempt started",
                metadata: ["grpc.service": "\(service)", "grpc.connection_id": "\(id)", "grpc.address": "\(address)"])
        case .connectAttemptSucceeded(let service, let id, let address):
            self.debug(
                "connected",
                metadata: ["grpc.service": "\(service)", "grpc.connection_id": "\(id)", "grpc.address": "\(address)"])
        }
    }

    /// A debug record, built only when the logger logs at debug (read once at init: asking the handler per event
    /// cost more than the record).
    private func debug(_ message: @autoclosure () -> Logger.Message, metadata: @autoclosure () -> Logger.Metadata) {
        guard self.debugEnabled else { return }
        self.logger.debug(message(), metadata: metadata())
    }
}
