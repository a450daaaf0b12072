import GRPCCMDiscovery
import GRPCCMHandlers
import GRPCCMPool
import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire

/// Each layer's own settings, taken from the one public `Configuration`: the layers below never see it whole.
extension Configuration {
    var backoffConfiguration: Backoff.Configuration {
        Backoff.Configuration(
            base: self.reconnectBackoff.initial, multiplier: self.reconnectBackoff.multiplier,
            jitter: self.reconnectBackoff.jitter, maximum: self.maxReconnectDelay)
    }

    /// The resolver a channel's pools ask (one per channel; c-ares keeps one channel per loop inside it).
    func makeResolver(for target: Target) throws(ConfigurationError) -> any AddressResolver {
        if case .etcd = target.kind {
            guard let etcd = self.etcd else {
                throw ConfigurationError(field: "etcd", message: "\(target) needs configuration.etcd (where etcd listens)")
            }
            return EtcdResolver(settings: etcd)
        }
        // A numeric address or a Unix path is never looked up (the pools install it as it is): no c-ares channel
        // for it (about 170 bytes a channel).
        if target.numericAddresses != nil { return SystemResolver() }
        switch self.dns.resolver {
        case .system:
            return SystemResolver()
        case .cAres:
            return CAresResolver(
                settings: CAresResolver.Settings(servers: self.dns.servers, timeout: self.dns.timeout, attempts: self.dns.attempts))
        }
    }

    /// One for every channel made from this configuration (its connections only read it).
    var http2ClientSettings: HTTP2ClientSettings {
        self.sharedHTTP2ClientSettings(self.makeHTTP2ClientSettings)
    }

    private func makeHTTP2ClientSettings() -> HTTP2ClientSettings {
        HTTP2ClientSettings(
            connectTimeout: self.minConnectTimeout, keepAliveTime: self.keepAliveTime,
            keepAliveTimeout: self.keepAliveTimeout, keepAlivePermitWithoutStream: self.keepAlivePermitWithoutStream,
            initialStreamWindowSize: self.http2.initialStreamWindowSize,
            connectionWindowSize: self.http2.connectionWindowSize, maxFrameSize: self.http2.maxFrameSize,
            maxHeaderListSize: self.http2.maxHeaderListSize,
            userAgent: self.userAgentPrefix.flatMap { $0.isEmpty ? nil : "\($0) \(GRPCConnectionManagerVersion.userAgent)" }
                ?? GRPCConnectionManagerVersion.userAgent,
            acceptEncoding: self.compression.acceptEncodingHeader)
    }

    /// One for every channel made from this configuration, unless `service` has settings of its own.
    func poolSettings(service: String) -> SharedPoolSettings {
        if self.loadBalancingPolicies[service] != nil || self.healthCheckServiceNames[service] != nil {
            return SharedPoolSettings(self.makePoolSettings(service: service))
        }
        return self.sharedPoolSettings { self.makePoolSettings(service: service) }
    }

    /// What `service`'s pools do: the same for every service but in the per-service tables.
    private func makePoolSettings(service: String) -> PoolSettings {
        var settings = PoolSettings(
            connectionsPerTarget: self.connectionsPerTarget, maxQueuedCalls: self.maxQueuedCalls,
            backoff: self.backoffConfiguration, keepAliveTime: self.keepAliveTime, idleTimeout: self.idleTimeout,
            resolveRetryDelay: self.maxReconnectDelay)
        settings.loadBalancingPolicy = self.loadBalancingPolicies[service] ?? self.loadBalancingPolicy
        settings.connectionAttemptDelay = self.connectionAttemptDelay
        settings.resolutionInterval = self.resolutionInterval
        settings.minimumResolutionInterval = self.minimumResolutionInterval
        settings.healthCheckServiceName = self.healthCheckServiceNames[service] ?? self.healthCheckServiceName
        settings.maxHeaderListSize = self.http2.maxHeaderListSize
        settings.maxConnectionsPerTarget = max(self.maxConnectionsPerTarget ?? self.connectionsPerTarget, self.connectionsPerTarget)
        return settings
    }

    /// A factory handed to the manager or channel is a request for metrics: it records whatever `enableMetrics`
    /// says (the flag chooses only whether the global `MetricsSystem.factory` gets them).
    func handlerSettings(metricsFactoryPassed: Bool) -> HandlerSettings {
        HandlerSettings(
            logging: self.enableLogging, metrics: self.enableMetrics || metricsFactoryPassed,
            circuitBreaker: self.enableCircuitBreaker ? self.circuitBreaker : nil,
            retry: self.enableRetry ? self.retry : self.hedgingThrottleOnly, retriesByPolicy: self.enableRetry)
    }

    /// Retries off but hedging on: a retry handler that retries nothing, for the throttle hedging shares (gRFC A6
    /// throttles hedges whether or not a retry policy exists). nil when there is no hedging or no throttle.
    private var hedgingThrottleOnly: RetrySettings? {
        guard !self.hedging.isEmpty, let throttling = self.retry.throttling else { return nil }
        var settings = RetrySettings()
        settings.policy.maxAttempts = 1
        settings.policy.retryableCodes = []
        settings.throttling = throttling
        return settings
    }
}
