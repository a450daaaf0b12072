import COpenSSL

/// A TLS failure, with OpenSSL's reason.
public enum TLSError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A certificate, key or CA file could not be used.
    case configuration(String)
    /// The handshake or a record failed.
    case protocolFailure(String)
    /// An OpenSSL call failed outright.
    case openSSL(String)

    public var description: String {
        switch self {
        case .configuration(let text), .protocolFailure(let text): return text
        case .openSSL(let call): return "\(call) failed: \(TLSError.lastOpenSSLError() ?? "unknown error")"
        }
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
