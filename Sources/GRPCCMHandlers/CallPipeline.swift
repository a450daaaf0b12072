import GRPCCMCalls
import GRPCCMWire
import Logging
import Metrics

/// Which handlers run, and with what settings: taken from the configuration by the layer that builds pipelines.
package struct HandlerSettings: Sendable {
    package var logging: Bool
    package var metrics: Bool
    /// nil: no circuit breaker.
    package var circuitBreaker: CircuitBreakerConfiguration?
    /// nil: no retries by policy. (With retries off but hedging on, a handler that retries nothing holds the
    /// throttle hedging shares: `retriesByPolicy` is false then.)
    package var retry: RetrySettings?
    /// Calls may be retried by policy (the metrics' retry counters are made with the others).
    package var retriesByPolicy: Bool
    /// Connections per state, shared by the metrics handlers of every loop of one manager or channel (each loop
    /// sees only its own connections; the gauges show the sum).
    package let sharedMetrics = SharedMetricsState()

    package init(
        logging: Bool, metrics: Bool, circuitBreaker: CircuitBreakerConfiguration?, retry: RetrySettings?,
        retriesByPolicy: Bool? = nil
    ) {
        self.logging = logging
        self.metrics = metrics
        self.circuitBreaker = circuitBreaker
        self.retry = retry
        self.retriesByPolicy = retriesByPolicy ?? (retry != nil)
    }
}

/// The handlers around every call, in the Go original's order, outermost first: logging, metrics, circuit breaker,
/// retry, then the attempt. Each is its own type, switched on by `Configuration.enable…`; none knows the others.
/// Logging and metrics learn what happens from the `EventBus`. Breaker and retry answer the call's questions at the
/// moment they arise (may this call go out? how did it end? may this attempt be retried?) through the call layer's
/// `CallAdmission` and `RetryAdvisor`, because those answers cannot wait for an event.
///
/// One pipeline serves every channel of a manager (or one standalone channel). Reactor thread only.
///
/// Each handler's subscription holds it strongly: the bus and the pipeline are made and dropped together (one
/// per manager or standalone channel), so the bus keeping its handlers alive costs nothing, and dispatch pays no
/// weak-reference load per event per handler. The breaker, the one handler that publishes, refers back to the bus
/// weakly, so nothing cycles.
package final class CallPipeline: @unchecked Sendable {
    // `@unchecked`: created on any thread, then used only on the reactor thread (handlers subscribe through the
    // bus, whose subscriptions are applied there).
    package let logging: LoggingHandler?
    package let metrics: MetricsHandler?
    package let breaker: CircuitBreakerHandler?
    package let retry: RetryHandler?

    package init(settings: HandlerSettings, bus: LocalEventBus, logger: Logger, metricsFactory: any MetricsFactory) {
        // Subscription order is dispatch order: the outer handlers see each event first.
        self.logging = settings.logging ? LoggingHandler(logger: logger, bus: bus) : nil
        self.metrics = settings.metrics ? MetricsHandler(
                factory: metricsFactory, bus: bus, breaker: settings.circuitBreaker != nil, retry: settings.retriesByPolicy,
                sharedMetrics: settings.sharedMetrics) : nil
        self.breaker = settings.circuitBreaker.map { CircuitBreakerHandler(configuration: $0, bus: bus) }
        self.retry = settings.retry.map { RetryHandler(configuration: $0) }
    }

    /// What every call of the pipeline's channels asks.
    package var policies: CallPolicies {
        CallPolicies(admission: self.breaker, retry: self.retry)
    }

    /// Lets the logging handler name a service's target.
    package func register(service: String, target: String) {
        self.logging?.setTarget(target, for: service)
    }
}
