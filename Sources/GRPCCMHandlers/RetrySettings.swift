import GRPCCMWire

/// Retry settings: the policy, per-method overrides and throttling (gRFC A6). `Configuration.retry`.
public struct RetrySettings: Sendable, Hashable {
    /// The policy for every method without an override.
    public var policy = CallRetryPolicy()
    /// Overrides keyed by `/package.Service/Method`, or `package.Service` (or `/package.Service/`) for a whole
    /// service.
    public var perMethod: [String: CallRetryPolicy] = [:]
    /// Token-bucket throttling per target (nil: off). Default maxTokens 10, tokenRatio 0.1.
    public var throttling: RetryThrottling? = RetryThrottling()

    /// Every field at its default.
    public init() {}

    /// The policy that applies to `path`: its own override, its service's, or the default.
    @inline(__always)
    package func policy(for path: String) -> CallRetryPolicy {
        // The common case, no overrides, costs no hashing and no string search per call.
        if self.perMethod.isEmpty { return self.policy }
        return MethodKeys.lookUp(self.perMethod, path: path) ?? self.policy
    }
}
