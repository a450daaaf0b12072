import COpenSSL
import GRPCCMReactor

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
    private var readBIO: OpaquePointer
    private var writeBIO: OpaquePointer
    package private(set) var handshakeDone = false
    /// A server session (it waits for the ClientHello) rather than a client one.
    package let isServer: Bool

    /// A session for `context`: a server session waits for the ClientHello; a client session sends SNI for
    /// `serverName` and, when the context verifies, checks the certificate against `verifyName` (a DNS name, or an IP
    /// address matched against the certificate's IP subjectAltNames).
    /// - Throws: `TLSError` when OpenSSL refuses the session or the name check cannot be set up (a verified client
    ///   session without a name is refused too: it would accept any certificate the CA signed).
    package init(context: TLSContext, serverName: String?, verifyName: String?) throws(TLSError) {
        // A fully qualified name's trailing dot (`api.svc.cluster.local.`, written to skip the search list) is no part
        // of the name for TLS: RFC 6066 forbids it in SNI (Go's servers refuse the ClientHello), and OpenSSL's name
        // check would compare it against the certificate's names as it is, and fail.
        let serverName = serverName.map(Self.withoutTrailingDot)
        let verifyName = verifyName.map(Self.withoutTrailingDot)
        guard let ssl = SSL_new(context.context) else { throw TLSError.failed("SSL_new") }
        guard let rbio = BIO_new(BIO_s_mem()) else {
            SSL_free(ssl)
            throw TLSError.failed("BIO_new")
        }
        guard let wbio = BIO_new(BIO_s_mem()) else {
            let error = TLSError.failed("BIO_new")
            BIO_free(rbio)
            SSL_free(ssl)
            throw error
        }
        SSL_set_bio(ssl, rbio, wbio)  // the SSL owns both BIOs now
        self.ssl = ssl
        self.readBIO = rbio
        self.writeBIO = wbio
        self.isServer = context.isServer
        if context.isServer {
            SSL_set_accept_state(ssl)
            return
        }
        SSL_set_connect_state(ssl)
        let isIP = serverName.map { NetworkAddress(ip: $0, port: 0) != nil } ?? false
        if let serverName, !serverName.isEmpty, !isIP {
            // RFC 6066 §3: SNI carries host names only, never IP literals.
            guard copenssl_set_tlsext_host_name(ssl, serverName) == 1 else {
                throw TLSError.configuration("cannot send \"\(serverName)\" as the TLS server name (SNI)")
            }
        }
        guard context.verify else { return }
        guard let name = verifyName, !name.isEmpty else {
            throw TLSError.configuration(
                "an empty server name cannot be verified: set tls.serverName, or turn verification off")
        }
        // The name check is what makes a CA-signed certificate this server's: if it cannot be set up, refuse the
        // session rather than accept any certificate the trust roots signed.
        let checked: Int32
        if NetworkAddress(ip: name, port: 0) != nil {
            checked = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
        } else {
            checked = SSL_set1_host(ssl, name)
        }
        guard checked == 1 else {
            throw TLSError.configuration("cannot set up the certificate name check for \"\(name)\"")
        }
    }

    private static func withoutTrailingDot(_ name: String) -> String {
        name.hasSuffix(".") && name.count > 1 ? String(name.dropLast()) : name
    }

    deinit {
        SSL_free(self.ssl)
        self.peerKeyUpdateCounter?.deallocate()
    }

    /// Tests: where the message callback counts the peer's KeyUpdates, once `requestKeyUpdate()` asked for one.
    private var peerKeyUpdateCounter: UnsafeMutablePointer<Int>?

    /// Tests: queues a TLS 1.3 KeyUpdate that asks the peer to update its sending keys too (RFC 8446 §4.6.3), to go
    /// out with the next flush, and from then on counts the KeyUpdates the peer sends (`peerKeyUpdates`).
    /// - Returns: false when OpenSSL refuses (not TLS 1.3, or the handshake is not done).
    package func requestKeyUpdate() -> Bool {
        if self.peerKeyUpdateCounter == nil {
            let counter = UnsafeMutablePointer<Int>.allocate(capacity: 1)
            counter.initialize(to: 0)
            self.peerKeyUpdateCounter = counter
            copenssl_count_peer_key_updates(self.ssl, counter)
        }
        // SSL_key_update only marks the update; SSL_do_handshake writes it into the write BIO now.
        return SSL_key_update(self.ssl, SSL_KEY_UPDATE_REQUESTED) == 1 && SSL_do_handshake(self.ssl) == 1
    }

    /// Tests: KeyUpdates received from the peer since the first `requestKeyUpdate()`.
    package var peerKeyUpdates: Int { self.peerKeyUpdateCounter?.pointee ?? 0 }

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
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
            // A peer's KeyUpdate that asks for ours (RFC 8446 §4.6.3) leaves OpenSSL owing one KeyUpdate, which it
            // sends only at the next write; an idle connection may not write for minutes. Start that one update now
            // (the same one: not a second) and write it; the flush after this read sends it.
            if SSL_get_key_update_type(self.ssl) != SSL_KEY_UPDATE_NONE {
                ERR_clear_error()
                if SSL_key_update(self.ssl, SSL_KEY_UPDATE_NOT_REQUESTED) == 1 { _ = SSL_do_handshake(self.ssl) }
            }
            return 0
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
    package func drainCiphertext(into out: inout OutputBytes) {
        while BIO_ctrl_pending(self.writeBIO) > 0 {
            let pending = Int(BIO_ctrl_pending(self.writeBIO))
            let read = out.append(upTo: pending) { space in
                Int(BIO_read(self.writeBIO, space.baseAddress!, Int32(space.count)))
            }
            if read <= 0 { return }
        }
    }

    /// Gives back what an idle session holds beyond OpenSSL's fixed state, when nothing is buffered either way: the
    /// record buffers (OpenSSL allocates them again for the next record) and the two memory BIOs, whose buffers
    /// never shrink: one large message left each at its size (1 MiB and more) for the life of the connection.
    package func trimIdleMemory() {
        guard BIO_ctrl_pending(self.readBIO) == 0, BIO_ctrl_pending(self.writeBIO) == 0 else { return }
        if Self.freeingBuffersIsSafe { _ = SSL_free_buffers(self.ssl) }  // refused while a record is half read
        guard let rbio = BIO_new(BIO_s_mem()) else { return }
        guard let wbio = BIO_new(BIO_s_mem()) else {
            BIO_free(rbio)
            return
        }
        SSL_set_bio(self.ssl, rbio, wbio)  // both new: the SSL frees the old pair and owns these
        self.readBIO = rbio
        self.writeBIO = wbio
    }

    /// Before OpenSSL 3.0.14, 3.1.6, 3.2.2 and 3.3.1, SSL_free_buffers freed a read buffer still holding half a
    /// record (CVE-2024-4741); there the record buffers stay.
    private static let freeingBuffersIsSafe: Bool = {
        let version = OpenSSL_version_num()  // 0xMNN00PP0L
        let (major, minor, patch) = ((version >> 28) & 0xF, (version >> 20) & 0xFF, (version >> 4) & 0xFF)
        guard major == 3 else { return major > 3 }
        switch minor {
        case 0: return patch >= 14
        case 1: return patch >= 6
        case 2: return patch >= 2
        case 3: return patch >= 1
        default: return true
        }
    }()

    /// The bytes the two memory BIOs have allocated (tests).
    package var bufferCapacity: Int { copenssl_bio_mem_capacity(self.readBIO) + copenssl_bio_mem_capacity(self.writeBIO) }

    /// Queues close_notify (drain the ciphertext afterwards).
    package func shutdown() {
        ERR_clear_error()
        _ = SSL_shutdown(self.ssl)
    }

    /// OpenSSL's reason, made readable ("certificate verify failed: hostname mismatch").
    private func describeFailure(_ error: Int32) -> String {
        let verify = SSL_get_verify_result(self.ssl)
        var reason = TLSError.lastOpenSSLError() ?? "TLS error \(error)"
        // OpenSSL records the chain's verdict even when nothing is verified (verification off): it is the reason
        // only when it was asked for.
        if verify != X509_V_OK && SSL_get_verify_mode(self.ssl) & SSL_VERIFY_PEER != 0 {
            reason = "certificate verify failed: \(String(cString: X509_verify_cert_error_string(verify)))"
        }
        ERR_clear_error()
        return reason
    }
}
