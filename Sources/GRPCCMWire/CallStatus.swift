/// The outcome of a call: a code and a message. Every call ends with exactly one.
public struct CallStatus: Error, Hashable, Sendable, CustomStringConvertible {
    /// The gRPC status code.
    public var code: StatusCode
    /// The server's `grpc-message` (percent-decoded), or this client's reason for a status it made itself.
    public var message: String

    /// A status with `code` and `message`.
    public init(code: StatusCode, message: String = "") {
        self.code = code
        self.message = message
    }

    /// OK with no message.
    public static let ok = CallStatus(code: .ok)

    /// Whether the code is OK (the message does not matter).
    public var isOK: Bool { self.code == .ok }

    public var description: String {
        self.message.isEmpty ? "\(self.code)" : "\(self.code): \"\(self.message)\""
    }

    /// The gRPC code for an HTTP status when a response carries no `grpc-status` (gRPC's
    /// `doc/http-grpc-status-mapping.md`; 431 follows that document, not grpc-go).
    public static func code(forHTTPStatus status: Int) -> StatusCode {
        switch status {
        case 400: return .internal
        case 401: return .unauthenticated
        case 403: return .permissionDenied
        case 404: return .unimplemented
        case 429, 502, 503, 504: return .unavailable
        case 431: return .internal
        default: return .unknown
        }
    }

    /// The status a client reports when the server resets a stream (PROTOCOL-HTTP2.md "Errors").
    package static func forRSTStream(errorCode: UInt32) -> CallStatus {
        switch errorCode {
        case 0x7: return CallStatus(code: .unavailable, message: "stream refused by the server (REFUSED_STREAM)")
        case 0x8: return CallStatus(code: .cancelled, message: "stream cancelled by the server (RST_STREAM CANCEL)")
        case 0xb: return CallStatus(code: .resourceExhausted, message: "server reset the stream: ENHANCE_YOUR_CALM")
        case 0xc: return CallStatus(code: .permissionDenied, message: "server reset the stream: INADEQUATE_SECURITY")
        default:
            return CallStatus(code: .internal, message: "server reset the stream: \(HTTP2ErrorCode.name(errorCode))")
        }
    }
}

/// HTTP/2 error code names (RFC 9113 §7), for messages.
package enum HTTP2ErrorCode {
    private static let names = [
        "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
        "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
    ]

    /// RFC 9113's name, or the code in hex (for messages).
    package static func name(_ code: UInt32) -> String {
        Int(code) < Self.names.count ? Self.names[Int(code)] : "0x\(String(code, radix: 16))"
    }

    /// RFC 9113's name, or `UNKNOWN` for any other code: a metric label, which a server must not be able to multiply
    /// by sending made-up codes.
    package static func label(_ code: UInt32) -> String {
        Int(code) < Self.names.count ? Self.names[Int(code)] : "UNKNOWN"
    }
}
