import CNghttp2
import CReactor
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// What an `HTTP2Socket` tells the connection that owns it (our client connection, or the echo server's). Reactor
/// thread only.
package protocol HTTP2SocketOwner: AnyObject {
    /// The first bytes from the peer (ciphertext under TLS). A status refuses the peer (an HTTP/1.x answer, say).
    func socketReceivedFirstBytes(_ bytes: UnsafeRawBufferPointer) -> CallStatus?
    /// The first plaintext after the TLS handshake. A status refuses the peer (it is not HTTP/2 after all).
    func socketReceivedFirstPlaintext(_ bytes: UnsafeRawBufferPointer) -> CallStatus?
    /// The TLS handshake finished. A status refuses the peer (the client's ALPN check).
    func socketSecured(_ tls: TLSSession) -> CallStatus?
    /// TCP is up and TLS (if any) is done: make the nghttp2 session now (`HTTP2Socket.session`).
    func socketReadyForHTTP2()
    /// Bytes were read and handed to nghttp2 (keepalive measures from the last read).
    func socketDidRead()
    /// Output was written: the owner may notice that it has drained.
    func socketDidFlush()
    /// The socket is closing: the fd is closed, the nghttp2 session not yet deleted (a last look at it).
    func socketClosing(session: OpaquePointer)
    /// The socket is closed: fd closed, registration and nghttp2 session gone. The last call.
    func socketClosed(_ reason: CallStatus)
}

extension HTTP2SocketOwner {
    package func socketClosing(session: OpaquePointer) {}
}

