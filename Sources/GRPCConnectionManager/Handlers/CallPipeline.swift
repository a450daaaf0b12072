import Logging
import Metrics

/// The handlers around every call, in the Go original's order, outermost first: logging, metrics, circuit breaker,
/// retry, then the attempt. Each is its own type, switched on by `Configuration.enable…`, and learns what happens
/// from the `EventBus`; none knows the others. Breaker and retry also answer one question each at the moment it
/// arises (may this call go out? may this attempt be retried?), because that answer cannot wait for an event.
///
/// One pipeline serves every channel of a manager (or one standalone channel). Reactor thread only.
///
/// Each handler's subscription holds it strongly: the bus and the pipeline are made and dropped together (one
/// per manager or standalone channel), so the bus keeping its handlers alive costs nothing, and dispatch pays no
/// weak-reference load and no exclusivity check per event per handler (callgrind: ~5 % of a call). The breaker,
/// the one handler that publishes, refers back to the bus weakly, so nothing cycles.
final class CallPipeline: @unchecked Sendable {
    // `@unchecked`: created on any thread, then used only on the reactor thread (handlers subscribe through the
    // bus, whose subscriptions are applied there).
    let logging: LoggingHandler?
    let metrics: MetricsHandler?
    let breaker: CircuitBreakerHandler?
    let retry: RetryHandler?

    init(configuration: Configuration, bus: EventBus, logger: Logger, metricsFactory: any MetricsFactory) {
        // Subscription order is dispatch order: the outer handlers see each event first.
        self.logging = configuration.enableLogging ? LoggingHandler(logger: logger, bus: bus) : nil
        self.metrics = configuration.enableMetrics ? MetricsHandler(factory: metricsFactory, bus: bus) : nil
        self.breaker =
            configuration.enableCircuitBreaker
            ? CircuitBreakerHandler(configuration: configuration.circuitBreaker, bus: bus) : nil
        self.retry = configuration.enableRetry ? RetryHandler(configuration: configuration.retry, bus: bus) : nil
    }

    /// Lets the logging handler name a service's target.
    func register(service: String, target: Target) {
        self.logging?.targets[service] = target.description
    }
}

/// Opens and closes a breaker per service and method. Reactor thread only.
final class CircuitBreakerHandler: @unchecked Sendable {
    // `@unchecked`: the breaker table is touched on the reactor thread only (acquire, and bus dispatch).
    private struct Key: Hashable {
        let service: String
        let path: String
    }

    let configuration: CircuitBreakerConfiguration
    private weak var bus: EventBus?
    private var breakers = HotKeyTable<Key, CircuitBreakerStateMachine>()
    /// The breakers' clock (monotonic ns); tests of the handler inject their own.
    var clock: @Sendable () -> UInt64 = { Reactor.clock() }

    init(configuration: CircuitBreakerConfiguration, bus: EventBus) {
        self.configuration = configuration
        self.bus = bus
        bus.subscribe { event in
            guard case .callFinished(let service, let path, let status, let duration, let attempts, _, _) = event,
                attempts > 0
            else { return }
            self.record(service: service, path: path, code: status.code, duration: duration)
        }
    }

    /// May a call to `path` go out now? While open: no, and it fails without touching the network.
    func acquire(service: String, path: String) -> Bool {
        let slot = self.breakers.slot(for: Key(service: service, path: path)) {
            CircuitBreakerStateMachine(configuration: self.configuration)
        }
        let decision = self.breakers[slot].acquire(now: self.clock())
        if let (from, to) = decision.changed {
            self.bus?.publish(.circuitBreakerStateChanged(service: service, path: path, from: from, to: to))
        }
        return decision.permitted
    }

    private func record(service: String, path: String, code: StatusCode, duration: Duration) {
        guard let slot = self.breakers.existingSlot(for: Key(service: service, path: path)) else { return }
        let outcome = self.breakers[slot].classify(code, duration: duration)
        let change = self.breakers[slot].record(outcome, now: self.clock())
        if let (from, to) = change {
            self.bus?.publish(.circuitBreakerStateChanged(service: service, path: path, from: from, to: to))
        }
    }

    func state(service: String, path: String) -> CircuitBreakerState {
        guard let slot = self.breakers.existingSlot(for: Key(service: service, path: path)) else { return .closed }
        return self.breakers[slot].state
    }
}

/// Decides whether a failed attempt is retried, and when (gRFC A6). Reactor thread only.
final class RetryHandler: @unchecked Sendable {
    // `@unchecked`: the throttles are touched on the reactor thread only (decisions and bus dispatch).
    let configuration: Configuration.Retry
    private var throttles = HotKeyTable<String, RetryThrottle>()
    private var generator = SystemRandomNumberGenerator()

    init(configuration: Configuration.Retry, bus: EventBus) {
        self.configuration = configuration
        guard let throttling = configuration.throttling else { return }
        // The throttle learns every attempt's outcome from the bus.
        bus.subscribe { event in
            guard case .attemptFinished(let service, let path, let status, _) = event else { return }
            let slot = self.throttles.slot(for: service) { RetryThrottle(throttling) }
            if status.isOK {
                self.throttles[slot].recordSuccess()
            } else if self.configuration.policy(for: path).retryableCodes.contains(status.code) {
                self.throttles[slot].recordFailure()
            }
        }
    }

    /// The delay before the next attempt, or nil when the call ends here.
    /// - Parameters:
    ///   - attempt: The attempt that just ended (1 = the first).
    ///   - committed: The server sent response headers before the status (A6: no retry then).
    ///   - attemptTimedOut: The attempt's own timeout fired (the only retryable DEADLINE_EXCEEDED).
    ///   - deadline: The call's deadline (0 = none); a retry that could not start before it is not made.
    func retryDelay(
        service: String, path: String, status: Status, trailers: Metadata, attempt: Int, committed: Bool,
        attemptTimedOut: Bool, deadline: UInt64, now: UInt64
    ) -> Duration? {
        let policy = self.configuration.policy(for: path)
        guard attempt < policy.maxAttempts, !committed, policy.retryableCodes.contains(status.code) else { return nil }
        if status.code == .deadlineExceeded && !attemptTimedOut { return nil }
        if let slot = self.throttles.existingSlot(for: service), !self.throttles[slot].retriesAllowed { return nil }
        let delay: Duration
        switch RetryPushback(trailers.values(for: "grpc-retry-pushback-ms")) {
        case .stop: return nil
        case .after(let pushback): delay = pushback
        case .none: delay = policy.backoff(retry: attempt, unit: Double.random(in: 0..<1, using: &self.generator))
        }
        if deadline != 0 && now &+ UInt64(delay.nanoseconds) >= deadline { return nil }
        return delay
    }

    /// The per-attempt timeout for `path`, if any.
    func perAttemptTimeout(path: String) -> Duration? {
        self.configuration.policy(for: path).perAttemptTimeout
    }

    /// Tokens left for `service`, in thousandths (tests).
    func throttleTokens(service: String) -> Int? {
        self.throttles.existingSlot(for: service).map { self.throttles[$0].tokensMilli }
    }
}
