/// How channels connect and call. Every field has a documented default; `validate()` names the first bad field.
public struct Configuration: Sendable, Hashable {
    /// Largest message sent or received, in bytes. Default 4 MiB (gRPC's receive default; the Go original's README
    /// value). A larger response fails with RESOURCE_EXHAUSTED and the connection is kept.
    public var maxMessageSize: Int = 4 * 1024 * 1024

    /// Longest a connection attempt (TCP connect plus the server's HTTP/2 SETTINGS) may take. Default 10 s (the
    /// Go original's MinConnectTimeout). A server that accepts TCP and never speaks HTTP/2 fails the attempt then.
    public var minConnectTimeout: Duration = .seconds(10)

    /// HTTP/2 settings of each connection.
    public var http2 = HTTP2()

    /// Text put before `grpc-swift-cm/<version>` in the user-agent header (nil: none).
    public var userAgentPrefix: String? = nil

    public init() {}

    /// The defaults above.
    public static var defaults: Configuration { Configuration() }

    /// HTTP/2 flow-control and framing settings.
    public struct HTTP2: Sendable, Hashable {
        /// SETTINGS_INITIAL_WINDOW_SIZE we announce for each stream, in bytes. Default 1 MiB; 65,535...2^31-1.
        public var initialStreamWindowSize: Int = 1 << 20
        /// Receive window of the whole connection, in bytes. Default 8 MiB; at least 65,535.
        public var connectionWindowSize: Int = 8 << 20
        /// SETTINGS_MAX_FRAME_SIZE we accept, in bytes. Default 16 KiB; clamped by RFC 9113 §6.5.2 to 2^14...2^24-1.
        public var maxFrameSize: Int = 1 << 14
        /// SETTINGS_MAX_HEADER_LIST_SIZE we accept, in bytes. Default 16 KiB.
        public var maxHeaderListSize: Int = 16 << 10

        public init() {}
    }

    /// Checks every field.
    /// - Throws: `ConfigurationError` naming the first field that is out of range.
    public func validate() throws(ConfigurationError) {
        if self.maxMessageSize <= 0 {
            throw ConfigurationError(field: "maxMessageSize", message: "must be greater than zero")
        }
        if self.maxMessageSize > Int(Int32.max) {
            throw ConfigurationError(field: "maxMessageSize", message: "must fit the 4-byte gRPC length prefix")
        }
        if self.minConnectTimeout <= .zero {
            throw ConfigurationError(field: "minConnectTimeout", message: "must be greater than zero")
        }
        if !(65_535...Int(Int32.max)).contains(self.http2.initialStreamWindowSize) {
            throw ConfigurationError(field: "http2.initialStreamWindowSize", message: "must be 65535...2147483647")
        }
        if !(65_535...Int(Int32.max)).contains(self.http2.connectionWindowSize) {
            throw ConfigurationError(field: "http2.connectionWindowSize", message: "must be 65535...2147483647")
        }
        if !((1 << 14)...((1 << 24) - 1)).contains(self.http2.maxFrameSize) {
            throw ConfigurationError(field: "http2.maxFrameSize", message: "must be 16384...16777215")
        }
        if self.http2.maxHeaderListSize <= 0 {
            throw ConfigurationError(field: "http2.maxHeaderListSize", message: "must be greater than zero")
        }
        if let prefix = self.userAgentPrefix {
            for byte in prefix.utf8 where byte < 0x20 || byte > 0x7E {
                throw ConfigurationError(field: "userAgentPrefix", message: "must be printable ASCII")
            }
        }
    }
}

/// Per-call options.
public struct CallOptions: Sendable, Hashable {
    /// Deadline of the call, relative to when it starts. nil: none. Sent as `grpc-timeout` and enforced here:
    /// when it passes the stream is reset with CANCEL and the call ends with DEADLINE_EXCEEDED.
    public var timeout: Duration?

    /// Overrides `Configuration.maxMessageSize` for this call's response (nil: the configuration's).
    public var maxReceiveMessageSize: Int?

    public init(timeout: Duration? = nil, maxReceiveMessageSize: Int? = nil) {
        self.timeout = timeout
        self.maxReceiveMessageSize = maxReceiveMessageSize
    }
}

/// What a unary call ended with. `status` is always set; `message` is the response (empty unless OK).
public struct UnaryResponse: Sendable, Hashable {
    /// The call's final status.
    public var status: Status
    /// The response message bytes (empty unless the status is OK).
    public var message: [UInt8]
    /// Response headers (the server's initial metadata).
    public var initialMetadata: Metadata
    /// Trailers (trailing metadata) that came with the status.
    public var trailingMetadata: Metadata

    public init(status: Status, message: [UInt8] = [], initialMetadata: Metadata = [:], trailingMetadata: Metadata = [:]) {
        self.status = status
        self.message = message
        self.initialMetadata = initialMetadata
        self.trailingMetadata = trailingMetadata
    }
}

/// Library version, sent in the user-agent.
public enum GRPCConnectionManagerVersion {
    public static let string = "0.1.0"
    static let userAgent = "grpc-swift-cm/\(GRPCConnectionManagerVersion.string)"
}
