import GRPCCMCalls
import GRPCCMReactor
import GRPCCMWire
import CoreMetrics

/// Metrics through swift-metrics, from the bus. The six metrics of the Go original, with its names and labels, plus
/// attempts per call, connect attempts and failures, keepalive timeouts, GOAWAYs and bytes.
///
/// Every series a call touches exists from the first call of its method: the retry counter at 0 and the breaker
/// gauge at 0 (closed) when those handlers are on, so that a dashboard or an alert sees them before anything fails.
///
/// Departure from the Go original: `grpc_client_connection_state{state=…}` holds how many of the service's
/// connections are in that state now (IDLE, CONNECTING, READY, TRANSIENT_FAILURE), one series per state, all four
/// from the service's first state change. The Go original set the series of the state last entered to the state's
/// number (0 to 4) and never cleared the others, which nobody can alert on.
///
/// | name | type | labels |
/// | --- | --- | --- |
/// | grpc_client_requests_total | counter | service, method, code |
/// | grpc_client_request_duration_seconds | histogram (timer) | service, method |
/// | grpc_client_connections_active | gauge | service |
/// | grpc_client_connection_state | gauge (connections in the state now) | service, state |
/// | grpc_client_retries_total | counter | service, method |
/// | grpc_client_circuit_breaker_state | gauge (0 closed, 1 open, 2 half-open) | service, method |
/// | grpc_client_attempts_per_call | histogram (recorder) | service, method |
/// | grpc_client_connect_attempts_total, grpc_client_connect_failures_total | counter | service |
/// | grpc_client_keepalive_timeouts_total | counter | service |
/// | grpc_client_health_check_unimplemented_total | counter | service |
/// | grpc_client_tls_reload_failures_total | counter | service |
/// | grpc_client_goaways_total | counter | service, code |
/// | grpc_client_resolution_failures_total | counter (failed lookups; a DNS answer with no address is one) | service |
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
    /// Whether the breaker and retry handlers run: their series are made at 0 on a method's first call.
    private let breakerEnabled: Bool
    private let retryEnabled: Bool
    @exclusivity(unchecked)
    private var counters: [String: CoreMetrics.Counter] = [:]
    @exclusivity(unchecked)
    private var timers: [String: CoreMetrics.Timer] = [:]
    @exclusivity(unchecked)
    private var recorders: [String: Recorder] = [:]
    @exclusivity(unchecked)
    private var gauges: [String: Gauge] = [:]
    private let sharedMetrics: SharedMetricsState
    /// The per-call metrics of each service and method, found without building label keys on every call.
    @exclusivity(unchecked)
    private var calls = HotKeyTable<CallKey, CallMetrics>()

    private struct CallKey: Hashable {
        let service: String
        let path: String
    }

    private struct CallMetrics {
        /// The `method` label: the path, or `otherMethods` past `maxMethodSeries`.
        let method: String
        let duration: CoreMetrics.Timer
        let attempts: Recorder
        let sentBytes: CoreMetrics.Counter
        let receivedBytes: CoreMetrics.Counter
        /// grpc_client_retries_total (retries by policy; hedges show in attempts_per_call): made with the others
        /// when retries are on, else never (a retry is only scheduled when they are).
        var retries: CoreMetrics.Counter?
        /// grpc_client_requests_total by status code.
        var requests: [CoreMetrics.Counter?] = Array(repeating: nil, count: 17)
    }

    init(factory: any MetricsFactory, bus: LocalEventBus, breaker: Bool, retry: Bool, sharedMetrics: SharedMetricsState) {
        self.sharedMetrics = sharedMetrics
        self.factory = factory
        self.breakerEnabled = breaker
        self.retryEnabled = retry
        bus.subscribe(callEvents: true) { event in self.record(event) }  // held by the bus: see CallPipeline
    }

    private func counter(_ label: String, _ dimensions: [(String, String)]) -> CoreMetrics.Counter {
        Self.cached(&self.counters, label, dimensions) {
            CoreMetrics.Counter(label: label, dimensions: dimensions, factory: self.factory)
        }
    }

    /// One `Meter` per series for all the manager's loops (`SharedMetricsState`): a backend without meters of its own
    /// (swift-metrics' `AccumulatingMeter`) keeps the total in the meter object, so one per loop would overwrite each
    /// other.
    private func meter(_ label: String, _ dimensions: [(String, String)]) -> Meter {
        self.sharedMetrics.meter(Self.key(label, dimensions)) {
            Meter(label: label, dimensions: dimensions, factory: self.factory)
        }
    }

    private func gauge(_ label: String, _ dimensions: [(String, String)]) -> Gauge {
        Self.cached(&self.gauges, label, dimensions) { Gauge(label: label, dimensions: dimensions, factory: self.factory) }
    }

    /// The metric object of `label` and `dimensions` in `table`, made once.
    private static func cached<Metric>(
        _ table: inout [String: Metric], _ label: String, _ dimensions: [(String, String)], make: () -> Metric
    ) -> Metric {
        let key = Self.key(label, dimensions)
        if let metric = table[key] { return metric }
        let metric = make()
        table[key] = metric
        return metric
    }

    /// Series of their own for this many methods; later ones, and longer paths, are counted under method="other"
    /// (`MethodPathLimits`, the breakers' rules too).
    static let maxMethodSeries = MethodPathLimits.trackedMethods
    static let otherMethods = MethodPathLimits.other

    /// The slot of `service` and `path`: the last one asked for, found in place, or `callSlot`.
    private func slot(service: String, path: String) -> Int {
        self.calls.lastSlot { $0.service == service && $0.path == path } ?? self.callSlot(service: service, path: path)
    }

    /// What a method not in the table yet is named: itself while there is room, else `otherMethods`.
    private func labelForNewMethod(_ path: String) -> String {
        self.calls.count < Self.maxMethodSeries ? path : Self.otherMethods
    }

    private func callSlot(service: String, path: String) -> Int {
        // A path the channel refused (not a method path: the call never left) is counted with the overflow: made-up
        // paths must not become labels, nor take the room of the methods that come later.
        let path = MethodPath.isValid(path) ? MethodPathLimits.tracked(path) : Self.otherMethods
        // Made for `path`, or (the table full, `path` new) for the overflow key, which is then what it is named.
        let label = self.labelForNewMethod(path)
        return self.calls.slot(
            for: CallKey(service: service, path: path), limit: Self.maxMethodSeries,
            overflow: CallKey(service: service, path: Self.otherMethods)
        ) {
            self.makeCallMetrics(service: service, path: label)
        }
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
        if self.breakerEnabled {
            // This loop's breaker of the method starts closed; the series shows the worst of all loops'.
            self.breakerReported(.closed, breaker: path, dimensions: dimensions, onlyIfNew: true)
        }
        return CallMetrics(
            method: path, duration: timer, attempts: recorder,
            sentBytes: self.counter("grpc_client_sent_bytes_total", [("service", service)]),
            receivedBytes: self.counter("grpc_client_received_bytes_total", [("service", service)]),
            retries: self.retryEnabled ? self.counter("grpc_client_retries_total", dimensions) : nil)
    }

    /// One connection left `from` for `to`: both states' series change by one. A connection is first seen leaving
    /// IDLE (subchannels start there without an event), so a state never goes below zero; SHUTDOWN is not a state a
    /// connection stays in, so it has no series. The series move by this manager's change (a `Meter`'s increment),
    /// never to its count: managers that share a metrics factory and a service name add up in the same series
    /// instead of overwriting each other.
    private func connectionMoved(service: String, from: ConnectivityState, to: ConnectivityState) {
        let (changes, firstSight) = self.sharedMetrics.move(service: service, from: from, to: to)
        for (index, state) in SharedMetricsState.states.enumerated() where firstSight || changes[index] != 0 {
            // Made at 0 on the service's first change, so that every state has a series.
            Self.move(self.meter("grpc_client_connection_state", [("service", service), ("state", state.description)]), by: changes[index])
        }
        if firstSight || changes[2] != 0 {
            Self.move(self.meter("grpc_client_connections_active", [("service", service)]), by: changes[2])
        }
    }

    /// swift-metrics meters take only positive amounts: a fall is a decrement.
    private static func move(_ meter: Meter, by change: Int) {
        if change > 0 { meter.increment(by: Double(change)) } else if change < 0 { meter.decrement(by: Double(-change)) }
    }

    /// The breaker of `breaker` (a path, or the breakers' overflow) on this loop is in `state`: the series of
    /// `dimensions` shows the worst state of the breakers it covers, on every loop of the manager (open, then
    /// half-open, then closed): one method's on each loop, or, under `method="other"`, every breaker of a method
    /// counted there. `onlyIfNew`: only when this breaker has reported nothing yet.
    private func breakerReported(
        _ state: CircuitBreakerState, breaker: String, dimensions: [(String, String)], onlyIfNew: Bool = false
    ) {
        let gauge = self.gauge("grpc_client_circuit_breaker_state", dimensions)
        self.sharedMetrics.breaker(
            Self.key("grpc_client_circuit_breaker_state", dimensions),
            holder: SharedMetricsState.BreakerHolder(loop: ObjectIdentifier(self), breaker: breaker), is: state,
            onlyIfNew: onlyIfNew
        ) { worst in gauge.record(worst.rawValue) }
    }

    private static func key(_ label: String, _ dimensions: [(String, String)]) -> String {
        dimensions.reduce(label) { $0 + "\u{0}" + $1.0 + "=" + $1.1 }
    }

    private func record(_ event: ConnectionEvent) {
        switch event {
        case .callFinished(let service, let path, let status, let duration, let attempts, let sent, let received):
            let slot = self.slot(service: service, path: path)
            let code = status.code.rawValue
            if (0..<17).contains(code) {
                if self.calls[slot].requests[code] == nil {
                    self.calls[slot].requests[code] = self.counter(
                        "grpc_client_requests_total",
                        [("service", service), ("method", self.calls[slot].method), ("code", status.code.protoName)])
                }
                self.calls[slot].requests[code]!.increment()
            } else {
                self.counter(
                    "grpc_client_requests_total",
                    [("service", service), ("method", self.calls[slot].method), ("code", status.code.protoName)]
                ).increment()
            }
            let metrics = self.calls[slot]
            metrics.duration.recordNanoseconds(duration.nanoseconds)
            metrics.attempts.record(attempts)
            if sent > 0 { metrics.sentBytes.increment(by: sent) }
            if received > 0 { metrics.receivedBytes.increment(by: received) }
        case .retryScheduled(let service, let path, _, _, _):
            // The method's counter, kept with its metrics: a retry storm looks up no label key per retry.
            let slot = self.slot(service: service, path: path)
            if self.calls[slot].retries == nil {
                self.calls[slot].retries = self.counter(
                    "grpc_client_retries_total", [("service", service), ("method", self.calls[slot].method)])
            }
            self.calls[slot].retries!.increment()
        case .connectivityStateChanged(let service, _, let from, let to, _):
            self.connectionMoved(service: service, from: from, to: to)
        case .circuitBreakerStateChanged(let service, let path, _, let to):
            // The series of the method's metrics (its own, or "other" past the limit); `path` is the breaker's.
            let slot = self.slot(service: service, path: path)
            self.breakerReported(
                to, breaker: path, dimensions: [("service", service), ("method", self.calls[slot].method)])
        case .connectAttemptStarted(let service, _, _):
            self.counter("grpc_client_connect_attempts_total", [("service", service)]).increment()
        case .connectAttemptFailed(let service, _, _, _, _):
            self.counter("grpc_client_connect_failures_total", [("service", service)]).increment()
        case .keepaliveTimeout(let service, _):
            self.counter("grpc_client_keepalive_timeouts_total", [("service", service)]).increment()
        case .healthCheckUnimplemented(let service, _):
            self.counter("grpc_client_health_check_unimplemented_total", [("service", service)]).increment()
        case .tlsFilesRefused(let service, _, _):
            self.counter("grpc_client_tls_reload_failures_total", [("service", service)]).increment()
        case .goAwayReceived(let service, _, let code, _, _):
            self.counter("grpc_client_goaways_total", [("service", service), ("code", HTTP2ErrorCode.label(code))])
                .increment()
        case .resolutionFailed(let service, _):
            self.counter("grpc_client_resolution_failures_total", [("service", service)]).increment()
        case .callStarted, .attemptFinished, .connectAttemptSucceeded, .addressesResolved:
            break
        }
    }
}

