import COpenSSL

#if canImport(Glibc)
import Glibc
#endif

/// One TLS session over memory BIOs, driven by the reactor without blocking (nghttp2 `examples/client.c`'s
/// `want_io`, without its blocking handshake): ciphertext from the socket goes in with `feed`, plaintext comes out
/// of `readPlaintext`; plaintext to send goes in with `writePlaintext`, ciphertext for the socket comes out of
/// `drainCiphertext`. WANT_READ/WANT_WRITE are never errors here: more bytes simply have to arrive.
///
/// Reactor thread only.
package final class TLSSession {
    package enum HandshakeResult: Equatable {
        case inProgress
        case done
        case failed(String)
    }

    private let ssl: OpaquePointer
    private let readBIO: OpaquePointer
    private let writeBIO: OpaquePointer
    package private(set) var handshakeDone = false

    /// A client session for `context`, with SNI and hostname verification for `serverName`.
    package init(context: TLSContext, serverName: String?, verifyName: String?) throws(TLSError) {
        guard let ssl = SSL_new(context.context) else { throw TLSError.openSSL("SSL_new") }
        guard let rbio = BIO_new(BIO_s_mem()), let wbio = BIO_new(BIO_s_mem()) else {
            SSL_free(ssl)
            throw TLSError.openSSL("BIO_new")
        }
        SSL_set_bio(ssl, rbio, wbio)  // the SSL owns both BIOs now
        self.ssl = ssl
        self.readBIO = rbio
        self.writeBIO = wbio
        if context.isServer {
            SSL_set_accept_state(ssl)
            return
        }
        SSL_set_connect_state(ssl)
        if let serverName, !serverName.isEmpty, SocketAddress(ip: serverName, port: 0) == nil {
            _ = copenssl_set_tlsext_host_name(ssl, serverName)
        }
        if context.verify, let name = verifyName, !name.isEmpty {
            if SocketAddress(ip: name, port: 0) != nil {
                let param = SSL_get0_param(ssl)
                X509_VERIFY_PARAM_set1_ip_asc(param, name)
            } else {
                SSL_set1_host(ssl, name)
            }
        }
    }

    deinit {
        SSL_free(self.ssl)
    }

    /// Steps the handshake. Call after `feed` and at the start.
    package func handshake() -> HandshakeResult {
        if self.handshakeDone { return .done }
        ERR_clear_error()
        let rc = SSL_do_handshake(self.ssl)
        if rc == 1 {
            self.handshakeDone = true
            return .done
        }
        let error = SSL_get_error(self.ssl, rc)
        if error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE { return .inProgress }
        return .failed(self.describeFailure(error))
    }

    /// The protocol ALPN selected ("" when none).
    package var negotiatedProtocol: String {
        var data: UnsafePointer<UInt8>? = nil
        var length: UInt32 = 0
        SSL_get0_alpn_selected(self.ssl, &data, &length)
        guard let data, length > 0 else { return "" }
        return String(decoding: UnsafeBufferPointer(start: data, count: Int(length)), as: UTF8.self)
    }

    /// Ciphertext from the socket.
    package func feed(_ bytes: UnsafeRawBufferPointer) {
        var offset = 0
        while offset < bytes.count {
            let n = BIO_write(self.readBIO, bytes.baseAddress! + offset, Int32(bytes.count - offset))
            if n <= 0 { return }
            offset += Int(n)
        }
    }

    /// Decrypts into `buffer`. Returns bytes read, 0 when no complete record is buffered, -1 on a clean
    /// close_notify, or throws with OpenSSL's reason.
    package func readPlaintext(into buffer: UnsafeMutableRawBufferPointer) throws(TLSError) -> Int {
        ERR_clear_error()
        let n = SSL_read(self.ssl, buffer.baseAddress, Int32(buffer.count))
        if n > 0 { return Int(n) }
        let error = SSL_get_error(self.ssl, n)
        switch error {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE: return 0
        case SSL_ERROR_ZERO_RETURN: return -1
        default: throw TLSError.protocolFailure(self.describeFailure(error))
        }
    }

    /// Encrypts plaintext (memory BIOs never block, so everything is taken).
    package func writePlaintext(_ bytes: UnsafeRawBufferPointer) throws(TLSError) {
        var offset = 0
        while offset < bytes.count {
            ERR_clear_error()
            let n = SSL_write(self.ssl, bytes.baseAddress! + offset, Int32(min(bytes.count - offset, 1 << 20)))
            if n <= 0 { throw TLSError.protocolFailure(self.describeFailure(SSL_get_error(self.ssl, n))) }
            offset += Int(n)
        }
    }

    /// Moves pending ciphertext into `out`.
    package func drainCiphertext(into out: inout [UInt8]) {
        while BIO_ctrl_pending(self.writeBIO) > 0 {
            let pending = Int(BIO_ctrl_pending(self.writeBIO))
            let start = out.count
            out.append(contentsOf: repeatElement(0, count: pending))
            let n = out.withUnsafeMutableBytes { BIO_read(self.writeBIO, $0.baseAddress! + start, Int32(pending)) }
            if n <= 0 {
                out.removeSubrange(start...)
                return
            }
            if Int(n) < pending { out.removeSubrange((start + Int(n))...) }
        }
    }

    /// Queues close_notify (drain the ciphertext afterwards).
    package func shutdown() {
        ERR_clear_error()
        _ = SSL_shutdown(self.ssl)
    }

    /// OpenSSL's reason, made readable ("certificate verify failed: hostname mismatch").
    private func describeFailure(_ error: Int32) -> String {
        let verify = SSL_get_verify_result(self.ssl)
        var reason = TLSError.lastOpenSSLError() ?? "TLS error \(error)"
        if verify != X509_V_OK {
            reason = "certificate verify failed: \(String(cString: X509_verify_cert_error_string(verify)))"
        }
        ERR_clear_error()
        return reason
    }
}

