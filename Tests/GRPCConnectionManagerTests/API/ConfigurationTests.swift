import Testing

@testable import GRPCCMDiscovery
@testable import GRPCCMPool
@testable import GRPCConnectionManager

/// `Configuration`: its documented defaults, and a value whose copies share their fields until one is changed.
@Suite("Configuration")
struct ConfigurationTests {
    /// Every field's default, as its documentation (and the Go original's, `seed-behaviour.md`) states it.
    @Test func defaults() {
        let c = Configuration()
        #expect(c.maxMessageSize == 4 << 20)
        #expect(c.minConnectTimeout == .seconds(10))
        #expect(c.keepAliveTime == .seconds(30))
        #expect(c.keepAliveTimeout == .seconds(5))
        #expect(c.keepAlivePermitWithoutStream)
        #expect(c.maxReconnectDelay == .seconds(3))
        #expect(c.reconnectBackoff.initial == .milliseconds(100))
        #expect(c.reconnectBackoff.multiplier == 1.6 && c.reconnectBackoff.jitter == 0.2)
        #expect(c.streamBufferSize == 64 << 10)
        #expect(c.idleTimeout == .seconds(30 * 60))
        #expect(c.connectionsPerTarget == 1)
        #expect(c.maxQueuedCalls == 10_000)
        #expect(c.resolutionInterval == .seconds(30))
        #expect(c.minimumResolutionInterval == .seconds(1))
        #expect(c.maxConnectionsPerTarget == nil)
        #expect(c.loadBalancingPolicy == .leastLoaded && c.loadBalancingPolicies.isEmpty)
        #expect(c.connectionAttemptDelay == .milliseconds(250))
        #expect(c.healthCheckServiceName == nil && c.healthCheckServiceNames.isEmpty)
        #expect(c.dns.resolver == .cAres && c.dns.servers == nil)
        #expect(c.dns.timeout == .seconds(5) && c.dns.attempts == 2)
        #expect(c.etcd == nil)
        #expect(c.http2.initialStreamWindowSize == 1 << 20 && c.http2.connectionWindowSize == 8 << 20)
        #expect(c.http2.maxFrameSize == 1 << 14 && c.http2.maxHeaderListSize == 16 << 10)
        #expect(c.tls == nil)
        #expect(c.enableLogging && !c.enableMetrics && c.enableRetry && c.enableCircuitBreaker)
        #expect(c.retry.policy.maxAttempts == 3 && c.retry.policy.initialBackoff == .milliseconds(100))
        #expect(c.retry.policy.backoffMultiplier == 2.0 && c.retry.policy.maxBackoff == .seconds(3))
        #expect(c.retry.policy.retryableCodes == [.unavailable, .deadlineExceeded, .resourceExhausted, .aborted])
        #expect(c.retry.perMethod.isEmpty && c.retry.throttling == RetryThrottling())
        #expect(c.hedging.isEmpty)
        #expect(c.circuitBreaker.failureThreshold == 5 && c.circuitBreaker.successThreshold == 2)
        #expect(c.circuitBreaker.timeout == .seconds(30))
        #expect(c.circuitBreaker.failureCodes == [.unavailable, .deadlineExceeded, .resourceExhausted])
        #expect(c.userAgentPrefix == nil)
        #expect(c.compression.acceptedEncodings == [.gzip, .deflate])
        #expect(c.compression.requestEncoding == .identity && c.compression.requestEncodingPerMethod.isEmpty)
        #expect(Configuration.defaults == c)
    }

    /// Copies share their fields (copy on write): changing one, nested fields included, leaves the others.
    @Test func isAValue() {
        let original = Configuration()
        var changed = original
        changed.http2.maxFrameSize = 1 << 15
        changed.hedging["/a.B/C"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(5))
        changed.compression.requestEncodingPerMethod["/a.B/D"] = .gzip
        changed.tls = TLSSettings()
        #expect(original.http2.maxFrameSize == 1 << 14)
        #expect(original.hedging.isEmpty && original.tls == nil && original.compression.requestEncodingPerMethod.isEmpty)
        #expect(changed.http2.maxFrameSize == 1 << 15 && changed.hedging.count == 1 && changed.tls != nil)
        #expect(original != changed)

        // What a call reads, in place: the hedging policy and the request encoding of its method.
        #expect(changed.hedgingPolicy(forPath: "/a.B/C")?.hedgingDelay == .milliseconds(5))
        #expect(original.hedgingPolicy(forPath: "/a.B/C") == nil)
        #expect(changed.requestEncoding(forPath: "/a.B/D") == .gzip)
        #expect(changed.requestEncoding(forPath: "/a.B/C") == .identity)

        // Equal fields set apart compare and hash equal; one field apart, they differ.
        var again = Configuration()
        again.http2.maxFrameSize = 1 << 15
        again.hedging["/a.B/C"] = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(5))
        again.compression.requestEncodingPerMethod["/a.B/D"] = .gzip
        again.tls = TLSSettings()
        #expect(again == changed && again.hashValue == changed.hashValue)
        again.enableRetry = false
        #expect(again != changed)
        #expect(Configuration() == original && Configuration().hashValue == original.hashValue)
    }

    /// A channel to a numeric address or a Unix path gets no c-ares resolver (nothing is ever looked up); a host
    /// name gets the one `dns.resolver` names.
    @Test func resolverOnlyForNames() throws {
        var configuration = Configuration()
        for text in ["127.0.0.1:50051", "[::1]:443", "unix:/tmp/x.sock"] {
            #expect(try configuration.makeResolver(for: Target(parsing: text)) is SystemResolver, "\(text)")
        }
        #expect(try configuration.makeResolver(for: Target(parsing: "localhost:50051")) is CAresResolver)
        configuration.dns.resolver = .system
        #expect(try configuration.makeResolver(for: Target(parsing: "localhost:50051")) is SystemResolver)
    }

    /// The user-agent is the prefix, a space, then ours; an empty prefix (`health -user-agent=`) is none, not a
    /// leading space.
    @Test func userAgentPrefix() {
        var configuration = Configuration()
        #expect(configuration.http2ClientSettings.userAgent == GRPCConnectionManagerVersion.userAgent)
        configuration.userAgentPrefix = "probe/1"
        #expect(configuration.http2ClientSettings.userAgent == "probe/1 \(GRPCConnectionManagerVersion.userAgent)")
        configuration.userAgentPrefix = ""
        #expect(configuration.http2ClientSettings.userAgent == GRPCConnectionManagerVersion.userAgent)
    }

    /// Printed, a configuration shows its fields (not the storage that holds them).
    @Test func printsItsFields() {
        var configuration = Configuration()
        configuration.maxQueuedCalls = 77
        let text = String(describing: configuration)
        #expect(text.contains("maxQueuedCalls: 77"), "\(text)")
        #expect(text.contains("keepAliveTime") && !text.contains("Storage"), "\(text)")
        #expect(Mirror(reflecting: configuration).children.count == 32)
    }
}
