import GRPCCMWire

/// Retry throttling per target (gRFC A6): a token bucket. A failed attempt with a retryable code costs one token,
/// a success gives back `tokenRatio`; retries are allowed only while more than half the tokens are left.
public struct RetryThrottling: Sendable, Hashable {
    /// Default 10; 1...1000.
    public var maxTokens: Int = 10
    /// Default 0.1; 0.001...1000.
    public var tokenRatio: Double = 0.1

    /// Every field at its default.
    public init() {}
}

/// The bucket, in thousandths of a token (as grpc-swift does) so that repeated ratios add up exactly.
package struct RetryThrottle {
    private let maxMilli: Int
    private let ratioMilli: Int
    package private(set) var tokensMilli: Int

    package init(_ configuration: RetryThrottling) {
        self.maxMilli = configuration.maxTokens * 1000
        // To the nearest thousandth, as the ratio is given (gRFC A6: three decimal places): rounding down lost one
        // whenever the product fell just short, 1.001 * 1000 = 1000.999... for one.
        self.ratioMilli = Int((configuration.tokenRatio * 1000).rounded())
        self.tokensMilli = self.maxMilli
    }

    package var retriesAllowed: Bool { self.tokensMilli > self.maxMilli / 2 }

    /// Holds every token it can (as it starts).
    package var isFull: Bool { self.tokensMilli == self.maxMilli }

    package mutating func recordFailure() { self.tokensMilli = max(0, self.tokensMilli - 1000) }

    package mutating func recordSuccess() { self.tokensMilli = min(self.maxMilli, self.tokensMilli + self.ratioMilli) }
}