/// What the metrics handlers of every loop of one manager (or standalone channel) share: how many connections of each
/// service are in each live state, and each loop's state of each breaker. Subchannels start IDLE without an event,
/// so one is counted from its first change, and IDLE holds the connections that went idle after connecting: a count
/// never goes below zero, but while a never-connected subchannel leaves IDLE, one idle connection may go uncounted
/// until the next change (the events carry a connection attempt's id, not the subchannel's). SHUTDOWN is not a state
/// a connection stays in, so it is not counted. State changes are rare: a lock is cheap.
package final class SharedMetricsState: Sendable {
    static let states: [ConnectivityState] = [.idle, .connecting, .ready, .transientFailure]
    private struct Counts {
        var byService: [String: [Int]] = [:]
        /// Per breaker series, the state each breaker it covers reported (on each loop).
        var breakers: [String: [BreakerHolder: CircuitBreakerState]] = [:]
        /// The connection series' meters, one per series for every loop.
        var meters: [String: Meter] = [:]
    }
    private let counts = PThreadLock<Counts>(Counts())

    package init() {}

    /// Moves one connection of `service`. Returns how each state's count changed (in `states` order; the clamp at zero
    /// can make a change 0) and whether this was the service's first move.
    func move(service: String, from: ConnectivityState, to: ConnectivityState) -> (changes: [Int], firstSight: Bool) {
        self.counts.withLock { all in
            let firstSight = all.byService[service] == nil
            let before = all.byService[service] ?? Array(repeating: 0, count: Self.states.count)
            var after = before
            if let index = Self.states.firstIndex(of: from) { after[index] = max(0, after[index] - 1) }
            if let index = Self.states.firstIndex(of: to) { after[index] += 1 }
            all.byService[service] = after
            return (zip(after, before).map { $0 - $1 }, firstSight)
        }
    }

    /// The meter of the series `key`, made by `make` the first time any loop asks.
    func meter(_ key: String, make: () -> Meter) -> Meter {
        self.counts.withLock { all in
            if let meter = all.meters[key] { return meter }
            let meter = make()
            all.meters[key] = meter
            return meter
        }
    }

    /// A breaker a series covers: one loop's (its metrics handler), of one method or of the methods past the limit.
    struct BreakerHolder: Hashable {
        let loop: ObjectIdentifier
        let breaker: String
    }

    /// `holder`'s breaker of the series `key` is in `state` (with `onlyIfNew`: unless it reported one before).
    /// `record` gets the worst state of all holders, under the lock, so that two loops never publish out of order.
    func breaker(
        _ key: String, holder: BreakerHolder, is state: CircuitBreakerState, onlyIfNew: Bool,
        record: (CircuitBreakerState) -> Void
    ) {
        self.counts.withLock { all in
            if onlyIfNew && all.breakers[key]?[holder] != nil { return }
            all.breakers[key, default: [:]][holder] = state
            let states = all.breakers[key]!.values
            record(states.contains(.open) ? .open : states.contains(.halfOpen) ? .halfOpen : .closed)
        }
    }
}
