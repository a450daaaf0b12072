import GRPCCMCalls
import GRPCCMWire

/// Decides whether a failed attempt is retried, and when (gRFC A6): the calls' `RetryAdvisor`, with a throttle per
/// service that learns from every attempt before the decision about it. Reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class RetryHandler: RetryAdvisor, @unchecked Sendable {
    // `@unchecked`: the throttles are touched on the reactor thread only.
    package let configuration: RetrySettings
    @exclusivity(unchecked)
    private var throttles = HotKeyTable<String, RetryThrottle>()
    @exclusivity(unchecked)
    private var generator = SystemRandomNumberGenerator()
    /// Throttles below their full count of tokens. While there is none, a success would change nothing (every
    /// throttle is full, and one not made yet would be made full), so it is not looked up: a call's success costs
    /// no lookup of its service, about 60 instructions.
    @exclusivity(unchecked)
    private var throttlesBelowFull = 0

    /// Some policy sets a per-attempt timeout (usually none does: then no call looks its policy up for one).
    private let anyPerAttemptTimeout: Bool

    package init(configuration: RetrySettings) {
        self.configuration = configuration
        self.anyPerAttemptTimeout =
            configuration.policy.perAttemptTimeout != nil
            || configuration.perMethod.values.contains { $0.perAttemptTimeout != nil }
    }

    package func perAttemptTimeout(path: String) -> Duration? {
        guard self.anyPerAttemptTimeout else { return nil }
        return self.configuration.policy(for: path).perAttemptTimeout
    }

    /// The throttle learns every attempt's outcome (as grpc-go: a failure is charged before its retry is decided). A
    /// failure is a retryable code, or any code with the server's "do not retry" pushback (gRFC A6; grpc-go charges
    /// it whatever the code, as a hedged attempt's is here).
    package func attemptEnded(service: String, path: String, status: CallStatus, trailers: CallMetadata) {
        guard let throttling = self.configuration.throttling else { return }
        if status.isOK {
            self.recordSuccess(service: service)
        } else if self.configuration.policy(for: path).retryableCodes.contains(status.code)
            || RetryPushback(trailers.values(for: "grpc-retry-pushback-ms")) == .stop
        {
            self.recordFailure(service: service, throttling)
        }
    }

    private func recordSuccess(service: String) {
        guard self.throttlesBelowFull > 0, let slot = self.throttles.existingSlot(for: service) else { return }
        let wasFull = self.throttles[slot].isFull
        self.throttles[slot].recordSuccess()
        if !wasFull && self.throttles[slot].isFull { self.throttlesBelowFull -= 1 }
    }

    private func recordFailure(service: String, _ throttling: RetryThrottling) {
        let slot = self.throttles.slot(for: service) { RetryThrottle(throttling) }
        let wasFull = self.throttles[slot].isFull
        self.throttles[slot].recordFailure()
        if wasFull && !self.throttles[slot].isFull { self.throttlesBelowFull += 1 }
    }

    package func hedgedAttemptEnded(service: String, succeeded: Bool?) {
        guard let throttling = self.configuration.throttling, let succeeded else { return }
        if succeeded { self.recordSuccess(service: service) } else { self.recordFailure(service: service, throttling) }
    }

    package func hedgingAllowed(service: String) -> Bool {
        guard let slot = self.throttles.existingSlot(for: service) else { return true }
        return self.throttles[slot].retriesAllowed
    }

    package func retryDelay(
        service: String, path: String, status: CallStatus, trailers: CallMetadata, attempt: Int, backoffStep: Int,
        deadline: UInt64, now: UInt64
    ) -> RetryDelay? {
        let policy = self.configuration.policy(for: path)
        guard attempt < policy.maxAttempts, policy.retryableCodes.contains(status.code) else { return nil }
        if let slot = self.throttles.existingSlot(for: service), !self.throttles[slot].retriesAllowed { return nil }
        let delay: RetryDelay
        switch RetryPushback(trailers.values(for: "grpc-retry-pushback-ms")) {
        case .stop: return nil
        case .after(let pushback): delay = RetryDelay(pushback, pushedBack: true)
        case .none:
            let unit = Double.random(in: 0..<1, using: &self.generator)
            delay = RetryDelay(policy.backoff(retry: backoffStep, unit: unit), pushedBack: false)
        }
        if deadline != 0 && now &+ UInt64(delay.delay.nanoseconds) >= deadline { return nil }
        return delay
    }

    /// Tokens left for `service`, in thousandths (tests); nil without throttling. A service whose throttle was never
    /// charged has none made yet: it is full.
    package func throttleTokens(service: String) -> Int? {
        guard let throttling = self.configuration.throttling else { return nil }
        return self.throttles.existingSlot(for: service).map { self.throttles[$0].tokensMilli }
            ?? throttling.maxTokens * 1000
    }
}