/// One nghttp2 session over one nonblocking socket, for both ends: our client connections and the echo server's
/// (nghttp2 `examples/libevent-client.c`'s shape, on our reactor).
///
/// It owns the fd, its registration and interest, TLS over memory BIOs, the bounded read loop, the coalesced output
/// and the close rule; the owner keeps only what differs (the client connects and keeps alive; the server accepts
/// and dispatches streams) and makes the nghttp2 session, whose callbacks reach the owner through its user data.
///
/// - Reads: at most four 64 KiB reads per readiness event (level-triggered epoll reports the fd again next turn), so
///   one busy connection cannot starve the others; each read goes straight to `nghttp2_session_mem_recv`.
/// - Writes: whatever nghttp2 produces during a turn is collected at the end of the turn into one buffer
///   (`SocketOutput`) and written with one `send`, as nghttp2's header advises under TCP_NODELAY. Write interest is
///   asked for only while bytes wait.
/// - Close rule (`libevent-client.c`'s): when nghttp2 wants neither to read nor to write and the output is written,
///   the connection is over.
/// - TLS: `client.c`'s want-io in one place: the handshake steps as ciphertext arrives; HTTP/2 starts after it.
///
/// Closing never frees the nghttp2 session under nghttp2's feet: a close requested while `mem_recv` runs (from one of
/// its callbacks) deletes the session when `mem_recv` returns.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class HTTP2Socket: ReactorHandler, @unchecked Sendable {
    package enum State: Equatable {
        /// A nonblocking connect is under way (client).
        case connecting
        /// TCP is up; the TLS handshake runs.
        case securing
        /// HTTP/2 runs (or will, once the owner made the session).
        case open
        case closed
    }

    package unowned let reactor: Reactor
    /// The same reactor, read unretained on the loop's own paths (see `Reactor`).
    private let loopReactor: Unmanaged<Reactor>
    /// Not `weak`: a weak reference gives the owner a side table, which makes every retain and release of it (a
    /// connection: several per call) take the slow path. The owner outlives the socket's use of it: it closes the
    /// socket, or detaches itself, before it goes (`detachOwner()`).
    @exclusivity(unchecked)
    private unowned(unsafe) var owner: (any HTTP2SocketOwner)?
    /// For messages: the peer's address.
    package let peer: String
    @exclusivity(unchecked)
    package private(set) var state: State
    @exclusivity(unchecked)
    private var fd: Int32
    @exclusivity(unchecked)
    private var registration: Reactor.Registration?
    @exclusivity(unchecked)
    private var interest: UInt32 = 0
    /// The nghttp2 session, made by the owner in `socketReadyForHTTP2`; deleted by `close`.
    @exclusivity(unchecked)
    package var session: OpaquePointer?
    /// The allocator `session` was made with, if any: released with this socket, after the session is deleted.
    @exclusivity(unchecked)
    package var sessionMemory: HTTP2SessionMemory?
    @exclusivity(unchecked)
    package private(set) var tls: TLSSession?
    @exclusivity(unchecked)
    private var output = SocketOutput()
    @exclusivity(unchecked)
    private var flushScheduled = false
    /// DATA frames written by `appendDataFrame` (tests: large bodies take that path).
    @exclusivity(unchecked)
    package private(set) var directDataFrames = 0
    /// It closed during the TLS handshake (a certificate refused, an alert, the peer gone then), or on a TLS error
    /// before the server's first decrypted byte (TLS 1.3 servers judge the client's certificate after the handshake).
    package private(set) var closedWhileSecuring = false
    /// A TLS error (a peer's alert) ended it before the server's first decrypted byte.
    private var tlsFailedBeforePlaintext = false
    @exclusivity(unchecked)
    private var firstBytes = FirstBytesCheck()
    private var firstPlaintext = FirstBytesCheck()
    /// What nghttp2 last found wrong in the peer's input (its error callbacks): when it then ends the session
    /// itself, the close says this rather than "closed by the server".
    package var protocolError: String?
    /// Depth of `mem_recv` calls on the stack (nghttp2 callbacks may close the socket).
    @exclusivity(unchecked)
    private var receiving = 0
    @exclusivity(unchecked)
    private var sessionToDelete: OpaquePointer?

    /// A socket for a connect that `connect(to:)` starts.
    package init(reactor: Reactor, owner: any HTTP2SocketOwner, peer: String, tls: TLSSession?) {
        self.reactor = reactor
        self.loopReactor = Unmanaged.passUnretained(reactor)
        self.owner = owner
        self.peer = peer
        self.tls = tls
        self.fd = -1
        self.state = .connecting
    }

    /// A socket for an accepted fd.
    package init(reactor: Reactor, owner: any HTTP2SocketOwner, acceptedFD: Int32, peer: String, tls: TLSSession?) {
        self.reactor = reactor
        self.loopReactor = Unmanaged.passUnretained(reactor)
        self.owner = owner
        self.peer = peer
        self.tls = tls
        self.fd = acceptedFD
        self.state = .connecting
    }

    deinit {
        assert(self.fd < 0, "HTTP2Socket freed with an open fd")
        if let session = self.session { nghttp2_session_del(session) }
        if let session = self.sessionToDelete { nghttp2_session_del(session) }
    }

    // MARK: starting

    /// Starts a nonblocking connect to `address`. Failures arrive as `socketClosed`.
    /// - Parameter userTimeout: TCP_USER_TIMEOUT for TCP sockets (unacknowledged writes fail the connection then).
    package func connect(to address: NetworkAddress, userTimeout: Duration?) {
        precondition(self.state == .connecting && self.fd < 0)
        var inProgress: Int32 = 0
        let fd: Int32
        do {
            fd = try address.withSockAddr { cr_socket_connect($0, $1, &inProgress) }
        } catch {
            self.close(reason: CallStatus(code: .unavailable, message: "connect to \(self.peer) failed: \(error)"))
            return
        }
        if fd < 0 {
            self.close(reason: Self.connectFailure(self.peer, errno: -fd))
            return
        }
        self.fd = fd
        if address.isTCP, let userTimeout {
            // Writes stuck without ACKs fail the connection within the keepalive timeout too (gRFC A18). In whole
            // milliseconds, rounded up (0 would mean the system's default, about 15 minutes, not "at once"), and at
            // most Int32.max (the kernel reads an int: more is refused, and the socket kept the default).
            let nanoseconds = max(userTimeout.nanoseconds, 1)
            let milliseconds = nanoseconds / 1_000_000 + (nanoseconds % 1_000_000 == 0 ? 0 : 1)
            _ = cr_socket_set_user_timeout(fd, UInt32(min(milliseconds, Int64(Int32.max))))
        }
        guard self.register(interest: inProgress != 0 ? Reactor.Events.write : Reactor.Events.read) else { return }
        if inProgress == 0 { self.transportConnected() }
    }

    /// Starts serving an accepted fd: the TLS handshake (server side) or HTTP/2 at once.
    package func startAccepted() {
        precondition(self.state == .connecting && self.fd >= 0)
        guard self.register(interest: Reactor.Events.read) else { return }
        self.transportConnected()
    }

    private func register(interest: UInt32) -> Bool {
        do {
            self.interest = interest
            self.registration = try self.reactor.register(fd: self.fd, interest: interest, handler: self)
            self.reactor.addShutdownHook(self)
            return true
        } catch {
            self.close(reason: CallStatus(code: .unavailable, message: "\(error)"))
            return false
        }
    }

    package static func connectFailure(_ peer: String, errno code: Int32) -> CallStatus {
        CallStatus(code: .unavailable, message: "connect to \(peer) failed: \(String(cString: strerror(code)))")
    }

    private func transportConnected() {
        self.setInterest(Reactor.Events.read)
        if let tls = self.tls {
            self.state = .securing
            if !tls.isServer { self.stepHandshake(tls) }
            return
        }
        self.startHTTP2()
    }

    /// Advances the TLS handshake; once it is done and the owner accepts the peer, HTTP/2 starts.
    private func stepHandshake(_ tls: TLSSession) {
        switch tls.handshake() {
        case .inProgress:
            self.output.takeCiphertext(from: tls)
            self.scheduleFlush()
        case .failed(let reason):
            // The alert that explains the failure goes out before the socket closes.
            self.output.takeCiphertext(from: tls)
            self.output.writeOnce(to: self.fd)
            let message =
                reason.contains("no application protocol")
                ? "server \(self.peer) did not negotiate HTTP/2 through ALPN (no protocol in common with h2): \(reason)"
                : "TLS handshake with \(self.peer) failed: \(reason)"
            self.close(reason: CallStatus(code: .unavailable, message: message))
        case .done:
            self.output.takeCiphertext(from: tls)
            if let refusal = self.owner?.socketSecured(tls) {
                self.close(reason: refusal)
                return
            }
            self.startHTTP2()
        }
    }

    private func startHTTP2() {
        self.state = .open
        self.owner?.socketReadyForHTTP2()
        if self.state == .open { self.scheduleFlush() }
    }

    // MARK: I/O

    package override func reactorFDReady(_ events: UInt32) {
        if self.state == .connecting {
            let error = cr_socket_error(self.fd)
            if error != 0 {
                self.close(reason: Self.connectFailure(self.peer, errno: error))
            } else if events & Reactor.Events.write != 0 {
                self.transportConnected()
            }
            return
        }
        if events & Reactor.Events.write != 0 {
            self.flushNow()
            if self.state == .closed { return }
        }
        if events & Reactor.Events.read != 0 {
            self.readAvailable()
        }
    }

    /// Reads what the socket has: up to four buffers a turn (a busy connection must not starve the loop's others),
    /// or, `untilDrained`, everything to the end (a connection about to close: what the peer sent last is the calls'
    /// answers, and the kernel drops it with the socket). `failure` is why it is about to close: a read error or the
    /// end of the stream met then is the same failure seen again (a write that failed with ETIMEDOUT took the
    /// socket's error; the read after it finds only the end), not the server's close.
    /// `failureIsReset`: that failure was the peer resetting the connection (ECONNRESET, EPIPE), which, after the
    /// server's GOAWAY, is the server's close.
    private func readAvailable(untilDrained: Bool = false, failure: CallStatus? = nil, failureIsReset: Bool = false) {
        // The owner is the session's user data: it must outlive every nghttp2 callback of this read.
        guard let owner = self.owner else {
            self.close(reason: CallStatus(code: .unavailable, message: "connection abandoned"))
            return
        }
        let buffer = self.loopReactor._withUnsafeGuaranteedRef { $0.readBuffer }
        // Bounded even to the end: a reset socket's queue is finite, but nothing here may loop for ever.
        reading: for _ in 0..<(untilDrained ? 4096 : 4) {
            let n = cr_read(self.fd, buffer.baseAddress!, buffer.count)
            if n == -Int(EAGAIN) { break }
            if n < 0 {
                // Reset after a GOAWAY the owner can name: the server's close, as at the end of the stream below.
                if self.closeDetail != nil && (-n == Int(ECONNRESET) || -n == Int(EPIPE)) {
                    self.close(reason: self.closedByPeerStatus())
                    return
                }
                self.close(reason: failure ?? CallStatus(code: .unavailable, message: "read from \(self.peer) failed: \(String(cString: strerror(Int32(-n))))"))
                return
            }
            if n == 0 {
                // Fewer first bytes than a check wants, then the end: judged as they are.
                let refusal = self.firstBytes.judgeWhatCame(owner.socketReceivedFirstBytes)
                // A reset the owner can explain (after the server's GOAWAY) is the server's close, though a write
                // met it first; a write that timed out is not, GOAWAY or not.
                let reason = self.closeDetail != nil && failureIsReset ? nil : failure
                self.close(reason: refusal ?? reason ?? self.closedByPeerStatus(endOfFile: true))
                return
            }
            var bytes = UnsafeRawBufferPointer(start: buffer.baseAddress, count: n)
            // Once per connection at most: the first bytes held back over short reads, handed on from a copy.
            var held: UnsafeMutableRawBufferPointer? = nil
            defer { held?.deallocate() }
            if !self.firstBytes.judged {
                switch self.firstBytes.take(bytes, holding: self.tls != nil, judge: owner.socketReceivedFirstBytes) {
                case .pass:
                    break
                case .hold:
                    if n < buffer.count && !untilDrained { break reading }
                    continue reading
                case .passHeld(let gathered):
                    let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: gathered.count, alignment: 1)
                    copy.copyBytes(from: gathered)
                    held = copy
                    bytes = UnsafeRawBufferPointer(copy)
                case .refuse(let refusal):
                    self.close(reason: refusal)
                    return
                }
            }
            if let tls = self.tls {
                tls.feed(bytes)
                if !tls.handshakeDone {
                    self.stepHandshake(tls)
                    if self.state != .open || !tls.handshakeDone { break }
                }
                guard self.receiveDecrypted(tls) else { return }
            } else {
                guard self.receive(bytes) else { return }
            }
            owner.socketDidRead()
            if self.state == .closed { return }
            if n < buffer.count && !untilDrained { break }
        }
        withExtendedLifetime(owner) { self.scheduleFlush() }
    }

    /// Hands plaintext to nghttp2. Returns false when the socket closed.
    private func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let session = self.session, bytes.count > 0 else { return self.state != .closed }
        self.receiving += 1
        let consumed = nghttp2_session_mem_recv(session, bytes.baseAddress!.assumingMemoryBound(to: UInt8.self), bytes.count)
        self.receiving -= 1
        if self.receiving == 0, let late = self.sessionToDelete {
            self.sessionToDelete = nil
            nghttp2_session_del(late)
        }
        if self.state == .closed { return false }
        if consumed < 0 {
            self.close(
                reason: CallStatus(
                    code: .unavailable,
                    message: "HTTP/2 protocol error from \(self.peer): \(String(cString: nghttp2_strerror(Int32(consumed))))"))
            return false
        }
        return true
    }

    /// Decrypts every complete record and hands the plaintext to nghttp2.
    private func receiveDecrypted(_ tls: TLSSession) -> Bool {
        let plain = self.loopReactor._withUnsafeGuaranteedRef { $0.plaintextBuffer }
        while true {
            let n: Int
            do {
                n = try tls.readPlaintext(into: UnsafeMutableRawBufferPointer(plain))
            } catch {
                self.output.takeCiphertext(from: tls)
                self.output.writeOnce(to: self.fd)
                self.tlsFailedBeforePlaintext = !self.firstPlaintext.sawAny
                self.close(reason: CallStatus(code: .unavailable, message: "TLS error from \(self.peer): \(error)"))
                return false
            }
            if n == 0 { return true }
            if n < 0 {
                self.close(reason: self.closedByPeerStatus())
                return false
            }
            let bytes = UnsafeRawBufferPointer(start: plain.baseAddress, count: n)
            if !self.firstPlaintext.judged, let owner = self.owner,
                case .refuse(let refusal) = self.firstPlaintext.take(
                    bytes, holding: false, judge: owner.socketReceivedFirstPlaintext)
            {
                self.close(reason: refusal)
                return false
            }
            guard self.receive(bytes) else { return false }
        }
    }

    /// Why the peer's close ended the connection, in the owner's terms (set by the owner: "after GOAWAY ...").
    @exclusivity(unchecked)
    package var closeDetail: String?

    /// - Parameter endOfFile: The server closed its side (a read returned 0), not nghttp2 ending the session.
    private func closedByPeerStatus(endOfFile: Bool = false) -> CallStatus {
        let base: String
        switch self.state {
        case .connecting, .securing:
            base = "connection to \(self.peer) closed by the server during the handshake"
        case .open where endOfFile && !self.firstBytes.sawAny && self.tls == nil:
            // A TLS server closes on a plaintext preface without a word (OpenSSL's does); so may one that is going away.
            base = "connection to \(self.peer) closed by the server before it sent anything (a TLS server does that to a plaintext client)"
        default:
            base = "connection to \(self.peer) closed by the server"
        }
        if let detail = self.closeDetail { return CallStatus(code: .unavailable, message: "\(base) after \(detail)") }
        return CallStatus(code: .unavailable, message: base)
    }

    /// Asks for a write at the end of this turn.
    package func scheduleFlush() {
        if !self.flushScheduled && self.state != .closed {
            self.flushScheduled = true
            self.loopReactor._withUnsafeGuaranteedRef { $0.scheduleFlush(self) }
        }
    }

    package override func reactorFlush() {
        self.flushScheduled = false
        self.flushNow()
    }

    /// Lets an idle connection's memory go: the output buffer, the pages of the session's frame buffer and those of
    /// its emptied stream table (`HTTP2SessionMemory.trim`). Only when nothing waits to be written and nghttp2 has
    /// nothing more (its last `mem_send` returned 0 and its output was copied out), so the frame buffer holds
    /// nothing that is read again.
    package func trimIdleMemory() {
        guard let session = self.session, self.state == .open, !self.flushScheduled, self.output.isDrained,
            nghttp2_session_want_write(session) == 0
        else { return }
        self.output.reset()
        self.sessionMemory?.trim()
        self.tls?.trimIdleMemory()
    }

    /// Pulls everything nghttp2 wants to send into one buffer and writes it with as few syscalls as possible.
    private func flushNow() {
        guard self.fd >= 0, self.state == .open || self.state == .securing else { return }
        guard let session = self.session, self.state == .open else {
            // The TLS handshake: only ciphertext is waiting.
            self.writeOutput()
            return
        }
        do {
            try self.collectOutput(from: session)
        } catch {
            switch error {
            case .http2(let code):
                self.close(reason: CallStatus(code: .internal, message: "nghttp2: \(String(cString: nghttp2_strerror(code)))"))
            default:
                self.close(reason: CallStatus(code: .unavailable, message: "TLS error: \(error)"))
            }
            return
        }
        guard self.writeOutput() else { return }
        if self.output.isDrained && nghttp2_session_want_read(session) == 0
            && nghttp2_session_want_write(session) == 0
        {
            // The session is over: the peer's GOAWAY (`closeDetail` says so), or nghttp2 ending it after finding the
            // peer's input wrong (its GOAWAY is out now).
            if let problem = self.protocolError {
                let after = self.closeDetail.map { " (after \($0))" } ?? ""
                self.close(reason: CallStatus(code: .unavailable, message: "HTTP/2 protocol error from \(self.peer): \(problem)\(after)"))
            } else {
                self.close(reason: self.closedByPeerStatus())
            }
            return
        }
        self.owner?.socketDidFlush()
    }

    /// Pulls what nghttp2 wants to send into the output, up to its cap, through TLS when it is on. nghttp2 calls
    /// back into `appendDataFrame` from inside `mem_send`, so no access to `output` spans that call.
    private func collectOutput(from session: OpaquePointer) throws(SocketOutput.Failure) {
        let encrypted = self.tls != nil
        while self.output.hasRoom {
            var chunk: UnsafePointer<UInt8>? = nil
            let n = nghttp2_session_mem_send(session, &chunk)
            if n < 0 { throw .http2(Int32(n)) }
            if n == 0 { break }
            // nghttp2 hands out one frame at a time: a GOAWAY here is this side's, and one with an error code is
            // nghttp2 ending the session over the peer's input, its reason in the debug data.
            if n >= 17 && chunk.unsafelyUnwrapped[3] == 7 {
                self.noteGoAwaySent(UnsafeRawBufferPointer(start: chunk, count: n))
            }
            self.output.add(UnsafeRawBufferPointer(start: chunk, count: n), encrypted: encrypted)
            // A PING of this side's (not an ACK): where it ends in the byte stream, for keepalive's timeout.
            if n == 17 && chunk.unsafelyUnwrapped[3] == 6 && chunk.unsafelyUnwrapped[4] & 1 == 0 {
                self.pingEnd = Int64(self.output.streamPosition)
            }
        }
        if let tls = self.tls { try self.output.encryptPending(with: tls) }
    }

    /// Keeps the reason of a GOAWAY with an error code that this side sends (see `protocolError`).
    private func noteGoAwaySent(_ frame: UnsafeRawBufferPointer) {
        let code = frame[13..<17].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        guard code != 0, self.protocolError == nil else { return }
        let length = Int(frame[0]) << 16 | Int(frame[1]) << 8 | Int(frame[2])
        let debug = frame[17..<min(frame.count, 9 + length)].prefix(200)
        let name = String(cString: nghttp2_http2_strerror(code))
        self.protocolError = debug.isEmpty ? name : "\(String(decoding: debug, as: UTF8.self)) (\(name))"
    }

    /// nghttp2's no-copy DATA: the frame's `header`, then the `length` payload bytes that `fill` passes on, go
    /// straight into the output (one copy instead of two).
    /// - Returns: 0; `NGHTTP2_ERR_PAUSE` once the output is full (`mem_send` returns and the rest waits for the
    ///   socket); `NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE` when `fill` could not supply the bytes (nghttp2 resets the
    ///   stream).
    package func appendDataFrame(
        header: UnsafeRawBufferPointer, length: Int, fill: ((UnsafeRawBufferPointer) -> Void) -> Bool
    ) -> Int32 {
        guard self.output.addFrame(header: header, encrypted: self.tls != nil, fill: fill) else {
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue
        }
        self.directDataFrames += 1
        return self.output.hasRoom ? 0 : NGHTTP2_ERR_PAUSE.rawValue
    }

    /// Writes what is waiting; asks for writability while the socket is full (or nghttp2 has more than the cap
    /// let through). False when the socket closed.
    @discardableResult
    private func writeOutput() -> Bool {
        do {
            try self.output.write(to: self.fd)
        } catch {
            let code: Int32
            if case .write(let errno) = error { code = errno } else { code = EIO }
            let reason = CallStatus(code: .unavailable, message: "write to \(self.peer) failed: \(String(cString: strerror(code)))")
            // A peer that answers and closes without reading the rest of a request resets the connection, but what
            // it sent first (a status, a GOAWAY naming the streams it never processed) can still be read, and the
            // calls end with that rather than with the failed write.
            if self.state == .open {
                self.readAvailable(untilDrained: true, failure: reason, failureIsReset: code == ECONNRESET || code == EPIPE)
            }
            if self.state != .closed { self.close(reason: reason) }
            return false
        }
        let moreFromHTTP2 = self.state == .open && (self.session.map { nghttp2_session_want_write($0) != 0 } ?? false)
        self.setInterest(
            self.output.isDrained && !moreFromHTTP2 ? Reactor.Events.read : Reactor.Events.read | Reactor.Events.write)
        return true
    }

    private func setInterest(_ interest: UInt32) {
        guard interest != self.interest, let registration = self.registration else { return }
        self.interest = interest
        self.reactor.setInterest(registration, interest)
    }

    /// Bytes held by the output buffer (tests of its bound).
    package var outputHeldBytes: Int { self.output.heldBytes }

    /// Fixes the kernel's send buffer at about `bytes` (SO_SNDBUF, which also stops Linux growing it): for tests that
    /// need the socket to back up after a known amount.
    package func fixSendBuffer(bytes: Int32) {
        var size = bytes
        _ = setsockopt(self.fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Bytes of this socket's output the peer has acknowledged (TCP's count, ciphertext under TLS); nil when not
    /// known (a Unix socket, a closed one).
    package var bytesAcknowledged: Int64? {
        guard self.fd >= 0 else { return nil }
        let acked = cr_socket_bytes_acked(self.fd)
        return acked >= 0 ? acked : nil
    }

    /// Where in the socket's byte stream the last PING this side sent (not an ACK) ends, in `bytesAcknowledged`'s
    /// units (under TLS a few bytes short: the record's overhead is not counted yet); nil until one goes out. The
    /// owner clears it when it submits a PING, so nil then means nghttp2 still holds that PING.
    package var pingEnd: Int64?

    /// Where nghttp2's output has got to (`SocketOutput.mark`): read when a stream is submitted, it tells at the
    /// close whether any of the stream's frames can have left (`outputMayHaveWritten`).
    @inline(__always)
    package var outputMark: Int { self.output.mark(encrypted: self.tls != nil) }

    /// Whether any byte nghttp2 produced at or after `mark` can have reached the kernel.
    package func outputMayHaveWritten(from mark: Int) -> Bool {
        self.output.mayHaveWritten(from: mark, encrypted: self.tls != nil)
    }

    // MARK: closing

    /// The owner is going away: nothing reaches it from now on.
    package func detachOwner() {
        self.owner = nil
    }

    /// Closes politely: GOAWAY (NO_ERROR) and, under TLS, close_notify go out first (best effort, one write), then
    /// the socket closes with `reason`.
    package func shutdown(reason: CallStatus) {
        if let session = self.session, self.fd >= 0, self.state == .open {
            nghttp2_session_terminate_session(session, NGHTTP2_NO_ERROR.rawValue)
            try? self.collectOutput(from: session)
        }
        if let tls = self.tls, self.fd >= 0, self.state != .closed, tls.handshakeDone {
            tls.shutdown()  // close_notify
            self.output.takeCiphertext(from: tls)
        }
        if self.fd >= 0 { self.output.writeOnce(to: self.fd) }
        self.close(reason: reason)
    }

    /// Closes now: the fd, the registration and the session go; the owner hears `socketClosed(reason)`.
    package func close(reason: CallStatus) {
        if self.state == .closed { return }
        // Under TLS 1.3 the client's handshake is done before the server has judged its certificate: a refusal
        // (an alert) arrives after, before the server's first decrypted byte. That counts as the handshake too.
        // (Not a connect refused or timed out, nor a close for another reason before the server's SETTINGS: those
        // have nothing to do with the files.)
        self.closedWhileSecuring = self.state == .securing || self.tlsFailedBeforePlaintext
        self.state = .closed
        if let registration = self.registration {
            self.reactor.deregister(registration, handler: self)
            self.registration = nil
        }
        if self.fd >= 0 {
            _ = cr_close(self.fd)
            self.fd = -1
        }
        self.reactor.removeShutdownHook(self)
        if let session = self.session {
            self.owner?.socketClosing(session: session)
            self.session = nil
            if self.receiving > 0 {
                self.sessionToDelete = session
            } else {
                nghttp2_session_del(session)
            }
        }
        self.output.reset()
        self.tls = nil
        self.owner?.socketClosed(reason)
    }

    /// The reactor is stopping: GOAWAY and close_notify go out, then the socket closes.
    package override func reactorRunSubmitted() {
        self.shutdown(reason: CallStatus(code: .unavailable, message: "the event loop is shutting down"))
    }
}

