import Foundation
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// A scripted TCP peer on loopback that misbehaves in one chosen way (blocking sockets on its own thread).
final class BadPeer: Sendable {
    enum Behaviour: Sendable {
        /// Answers whatever arrives with an HTTP/1.1 response.
        case http1
        /// Accepts and never sends a byte.
        case silent
        /// Speaks just enough HTTP/2 (SETTINGS) and closes once the request arrives, mid-response.
        case closeMidResponse
        /// Answers whatever arrives with these bytes, then closes.
        case reply([UInt8])
        /// As `.http1`, in two writes 300 ms apart: first `first` bytes ("HTT", "HTTP/"), then the rest (a slow
        /// proxy's small segments).
        case http1InPieces(first: Int)
    }

    let port: Int
    private let listenFD: Int32
    private let stopped = Atomic<Bool>(false)
    private let clients = PThreadLock<[Int32]>([])

    init(_ behaviour: Behaviour) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else { throw ReactorError(operation: "bad peer listen", errno: errno) }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
        }
        self.port = Int(UInt16(bigEndian: address.sin_port))
        self.listenFD = fd
        let this = self
        Thread.detachNewThread { this.serve(behaviour) }
    }

    private func serve(_ behaviour: Behaviour) {
        while !self.stopped.load(ordering: .acquiring) {
            let client = accept(self.listenFD, nil, nil)
            if client < 0 { return }
            self.clients.withLock { $0.append(client) }
            let this = self
            Thread.detachNewThread { this.handle(client, behaviour) }
        }
    }

    private func handle(_ fd: Int32, _ behaviour: Behaviour) {
        var buffer = [UInt8](repeating: 0, count: 4096)
        switch behaviour {
        case .silent:
            while buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, 4096) }) > 0 {}
        case .http1:
            self.handle(fd, .reply(Array("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8)))
        case .http1InPieces(let first):
            _ = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4096) }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            let answer = Array("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8)
            _ = answer.withUnsafeBytes { write(fd, $0.baseAddress, first) }
            // Only shapes the bytes: should both pieces come in one read, the check sees them whole, and passes too.
            usleep(300_000)
            _ = answer.withUnsafeBytes { write(fd, $0.baseAddress! + first, $0.count - first) }
            shutdown(fd, Int32(SHUT_RDWR))
        case .reply(let reply):
            _ = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4096) }
            _ = reply.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            shutdown(fd, Int32(SHUT_RDWR))
        case .closeMidResponse:
            // Empty SETTINGS, then wait for the request (preface + HEADERS + DATA), send half a HEADERS frame, close.
            let settings: [UInt8] = [0, 0, 0, 4, 0, 0, 0, 0, 0]
            _ = settings.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            // Read until the client has been quiet for 300 ms: preface, SETTINGS, HEADERS and DATA are in.
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            while poll(&descriptor, 1, 300) > 0 {
                if buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, 4096) }) <= 0 { break }
            }
            // HEADERS (stream 1, END_HEADERS, ":status: 200" as HPACK index 8, content-type application/grpc as a
            // literal with name index 31), then a DATA frame announcing 100 bytes of which only 10 arrive before the
            // close: the start of a message of 50 bytes.
            var partial: [UInt8] = [0, 0, 20, 1, 4, 0, 0, 0, 1, 0x88, 0x0F, 0x10, 16] + Array("application/grpc".utf8)
            partial += [0, 0, 100, 0, 0, 0, 0, 0, 1] + [0, 0, 0, 0, 50] + [UInt8](repeating: 7, count: 5)
            _ = partial.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            shutdown(fd, Int32(SHUT_RDWR))
        }
    }

    func stop() {
        self.stopped.store(true, ordering: .releasing)
        shutdown(self.listenFD, Int32(SHUT_RDWR))
        close(self.listenFD)
        for fd in self.clients.withLock({ $0 }) {
            shutdown(fd, Int32(SHUT_RDWR))
            close(fd)
        }
    }
}

