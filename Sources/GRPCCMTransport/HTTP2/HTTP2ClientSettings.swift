import GRPCCMReactor

/// What one client connection needs to know, taken from the configuration by the layer that makes connections.
/// A class, immutable: the connector and every connection it makes share one (about 120 bytes a connection less).
package final class HTTP2ClientSettings: Sendable {
    /// Bound on one attempt: TCP connect, TLS and the server's SETTINGS.
    package let connectTimeout: Duration
    /// Keepalive: interval since the last read, and how long a PING may go unanswered (gRFC A8).
    package let keepAliveTime: Duration
    package let keepAliveTimeout: Duration
    package let keepAlivePermitWithoutStream: Bool
    /// SETTINGS we announce.
    package let initialStreamWindowSize: Int
    package let connectionWindowSize: Int
    package let maxFrameSize: Int
    package let maxHeaderListSize: Int
    /// `user-agent`, whole.
    package let userAgent: String
    /// `grpc-accept-encoding` on every request (nil: not sent).
    package let acceptEncoding: String?

    package init(
        connectTimeout: Duration, keepAliveTime: Duration, keepAliveTimeout: Duration, keepAlivePermitWithoutStream: Bool,
        initialStreamWindowSize: Int, connectionWindowSize: Int, maxFrameSize: Int, maxHeaderListSize: Int,
        userAgent: String, acceptEncoding: String? = nil
    ) {
        self.acceptEncoding = acceptEncoding
        self.connectTimeout = connectTimeout
        self.keepAliveTime = keepAliveTime
        self.keepAliveTimeout = keepAliveTimeout
        self.keepAlivePermitWithoutStream = keepAlivePermitWithoutStream
        self.initialStreamWindowSize = initialStreamWindowSize
        self.connectionWindowSize = connectionWindowSize
        self.maxFrameSize = maxFrameSize
        self.maxHeaderListSize = maxHeaderListSize
        self.userAgent = userAgent
    }
}
