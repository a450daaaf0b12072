import GRPCCMCalls
import GRPCCMReactor
import GRPCCMWire
import CoreMetrics

/// Metrics through swift-metrics, from the bus. The six metrics of the Go original, with its names, labels and
/// state encodings, plus attempts per call, connect attempts and failures, keepalive timeouts, GOAWAYs and bytes.
///
/// | name | type | labels |
/// | --- | --- | --- |
/// | grpc_client_requests_total | counter | service, method, code |
/// | grpc_client_request_duration_seconds | histogram (timer) | service, method |
/// | grpc_client_connections_active | gauge | service |
/// | grpc_client_connection_state | gauge (0 IDLE … 4 SHUTDOWN) | service, state |
/// | grpc_client_retries_total | counter | service, method |
/// | grpc_client_circuit_breaker_state | gauge (0 closed, 1 open, 2 half-open) | service, method |
/// | grpc_client_attempts_per_call | histogram (recorder) | service, method |
/// | grpc_client_connect_attempts_total, grpc_client_connect_failures_total | counter | service |
/// | grpc_client_keepalive_timeouts_total | counter | service |
/// | grpc_client_goaways_total | counter | service, code |
/// | grpc_client_sent_bytes_total, grpc_client_received_bytes_total | counter | service |
///
/// `code` is the status's proto name (`OK`, `UNAVAILABLE`, …) and `method` the full path (`/pkg.Service/Method`).
/// Metric objects are made once per label set and cached. Reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class MetricsHandler: @unchecked Sendable {
    // `@unchecked`: the caches are touched on the reactor thread only (bus dispatch).
    package static let requestDurationLabel = "grpc_client_request_duration_seconds"

    private let factory: any MetricsFactory
    @exclusivity(unchecked)
    private var counters: [String: CoreMetrics.Counter] = [:]
    @exclusivity(unchecked)
    private var timers: [String: CoreMetrics.Timer] = [:]
    @exclusivity(unchecked)
    private var recorders: [String: Recorder] = [:]
    @exclusivity(unchecked)
    private var gauges: [String: Gauge] = [:]
    @exclusivity(unchecked)
    private var readyConnections: [String: Int] = [:]
    /// The per-call metrics of each service and method, found without building label keys on every call.
    @exclusivity(unchecked)
    private var calls = HotKeyTable<CallKey, CallMetrics>()

    private struct CallKey: Hashable {
        let service: String
        let path: String
    }

    private struct CallMetrics {
        let duration: CoreMetrics.Timer
        let attempts: Recorder
        let sentBytes: CoreMetrics.Counter
        let receivedBytes: CoreMetrics.Counter
        /// grpc_client_requests_total by status code.
        var requests: [CoreMetrics.Counter?] = Array(repeating: nil, count: 17)
    }

    init(factory: any MetricsFactory, bus: LocalEventBus) {
        self.factory = factory
        bus.subscribe(callEvents: true) { event in self.record(event) }  // held by the bus: see CallPipeline
    }

    private func counter(_ label: String, _ dimensions: [(String, String)]) -> CoreMetrics.Counter {
        let key = Self.key(label, dimensions)
        if let counter = self.counters[key] { return counter }
        let counter = CoreMetrics.Counter(label: label, dimensions: dimensions, factory: self.factory)
        self.counters[key] = counter
        return counter
    }

    private func gauge(_ label: String, _ dimensions: [(String, String)]) -> Gauge {
        let key = Self.key(label, dimensions)
        if let gauge = self.gauges[key] { return gauge }
        let gauge = Gauge(label: label, dimensions: dimensions, factory: self.factory)
        self.gauges[key] = gauge
        return gauge
    }

    private func makeCallMetrics(service: String, path: String) -> CallMetrics {
        let dimensions = [("service", service), ("method", path)]
        let timerKey = Self.key(Self.requestDurationLabel, dimensions)
        let timer =
            self.timers[timerKey]
            ?? CoreMetrics.Timer(label: Self.requestDurationLabel, dimensions: dimensions, factory: self.factory)
        self.timers[timerKey] = timer
        let recorderKey = Self.key("grpc_client_attempts_per_call", dimensions)
        let recorder =
            self.recorders[recorderKey]
            ?? Recorder(label: "grpc_client_attempts_per_call", dimensions: dimensions, aggregate: true, factory: self.factory)
        self.recorders[recorderKey] = recorder
        return CallMetrics(
            duration: timer, attempts: recorder,
            sentBytes: self.counter("grpc_client_sent_bytes_total", [("service", service)]),
            receivedBytes: self.counter("grpc_client_received_bytes_total", [("service", service)]))
    }

    private static func key(_ label: String, _ dimensions: [(String, String)]) -> String {
        dimensions.reduce(label) { $0 + "\u{0}" + $1.0 + "=" + $1.1 }
    }

    private func record(_ event: ConnectionEvent) {
        switch event {
        case .callFinished(let service, let path, let status, let duration, let attempts, let sent, let received):
            let slot = self.calls.slot(for: CallKey(service: service, path: path)) {
                self.makeCallMetrics(service: service, path: path)
            }
            let code = status.code.rawValue
            if (0..<17).contains(code) {
                if self.calls[slot].requests[code] == nil {
                    self.calls[slot].requests[code] = self.counter(
                        "grpc_client_requests_total", [("service", service), ("method", path), ("code", status.code.protoName)])
                }
                self.calls[slot].requests[code]!.increment()
            } else {
                self.counter("grpc_client_requests_total", [("service", service), ("method", path), ("code", status.code.protoName)])
                    .increment()
            }
            let metrics = self.calls[slot]
            metrics.duration.recordNanoseconds(duration.nanoseconds)
            metrics.attempts.record(attempts)
            if sent > 0 { metrics.sentBytes.increment(by: sent) }
            if received > 0 { metrics.receivedBytes.increment(by: received) }
        case .retryScheduled(let service, let path, _, _, _):
            self.counter("grpc_client_retries_total", [("service", service), ("method", path)]).increment()
        case .connectivityStateChanged(let service, _, let from, let to, _):
            // The Go original's encoding: the gauge labelled with the state name holds the state's number.
            self.gauge("grpc_client_connection_state", [("service", service), ("state", to.description)])
                .record(to.rawValue)
            var ready = self.readyConnections[service, default: 0]
            if to == .ready { ready += 1 }
            if from == .ready { ready = max(0, ready - 1) }
            self.readyConnections[service] = ready
            self.gauge("grpc_client_connections_active", [("service", service)]).record(ready)
        case .circuitBreakerStateChanged(let service, let path, _, let to):
            self.gauge("grpc_client_circuit_breaker_state", [("service", service), ("method", path)]).record(to.rawValue)
        case .connectAttemptStarted(let service, _, _):
            self.counter("grpc_client_connect_attempts_total", [("service", service)]).increment()
        case .connectAttemptFailed(let service, _, _, _, _):
            self.counter("grpc_client_connect_failures_total", [("service", service)]).increment()
        case .keepaliveTimeout(let service, _):
            self.counter("grpc_client_keepalive_timeouts_total", [("service", service)]).increment()
        case .goAwayReceived(let service, _, let code, _, _):
            self.counter("grpc_client_goaways_total", [("service", service), ("code", HTTP2ErrorCode.name(code))])
                .increment()
        case .callStarted, .attemptFinished, .connectAttemptSucceeded:
            break
        }
    }
}
