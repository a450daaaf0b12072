/// Per-call options.
public struct RequestOptions: Sendable, Hashable {
    /// Deadline of the call, relative to when it starts. nil: none. Sent as `grpc-timeout` and enforced here:
    /// when it passes the stream is reset with CANCEL and the call ends with DEADLINE_EXCEEDED.
    public var timeout: Duration?

    /// Overrides `Configuration.maxMessageSize` for this call's response (nil: the configuration's).
    public var maxReceiveMessageSize: Int?

    /// Wait-for-ready (grpc `doc/wait-for-ready.md`). Off (default): a call made while every connection's last
    /// attempt failed (in its backoff or retrying: gRFC A62's sticky TRANSIENT_FAILURE) fails at once with
    /// UNAVAILABLE and the last connect error. On: it waits for a ready connection until its deadline.
    public var waitForReady: Bool

    /// Compression of this call's request messages (`.identity`: none), over the configuration's
    /// (`Configuration.Compression`). nil: the configuration's.
    public var compression: CallCompression?

    /// Options with these fields; the defaults are no deadline, the configuration's receive limit, fail-fast, and the
    /// configuration's compression.
    public init(
        timeout: Duration? = nil, maxReceiveMessageSize: Int? = nil, waitForReady: Bool = false,
        compression: CallCompression? = nil
    ) {
        self.timeout = timeout
        self.maxReceiveMessageSize = maxReceiveMessageSize
        self.waitForReady = waitForReady
        self.compression = compression
    }
}
