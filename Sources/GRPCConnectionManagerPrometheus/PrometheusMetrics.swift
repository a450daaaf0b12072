import GRPCConnectionManager
import Metrics
import Prometheus

/// A swift-metrics factory backed by a swift-prometheus registry, with histogram buckets for
/// `grpc_client_request_duration_seconds` from 25 µs to 10 s. Pass it to `ConnectionManager(metricsFactory:)` and serve
/// `manager.metricsText()` (or `exposition()`) on your `/metrics` endpoint.
public struct PrometheusMetrics: MetricsFactory, MetricsTextExporting, Sendable {
    /// The registry the metrics live in (share it with the rest of your application if you like). Another
    /// swift-prometheus factory over the same registry that makes `grpc_client_request_duration_seconds` or
    /// `grpc_client_attempts_per_call` (say, a bootstrapped `MetricsSystem` used by a manager with `enableMetrics`)
    /// must give them the same buckets (`requestDurationBuckets`, `attemptsBuckets`): swift-prometheus stops the
    /// process on a bucket mismatch. Simplest: pass this one factory to every manager.
    public let registry: PrometheusCollectorRegistry
    private let factory: PrometheusMetricsFactory

    /// Request-duration buckets, in seconds: the Go original's (1 ms to 10 s) with six more below them, because a
    /// call on a fast network takes 50 to 100 µs and would otherwise land in the first bucket whatever it cost.
    public static let requestDurationBuckets: [Double] = [
        0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075,
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]

    /// Attempts-per-call buckets.
    public static let attemptsBuckets: [Double] = [1, 2, 3, 4, 5, 10]

    /// Creates a factory over `registry` (a new one by default).
    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets["grpc_client_request_duration_seconds"] = Self.requestDurationBuckets.map {
            Duration.nanoseconds(Int64(($0 * 1e9).rounded()))
        }
        factory.valueHistogramBuckets["grpc_client_attempts_per_call"] = Self.attemptsBuckets
        self.factory = factory
    }

    /// The Prometheus text exposition of every metric in the registry.
    public func exposition() -> String {
        self.registry.emitToString()
    }

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        self.factory.makeCounter(label: label, dimensions: dimensions)
    }

    public func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        self.factory.makeFloatingPointCounter(label: label, dimensions: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        self.factory.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        self.factory.makeMeter(label: label, dimensions: dimensions)
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        self.factory.makeTimer(label: label, dimensions: dimensions)
    }

    public func destroyCounter(_ handler: any CounterHandler) { self.factory.destroyCounter(handler) }
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {
        self.factory.destroyFloatingPointCounter(handler)
    }
    public func destroyRecorder(_ handler: any RecorderHandler) { self.factory.destroyRecorder(handler) }
    public func destroyMeter(_ handler: any MeterHandler) { self.factory.destroyMeter(handler) }
    public func destroyTimer(_ handler: any TimerHandler) { self.factory.destroyTimer(handler) }
}