/// The first bytes of a connection (or the first plaintext under TLS), gathered until there are enough to tell what
/// the peer speaks, then judged once. A server's first bytes may come in more than one read (small segments, a slow
/// proxy): judged on the first read alone, "HTT" would pass as too short to tell, and the close that follows would
/// say only "wrong version number" or "closed during the handshake" instead of "HTTP/1.x".
struct FirstBytesCheck {
    /// Enough for every check: "HTTP/1." (7), a TLS record header (5), a frame header's type (4) and the part of its
    /// stream id that came.
    private static let enough = 7
    /// How much is kept for judging when the bytes go on at once: the quoted status line is cut at 80 bytes anyway.
    private static let kept = 80

    /// What to do with a read's bytes.
    enum Verdict {
        /// Keep reading: too few to tell, and they are held (not handed on yet).
        case hold
        /// Hand on this read's bytes.
        case pass
        /// Hand on these instead: the held ones with this read's after them.
        case passHeld([UInt8])
        /// The peer is refused for this.
        case refuse(CallStatus)
    }

    private(set) var judged = false
    private var bytes: [UInt8] = []

    /// Whether any byte arrived.
    var sawAny: Bool { self.judged || !self.bytes.isEmpty }

    /// Takes a read's bytes; once there are enough (usually at once: nothing is gathered then), `judge` says what is
    /// wrong with them. `holding`: too few are held back rather than handed on (TLS: OpenSSL would judge a record
    /// header of "HTTP/" first, and say less); else they go on at once (nghttp2 waits for a whole frame header, 9
    /// bytes, before it says anything).
    mutating func take(
        _ bytes: UnsafeRawBufferPointer, holding: Bool, judge: (UnsafeRawBufferPointer) -> CallStatus?
    ) -> Verdict {
        if self.bytes.isEmpty && bytes.count >= Self.enough {
            self.judged = true
            return judge(bytes).map(Verdict.refuse) ?? .pass
        }
        self.bytes.append(contentsOf: holding ? bytes[...] : bytes.prefix(Self.kept - self.bytes.count))
        if self.bytes.count < Self.enough { return holding ? .hold : .pass }
        let held = self.bytes
        if let refusal = self.judgeWhatCame(judge) { return .refuse(refusal) }
        return holding ? .passHeld(held) : .pass
    }

    /// Judges what is gathered, however little (the peer closed): nil when nothing is, or it is fine.
    mutating func judgeWhatCame(_ judge: (UnsafeRawBufferPointer) -> CallStatus?) -> CallStatus? {
        guard !self.judged, !self.bytes.isEmpty else { return nil }
        self.judged = true
        defer { self.bytes = [] }
        return self.bytes.withUnsafeBytes(judge)
    }
}