@Suite("Bad peers", .serialized)
struct BadPeerTests {
    @Test("connection refused fails fast with UNAVAILABLE")
    func connectionRefused() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let peer = try BadPeer(.silent)
        let port = peer.port
        peer.stop()
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", eventLoop: loop)
        let started = now()
        let response = await channel.call(timeout: .seconds(5))
        #expect(response.status.code == .unavailable)
        #expect(response.status.message.contains("refused"))
        #expect(now() - started < 3)  // not the 5 s deadline
    }

    @Test("an HTTP/1.1 server gives UNAVAILABLE saying so")
    func http1Server() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let peer = try BadPeer(.http1)
        defer { peer.stop() }
        let channel = try GRPCChannel(target: "127.0.0.1:\(peer.port)", eventLoop: loop)
        let response = await channel.call(timeout: .seconds(5))
        #expect(response.status.code == .unavailable)
        #expect(response.status.message.contains("HTTP/1"))
    }

    /// The ways a client and a server can disagree on the first bytes, and the reason each must give.
    enum Mismatch: String, CaseIterable, Sendable {
        case htmlToPlaintext, htmlToTLS, http1ToTLS, tlsAlertToPlaintext, h2cToTLS, tlsServerToPlaintext
        /// The HTTP/1.1 answer in two pieces, "HTT" or "HTTP/" first (a whole TLS record header's worth, which
        /// OpenSSL would judge first): judged on the bytes of both reads.
        case http1InPiecesToTLS, http1RecordHeaderInPiecesToTLS, http1InPiecesToPlaintext
    }

    @Test("a server that speaks something else says so: HTML, HTTP/1.x, TLS without TLS, h2c with TLS", arguments: Mismatch.allCases)
    func firstBytesMismatch(_ mismatch: Mismatch) async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // Python's http.server answers our preface with an error page and no status line (HTTP/0.9 style).
        let html = Array("<!DOCTYPE HTML>\n<html><body>Error code: 505</body></html>\n".utf8)
        // A TLS alert record (fatal, protocol_version), as a TLS server may answer a plaintext preface.
        let alert: [UInt8] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46]
        var options = EchoServer.Options()
        var useTLS = true
        var peer: BadPeer?
        var server: EchoServer?
        let expected: String
        switch mismatch {
        case .htmlToPlaintext:
            (peer, useTLS, expected) = (try BadPeer(.reply(html)), false, "first bytes are not HTTP/2 (\"<!DOCTYPE HTML>\\x0a<html>")
        case .htmlToTLS:
            (peer, expected) = (try BadPeer(.reply(html)), "answered the TLS handshake with bytes that are not TLS")
        case .http1ToTLS:
            (peer, expected) = (try BadPeer(.http1), "answered the TLS handshake with HTTP/1.x (\"HTTP/1.1 400 Bad Request\")")
        case .http1InPiecesToTLS:
            (peer, expected) = (
                try BadPeer(.http1InPieces(first: 3)), "answered the TLS handshake with HTTP/1.x (\"HTTP/1.1 400 Bad Request\")"
            )
        case .http1RecordHeaderInPiecesToTLS:
            (peer, expected) = (
                try BadPeer(.http1InPieces(first: 5)), "answered the TLS handshake with HTTP/1.x (\"HTTP/1.1 400 Bad Request\")"
            )
        case .http1InPiecesToPlaintext:
            (peer, useTLS, expected) = (
                try BadPeer(.http1InPieces(first: 3)), false, "server answered with HTTP/1.x, not HTTP/2 (\"HTTP/1.1 400 Bad Request\")"
            )
        case .tlsAlertToPlaintext:
            (peer, useTLS, expected) = (try BadPeer(.reply(alert)), false, "server answered with TLS: it expects TLS")
        case .h2cToTLS:
            server = try EchoServer(options: options, eventLoop: loop)
            expected = "answered the TLS handshake with HTTP/2 in plaintext: it does not use TLS on this port (h2c)"
        case .tlsServerToPlaintext:
            let certificates = try TestCertificates.make()
            defer { certificates.remove() }  // read by EchoServer's init
            options.tlsCertificateChain = certificates.serverCertificate
            options.tlsPrivateKey = certificates.serverKey
            server = try EchoServer(options: options, eventLoop: loop)
            (useTLS, expected) = (false, "closed by the server before it sent anything (a TLS server does that to a plaintext client)")
        }
        defer {
            peer?.stop()
            server?.close()
        }
        var configuration = Configuration.defaults
        configuration.enableRetry = false
        if useTLS {
            var tls = TLSSettings()
            tls.verifyCertificate = false
            configuration.tls = tls
        }
        let port = peer?.port ?? server!.port
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: configuration, eventLoop: loop)
        defer { channel.close() }
        let response = await channel.call(timeout: .seconds(5))
        #expect(response.status.code == .unavailable)
        // A server that closes with our bytes unread resets the connection instead: the same refusal, said by TCP.
        let reset = mismatch == .tlsServerToPlaintext && response.status.message.contains("Connection reset by peer")
        #expect(response.status.message.contains(expected) || reset, "\(response.status.message)")
    }

    @Test("a server that accepts and never answers: the deadline fires; without one the connect timeout does")
    func silentServer() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let peer = try BadPeer(.silent)
        defer { peer.stop() }
        var configuration = Configuration()
        configuration.minConnectTimeout = .milliseconds(500)
        let ledger = CompletionLedger()
        let channel = try GRPCChannel(target: "127.0.0.1:\(peer.port)", configuration: configuration, eventLoop: loop)
        var started = now()
        let withDeadline = await channel.call(timeout: .milliseconds(200), ledger: ledger, id: 1)
        #expect(withDeadline.status.code == .deadlineExceeded)
        #expect(now() - started < 2)
        started = now()
        let withoutDeadline = await channel.call(ledger: ledger, id: 2)
        #expect(withoutDeadline.status.code == .unavailable)
        #expect(withoutDeadline.status.message.contains("timed out"))
        #expect(now() - started < 2)
        #expect(ledger.duplicates == 0)
    }

    @Test("a server that closes mid-response gives UNAVAILABLE, once")
    func closesMidResponse() async throws {
        let loop = try ReactorLoop()
        loop.start()
        let peer = try BadPeer(.closeMidResponse)
        defer { peer.stop() }
        let ledger = CompletionLedger()
        let channel = try GRPCChannel(target: "127.0.0.1:\(peer.port)", eventLoop: loop)
        let response = await channel.call([1, 2, 3], timeout: .seconds(5), ledger: ledger, id: 1)
        #expect(response.status.code == .unavailable)
        #expect(response.status.message.contains("closed"))
        loop.shutdown()
        #expect(ledger.duplicates == 0)
        #expect(ledger.completed == 1)
    }
}
