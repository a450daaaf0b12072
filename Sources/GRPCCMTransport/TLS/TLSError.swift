import COpenSSL

/// A TLS failure, with OpenSSL's reason.
public enum TLSError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A certificate, key or CA file could not be used.
    case configuration(String)
    /// The handshake or a record failed.
    case protocolFailure(String)
    /// An OpenSSL call failed outright: which call, and OpenSSL's reason as it was when the call failed.
    case openSSL(String)

    public var description: String {
        switch self {
        case .configuration(let text), .protocolFailure(let text), .openSSL(let text): return text
        }
    }

    /// `call` failed: its error with OpenSSL's reason read now (the error queue is the thread's, and the next
    /// OpenSSL call may clear it: read later, or printed on another thread, it would say something else).
    package static func failed(_ call: String) -> TLSError {
        .openSSL("\(call) failed: \(Self.lastOpenSSLError() ?? "unknown error")")
    }

    package static func lastOpenSSLError() -> String? {
        let code = ERR_peek_last_error()
        guard code != 0 else { return nil }
        if let reason = ERR_reason_error_string(code) { return String(cString: reason) }
        var buffer = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buffer, buffer.count)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