/// An SSL_CTX built from a `TLSConfiguration` (client) or a certificate and key (server). Immutable once built.
package final class TLSContext: @unchecked Sendable {
    // `@unchecked`: the SSL_CTX is configured in init and only read afterwards (SSL_new), which OpenSSL allows
    // from several threads.
    let context: OpaquePointer
    let isServer: Bool
    let verify: Bool

    /// A client context.
    init(client configuration: TLSConfiguration) throws(TLSError) {
        guard let context = SSL_CTX_new(TLS_client_method()) else { throw TLSError.openSSL("SSL_CTX_new") }
        self.context = context
        self.isServer = false
        self.verify = configuration.verifyCertificate
        _ = copenssl_set_min_proto_version(context, TLS1_2_VERSION)
        let alpn: [UInt8] = [2, UInt8(ascii: "h"), UInt8(ascii: "2")]
        _ = SSL_CTX_set_alpn_protos(context, alpn, UInt32(alpn.count))
        if configuration.verifyCertificate {
            SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nil)
            switch configuration.trustRoots {
            case .system:
                SSL_CTX_set_default_verify_paths(context)
            case .file(let path):
                guard SSL_CTX_load_verify_locations(context, path, nil) == 1 else {
                    throw TLSError.configuration("cannot load CA certificates from \(path): \(TLSError.lastOpenSSLError() ?? "unknown error")")
                }
            }
        } else {
            SSL_CTX_set_verify(context, SSL_VERIFY_NONE, nil)
        }
        if let chain = configuration.certificateChainFile, let key = configuration.privateKeyFile {
            try Self.loadIdentity(context, chain: chain, key: key)
        }
    }

    /// A server context offering h2 through ALPN; with `clientCA`, clients must present a certificate it signed.
    package init(serverCertificateChain chain: String, privateKey key: String, clientCA: String?) throws(TLSError) {
        guard let context = SSL_CTX_new(TLS_server_method()) else { throw TLSError.openSSL("SSL_CTX_new") }
        self.context = context
        self.isServer = true
        self.verify = clientCA != nil
        _ = copenssl_set_min_proto_version(context, TLS1_2_VERSION)
        copenssl_ctx_select_h2(context)
        try Self.loadIdentity(context, chain: chain, key: key)
        if let clientCA {
            guard SSL_CTX_load_verify_locations(context, clientCA, nil) == 1 else {
                throw TLSError.configuration("cannot load client CA from \(clientCA): \(TLSError.lastOpenSSLError() ?? "unknown error")")
            }
            SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
        }
    }

    deinit {
        SSL_CTX_free(self.context)
    }

    private static func loadIdentity(_ context: OpaquePointer, chain: String, key: String) throws(TLSError) {
        guard SSL_CTX_use_certificate_chain_file(context, chain) == 1 else {
            throw TLSError.configuration("cannot load certificate chain \(chain): \(TLSError.lastOpenSSLError() ?? "unknown error")")
        }
        guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else {
            throw TLSError.configuration("cannot load private key \(key): \(TLSError.lastOpenSSLError() ?? "unknown error")")
        }
        guard SSL_CTX_check_private_key(context) == 1 else {
            throw TLSError.configuration("private key \(key) does not match the certificate \(chain)")
        }
    }
}

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

    static func lastOpenSSLError() -> String? {
        let code = ERR_peek_last_error()
        guard code != 0 else { return nil }
        if let reason = ERR_reason_error_string(code) { return String(cString: reason) }
        var buffer = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buffer, buffer.count)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
