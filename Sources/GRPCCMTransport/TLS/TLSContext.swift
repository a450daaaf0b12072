import COpenSSL

#if canImport(Glibc)
import Glibc
#endif

/// OpenSSL initialised once, before the first context, without its exit-time cleanup (`OPENSSL_INIT_NO_ATEXIT`).
/// Left to itself OpenSSL registers an atexit handler that frees its global state; a program that exits while a loop
/// thread still lets go of its connections (the CLI on a failed dial, any `exit()` with a channel alive) then had that
/// thread free an SSL_CTX through freed locks: a crash at exit, seen about once in twenty CLI runs under
/// ThreadSanitizer. The process's exit gives the memory back anyway.
private let openSSLInitialised: Bool = {
    OPENSSL_init_ssl(
        UInt64(OPENSSL_INIT_NO_ATEXIT) | UInt64(OPENSSL_INIT_LOAD_SSL_STRINGS) | UInt64(OPENSSL_INIT_LOAD_CRYPTO_STRINGS),
        nil) == 1
}()

/// An SSL_CTX built from a `TLSSettings` (client) or a certificate and key (server). Immutable once built.
package final class TLSContext: @unchecked Sendable {
    // `@unchecked`: the SSL_CTX is configured in init and only read afterwards (SSL_new), which OpenSSL allows
    // from several threads.
    package let context: OpaquePointer
    package let isServer: Bool
    package let verify: Bool

    /// A client context.
    package init(client configuration: TLSSettings) throws(TLSError) {
        _ = openSSLInitialised
        guard let context = SSL_CTX_new(TLS_client_method()) else { throw TLSError.failed("SSL_CTX_new") }
        self.context = context
        self.isServer = false
        self.verify = configuration.verifyCertificate
        _ = copenssl_set_min_proto_version(context, TLS1_2_VERSION)
        // Renegotiation is refused both ways (RFC 9113 §9.2.1 forbids it under HTTP/2 after the preface).
        copenssl_ctx_refuse_renegotiation(context)
        let alpn: [UInt8] = [2, UInt8(ascii: "h"), UInt8(ascii: "2")]
        _ = SSL_CTX_set_alpn_protos(context, alpn, UInt32(alpn.count))
        if configuration.verifyCertificate {
            SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nil)
            switch configuration.trustRoots {
            case .system:
                SSL_CTX_set_default_verify_paths(context)
            case .file(let path):
                guard SSL_CTX_load_verify_locations(context, path, nil) == 1 else {
                    throw Self.loadFailure("CA certificates", path)
                }
            }
            // Every trusted certificate is an anchor, an intermediate CA too (a private PKI whose root stays
            // offline): as Go and curl take a trust file. OpenSSL otherwise wants the chain to end at a self-signed
            // root and refuses "unable to get issuer certificate".
            X509_STORE_set_flags(SSL_CTX_get_cert_store(context), UInt(X509_V_FLAG_PARTIAL_CHAIN))
            // Names are checked against the subjectAltNames only, as Go (since 1.15) and browsers do: OpenSSL would
            // otherwise accept a certificate without a DNS name by its subject's Common Name. No partial wildcards
            // (`f*.example.com`) either (RFC 6125 §7.2 leaves them out).
            X509_VERIFY_PARAM_set_hostflags(
                SSL_CTX_get0_param(context),
                UInt32(X509_CHECK_FLAG_NEVER_CHECK_SUBJECT | X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS))
        } else {
            SSL_CTX_set_verify(context, SSL_VERIFY_NONE, nil)
        }
        if let chain = configuration.certificateChainFile, let key = configuration.privateKeyFile {
            try Self.loadIdentity(context, chain: chain, key: key)
        }
    }

    /// A server context offering h2 through ALPN; with `clientCA`, clients must present a certificate it signed.
    package init(serverCertificateChain chain: String, privateKey key: String, clientCA: String?) throws(TLSError) {
        _ = openSSLInitialised
        guard let context = SSL_CTX_new(TLS_server_method()) else { throw TLSError.failed("SSL_CTX_new") }
        self.context = context
        self.isServer = true
        self.verify = clientCA != nil
        _ = copenssl_set_min_proto_version(context, TLS1_2_VERSION)
        copenssl_ctx_refuse_renegotiation(context)
        copenssl_ctx_select_h2(context)
        try Self.loadIdentity(context, chain: chain, key: key)
        if let clientCA {
            guard SSL_CTX_load_verify_locations(context, clientCA, nil) == 1 else {
                throw Self.loadFailure("client CA", clientCA)
            }
            // As the client side trusts its roots: any certificate in the file is an anchor, an intermediate CA too
            // (Go's servers accept a client whose chain ends there).
            X509_STORE_set_flags(SSL_CTX_get_cert_store(context), UInt(X509_V_FLAG_PARTIAL_CHAIN))
            // The CertificateRequest names the CAs, for clients that choose their certificate by them.
            if let names = SSL_load_client_CA_file(clientCA) { SSL_CTX_set_client_CA_list(context, names) }
            SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
        }
    }

    deinit {
        SSL_CTX_free(self.context)
    }

    /// Whether the context refuses TLS renegotiation (it always does; tests check it).
    package var refusesRenegotiation: Bool { copenssl_ctx_refuses_renegotiation(self.context) != 0 }

    /// Why `path` could not be loaded as `what`: the file system's reason when the file cannot be read (OpenSSL's
    /// own says only "system lib"), else OpenSSL's (not PEM, the wrong kind of object).
    private static func loadFailure(_ what: String, _ path: String) -> TLSError {
        let reason = access(path, R_OK) != 0
            ? String(cString: strerror(errno)) : (TLSError.lastOpenSSLError() ?? "unknown error")
        return TLSError.configuration("cannot load \(what) from \(path): \(reason)")
    }

    /// Whether the PEM file at `path` holds an encrypted key: PKCS#8's "BEGIN ENCRYPTED PRIVATE KEY" or the
    /// traditional format's "Proc-Type: 4,ENCRYPTED" (read from its first 64 KiB).
    private static func isEncryptedPEM(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 65536)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return false }
        let text = String(decoding: bytes[..<count], as: UTF8.self)
        return text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED")
    }

    private static func loadIdentity(_ context: OpaquePointer, chain: String, key: String) throws(TLSError) {
        guard SSL_CTX_use_certificate_chain_file(context, chain) == 1 else {
            throw Self.loadFailure("certificate chain", chain)
        }
        // No passphrase prompt (it would block): an encrypted key is refused, saying so.
        copenssl_ctx_no_passphrase(context)
        guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else {
            if Self.isEncryptedPEM(key) {
                ERR_clear_error()
                throw TLSError.configuration(
                    "cannot load private key from \(key): it is encrypted, and keys with a passphrase are not supported")
            }
            // OpenSSL compares a key with a certificate of its type as it loads it: a key of another pair is refused
            // here, with only "key values mismatch" (the check below is for keys of another type).
            if TLSError.lastOpenSSLError() == "key values mismatch" {
                ERR_clear_error()
                throw Self.mismatch(key: key, chain: chain)
            }
            throw Self.loadFailure("private key", key)
        }
        guard SSL_CTX_check_private_key(context) == 1 else {
            ERR_clear_error()
            throw Self.mismatch(key: key, chain: chain)
        }
    }

    private static func mismatch(key: String, chain: String) -> TLSError {
        TLSError.configuration("private key \(key) does not match the certificate \(chain)")
    }
}
