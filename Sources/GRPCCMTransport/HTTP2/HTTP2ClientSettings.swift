import GRPCCMReactor

/// What one client connection needs to know, taken from the configuration by the layer that makes connections.
package struct HTTP2ClientSettings: Sendable {
    /// Bound on one attempt: TCP connect, TLS and the server's SETTINGS.
    package var connectTimeout: Duration
    /// Keepalive: interval since the last read, and how long a PING may go unanswered (gRFC A8).
    package var keepAliveTime: Duration
    package var keepAliveTimeout: Duration
    package var keepAlivePermitWithoutStream: Bool
    /// SETTINGS we announce.
    package var initialStreamWindowSize: Int
    package var connectionWindowSize: Int
    package var maxFrameSize: Int
    package var maxHeaderListSize: Int
    /// `user-agent`, whole.
    package var userAgent: String
    /// `grpc-accept-encoding` on every request (nil: not sent).
    package var acceptEncoding: String?

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
