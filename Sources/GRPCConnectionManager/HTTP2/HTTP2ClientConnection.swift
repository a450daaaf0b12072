import CNghttp2
import CReactor

#if canImport(Glibc)
import Glibc
#endif

/// What a connection tells its owner (the channel). Called on the reactor thread.
protocol HTTP2ClientConnectionDelegate: AnyObject {
    /// The server's SETTINGS arrived: the connection takes streams.
    func connectionReady(_ connection: HTTP2ClientConnection)
    /// The server sent GOAWAY: no new streams here. `unstarted` calls were never sent and may go elsewhere.
    func connectionDraining(
        _ connection: HTTP2ClientConnection, unstarted: [ClientCall], errorCode: UInt32, debugData: String)
    /// The connection is gone. Its open streams were failed with `reason`; `unstarted` calls were never sent.
    func connectionClosed(_ connection: HTTP2ClientConnection, reason: Status, unstarted: [ClientCall], wasReady: Bool)
    /// The server refused a stream it never processed (REFUSED_STREAM, or above a GOAWAY's last stream id): the
    /// call may be sent again, once, elsewhere (gRFC A6 transparent retry).
    func retryUnprocessed(_ call: ClientCall)
}

/// One HTTP/2 connection to a server over a nonblocking socket, driven by nghttp2 through its memory API so that
/// the reactor owns every byte (nghttp2 `examples/libevent-client.c`, without libevent).
///
/// Reads go straight from the socket into `nghttp2_session_mem_recv` through one reusable buffer. Writes are
/// coalesced: whatever nghttp2 produces during a loop turn is collected at the end of the turn into one buffer
/// and written with one `send` (nghttp2's header advises coalescing `mem_send` chunks with TCP_NODELAY).
///
/// Calls beyond the server's SETTINGS_MAX_CONCURRENT_STREAMS wait in `pending` and start as streams close.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
final class HTTP2ClientConnection: ReactorHandler, @unchecked Sendable {
    enum State: Equatable {
        case idle
        case connecting
        case handshaking
        case ready
        case draining
        case closed
    }

    private enum TimerTag {
        static let connect: UInt64 = 1
        static let keepalive: UInt64 = 2
        static let keepaliveTimeout: UInt64 = 3
    }

    unowned let reactor: Reactor
    weak var delegate: (any HTTP2ClientConnectionDelegate)?
    let address: SocketAddress
    let authority: String
    let configuration: Configuration
    let id: Int
    /// Keepalive interval of this connection (the target's, doubled after `too_many_pings`).
    let keepAliveTime: Duration

    private var keepaliveTimer: Reactor.TimerID = 0
    private var keepaliveTimeoutTimer: Reactor.TimerID = 0
    private var lastReadAt: UInt64 = 0
    /// When a stream last opened or closed: the idle timer compares against it.
    private(set) var lastStreamActivity: UInt64 = 0
    /// Set when keepalive declared the peer dead.
    private(set) var keepaliveTimedOut = false

    /// TLS, when the channel uses it: the context, and the session once TCP is up.
    private let tlsContext: TLSContext?
    private let tlsServerName: String?
    private var tls: TLSSession?

    private(set) var state: State = .idle
    private var fd: Int32 = -1
    private var registration: Reactor.Registration?
    private var interest: UInt32 = 0
    fileprivate var session: OpaquePointer?
    private var connectTimer: Reactor.TimerID = 0

    /// What is waiting for the socket (coalesced per loop turn).
    private var output = SocketOutput()
    private var flushScheduled = false

    /// Open streams. The dictionary owns the calls; nghttp2 holds unretained pointers to them.
    private var streams: [Int32: ClientCall] = [:]
    private var pending: [ClientCall] = []
    private var pendingHead = 0

    /// This connection's fixed request headers (the per-call ones are built in the reactor's `headerScratch`).
    private let headerPrefix: RequestHeaderPrefix
    private var sawFirstBytes = false
    private var goAwayDebug: String?

    init(
        reactor: Reactor, address: SocketAddress, authority: String, configuration: Configuration, id: Int,
        keepAliveTime: Duration? = nil, tls: TLSContext? = nil, tlsServerName: String? = nil
    ) {
        self.tlsContext = tls
        self.tlsServerName = tlsServerName
        self.keepAliveTime = keepAliveTime ?? configuration.keepAliveTime
        self.reactor = reactor
        self.address = address
        self.authority = authority
        self.configuration = configuration
        self.id = id
        self.headerPrefix = RequestHeaderPrefix(
            authority: authority, scheme: tls == nil ? "http" : "https",
            userAgent: configuration.userAgentPrefix.map { "\($0) \(GRPCConnectionManagerVersion.userAgent)" }
                ?? GRPCConnectionManagerVersion.userAgent)
        super.init()
    }

    deinit {
        assert(self.fd < 0, "connection freed with an open socket")
        if let session = self.session { nghttp2_session_del(session) }
    }

    var activeStreamCount: Int { self.streams.count }
    var queuedCallCount: Int { self.pending.count - self.pendingHead }

    // MARK: connecting

    /// Starts the nonblocking connect; the attempt (TCP and the server's SETTINGS) is bounded by
    /// `minConnectTimeout`.
    func connect() {
        precondition(self.state == .idle)
        self.state = .connecting
        self.reactor.addShutdownHook(self)
        let timeout = UInt64(self.configuration.minConnectTimeout.nanoseconds)
        self.connectTimer = self.reactor.scheduleTimer(
            at: Reactor.clock() &+ timeout, handler: self, tag: TimerTag.connect)
        var inProgress: Int32 = 0
        let fd: Int32
        do {
            fd = try self.address.withSockAddr { cr_socket_connect($0, $1, &inProgress) }
        } catch {
            self.close(reason: Status(code: .unavailable, message: "connect to \(self.address) failed: \(error)"))
            return
        }
        if fd < 0 {
            self.close(reason: Self.connectFailure(self.address, errno: -fd))
            return
        }
        self.fd = fd
        if self.address.isTCP {
            // Writes stuck without ACKs fail the connection within the keepalive timeout too (gRFC A18).
            _ = cr_socket_set_user_timeout(fd, UInt32(clamping: self.configuration.keepAliveTimeout.nanoseconds / 1_000_000))
        }
        do {
            self.interest = inProgress != 0 ? Reactor.Events.write : Reactor.Events.read
            self.registration = try self.reactor.register(fd: fd, interest: self.interest, handler: self)
        } catch {
            self.close(reason: Status(code: .unavailable, message: "\(error)"))
            return
        }
        if inProgress == 0 { self.tcpConnected() }
    }

    static func connectFailure(_ address: SocketAddress, errno code: Int32) -> Status {
        Status(code: .unavailable, message: "connect to \(address) failed: \(String(cString: strerror(code)))")
    }

    private func tcpConnected() {
        self.state = .handshaking
        self.setInterest(Reactor.Events.read)
        if let context = self.tlsContext {
            do {
                self.tls = try TLSSession(context: context, serverName: self.tlsServerName, verifyName: self.tlsServerName)
            } catch {
                self.close(reason: Status(code: .unavailable, message: "TLS setup failed: \(error)"))
                return
            }
            self.stepTLSHandshake()
            return
        }
        self.startHTTP2()
    }

    /// Advances the TLS handshake; once it is done and ALPN chose h2, HTTP/2 starts.
    private func stepTLSHandshake() {
        guard let tls = self.tls else { return }
        switch tls.handshake() {
        case .inProgress:
            self.output.takeCiphertext(from: tls)
            self.scheduleFlush()
        case .failed(let reason):
            self.output.takeCiphertext(from: tls)
            let message =
                reason.contains("no application protocol")
                ? "server \(self.address) did not negotiate HTTP/2 through ALPN (no protocol in common with h2): \(reason)"
                : "TLS handshake with \(self.address) failed: \(reason)"
            self.close(reason: Status(code: .unavailable, message: message))
        case .done:
            let alpn = tls.negotiatedProtocol
            guard alpn == "h2" else {
                self.close(
                    reason: Status(
                        code: .unavailable,
                        message: "server \(self.address) did not negotiate HTTP/2 through ALPN (selected "
                            + (alpn.isEmpty ? "nothing" : "\"\(alpn)\"") + ")"))
                return
            }
            self.startHTTP2()
        }
    }

    private func startHTTP2() {
        do {
            self.session = try NGHTTP2ClientSession.make(for: self, configuration: self.configuration)
        } catch {
            self.close(reason: Status(code: .internal, message: "nghttp2 session: \(error)"))
            return
        }
        self.scheduleFlush()
    }

    override func reactorTimerFired(tag: UInt64) {
        switch tag {
        case TimerTag.keepalive:
            self.keepaliveTimer = 0
            self.keepaliveTick()
            return
        case TimerTag.keepaliveTimeout:
            self.keepaliveTimeoutTimer = 0
            guard self.state == .ready || self.state == .draining else { return }
            self.keepaliveTimedOut = true
            self.close(
                reason: Status(
                    code: .unavailable,
                    message: "keepalive: no PING ACK from \(self.address) within \(self.configuration.keepAliveTimeout)"))
            return
        default:
            break
        }
        guard tag == TimerTag.connect else { return }
        self.connectTimer = 0
        if self.state == .connecting || self.state == .handshaking {
            let what = self.state == .connecting ? "TCP connect" : "HTTP/2 handshake (no SETTINGS from the server)"
            self.close(
                reason: Status(
                    code: .unavailable,
                    message: "connect to \(self.address) timed out after \(self.configuration.minConnectTimeout) "
                        + "during the \(what)"))
        }
    }

    // MARK: calls

    /// Starts `call` now if a stream is free, else queues it.
    func enqueue(_ call: ClientCall) {
        call.markWaiting()
        if self.state == .ready && self.hasStreamCapacity {
            self.open(call)
        } else {
            self.pending.append(call)
        }
    }

    private var hasStreamCapacity: Bool {
        guard let session = self.session else { return false }
        let limit = nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)
        return UInt32(self.streams.count) < limit
    }

    private func startPending() {
        while self.pendingHead < self.pending.count && self.state == .ready && self.hasStreamCapacity {
            let call = self.pending[self.pendingHead]
            self.pendingHead += 1
            if !call.isFinished { self.open(call) }
        }
        if self.pendingHead == self.pending.count {
            self.pending.removeAll(keepingCapacity: true)
            self.pendingHead = 0
        } else if self.pendingHead > 1024 && self.pendingHead * 2 > self.pending.count {
            self.pending.removeFirst(self.pendingHead)
            self.pendingHead = 0
        }
    }

    private func takeUnstarted() -> [ClientCall] {
        let calls = self.pending[self.pendingHead...].filter { !$0.isFinished }
        self.pending.removeAll()
        self.pendingHead = 0
        return calls
    }

    private func open(_ call: ClientCall) {
        guard let session = self.session else { return }
        let remainingNanos: Int64? =
            call.deadline == 0 ? nil : Int64(bitPattern: call.deadline &- Reactor.clock())
        if let remaining = remainingNanos, remaining <= 0 {
            call.fail(Status(code: .deadlineExceeded, message: "deadline exceeded before the call was sent"), reset: false)
            return
        }
        let streamID = self.reactor.headerScratch.submit(
            prefix: self.headerPrefix, session: session, path: call.path, timeoutNanos: remainingNanos, metadata: call.metadata,
            previousAttempts: max(call.attempt - 1, 0) + call.previousAttemptsElsewhere, call: Unmanaged.passUnretained(call).toOpaque())
        if streamID < 0 {
            let reason = String(cString: nghttp2_strerror(streamID))
            call.fail(Status(code: .unavailable, message: "could not open a stream: \(reason)"), reset: false)
            return
        }
        self.streams[streamID] = call
        self.lastStreamActivity = self.reactor.now
        call.markOpen(connection: self, streamID: streamID)
        self.scheduleFlush()
    }

    /// Resets a stream (deadline, cancel, receive limit). Its close arrives later through nghttp2.
    func resetStream(_ streamID: Int32, errorCode: UInt32) {
        guard let session = self.session, self.state != .closed else { return }
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, errorCode)
        self.scheduleFlush()
    }

    /// A request stream has new messages or was half-closed: let nghttp2 pull from it again.
    func resumeData(_ streamID: Int32) {
        guard let session = self.session, self.state != .closed else { return }
        nghttp2_session_resume_data(session, streamID)
        self.scheduleFlush()
    }

    /// Gives `bytes` of a stream's received DATA back to the server's stream window (the session runs with
    /// `no_auto_window_update`, so that a slow reader's window closes; the connection window is returned on
    /// arrival in the data callback, so one slow stream never stalls the others).
    func consume(_ streamID: Int32, bytes: Int) {
        guard let session = self.session, self.state != .closed else { return }
        nghttp2_session_consume_stream(session, streamID, bytes)
        self.scheduleFlush()
    }

    /// True once our END_STREAM (or a reset) went out on the stream.
    func isLocallyClosed(_ streamID: Int32) -> Bool {
        guard let session = self.session else { return true }
        return nghttp2_session_get_stream_local_close(session, streamID) != 0
    }

    // MARK: nghttp2 events (from NGHTTP2ClientSession's callbacks)

    func call(for streamID: Int32) -> ClientCall? {
        self.streams[streamID]
    }

    func settingsReceived() {
        if self.state == .handshaking {
            self.state = .ready
            if self.connectTimer != 0 {
                self.reactor.cancelTimer(self.connectTimer)
                self.connectTimer = 0
            }
            self.lastStreamActivity = self.reactor.now
            self.armKeepalive(at: self.reactor.now &+ UInt64(self.keepAliveTime.nanoseconds))
            self.delegate?.connectionReady(self)
        }
        self.startPending()
    }

    // MARK: keepalive (gRFC A8)

    private func armKeepalive(at deadline: UInt64) {
        if self.keepaliveTimer != 0 { self.reactor.cancelTimer(self.keepaliveTimer) }
        self.keepaliveTimer = self.reactor.scheduleTimer(at: deadline, handler: self, tag: TimerTag.keepalive)
    }

    /// Pings when `keepAliveTime` has passed since the last bytes were read (never counted from the last ping
    /// sent, which would trip servers' ping-abuse checks); without streams only when permitted.
    private func keepaliveTick() {
        guard self.state == .ready || self.state == .draining, let session = self.session else { return }
        let interval = UInt64(self.keepAliveTime.nanoseconds)
        let now = self.reactor.now
        if self.streams.isEmpty && !self.configuration.keepAlivePermitWithoutStream {
            self.armKeepalive(at: now &+ interval)
            return
        }
        if now &- self.lastReadAt < interval {
            self.armKeepalive(at: self.lastReadAt &+ interval)
            return
        }
        nghttp2_submit_ping(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nil)
        self.keepaliveTimeoutTimer = self.reactor.scheduleTimer(
            at: now &+ UInt64(self.configuration.keepAliveTimeout.nanoseconds), handler: self,
            tag: TimerTag.keepaliveTimeout)
        self.scheduleFlush()
    }

    func pingAcknowledged() {
        guard self.keepaliveTimeoutTimer != 0 else { return }
        self.reactor.cancelTimer(self.keepaliveTimeoutTimer)
        self.keepaliveTimeoutTimer = 0
        self.armKeepalive(at: self.reactor.now &+ UInt64(self.keepAliveTime.nanoseconds))
    }

    func goAwayReceived(lastStreamID: Int32, errorCode: UInt32, debugData: String) {
        self.goAwayDebug =
            "GOAWAY \(HTTP2ErrorCode.name(errorCode))" + (debugData.isEmpty ? "" : " (\(debugData))")
        guard self.state == .ready || self.state == .handshaking else { return }
        self.state = .draining
        let unstarted = self.takeUnstarted()
        self.delegate?.connectionDraining(self, unstarted: unstarted, errorCode: errorCode, debugData: debugData)
        // Streams above lastStreamID are closed by nghttp2 with REFUSED_STREAM; the rest finish.
    }

    func streamClosed(_ streamID: Int32, errorCode: UInt32) {
        guard let call = self.streams.removeValue(forKey: streamID) else { return }
        self.lastStreamActivity = self.reactor.now
        if errorCode == NGHTTP2_REFUSED_STREAM.rawValue && call.canRetryTransparently, let delegate = self.delegate {
            call.prepareTransparentRetry()
            delegate.retryUnprocessed(call)
        } else {
            call.streamClosed(errorCode: errorCode)
        }
        if self.state == .ready {
            self.startPending()
        }
    }

    // MARK: I/O

    override func reactorFDReady(_ events: UInt32) {
        if self.state == .connecting {
            let error = cr_socket_error(self.fd)
            if error != 0 {
                self.close(reason: Self.connectFailure(self.address, errno: error))
            } else if events & Reactor.Events.write != 0 {
                self.tcpConnected()
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

    private func readAvailable() {
        let buffer = self.reactor.readBuffer
        // Level-triggered: a bounded number of reads per turn keeps one busy connection from starving others.
        for _ in 0..<4 {
            let n = cr_read(self.fd, buffer.baseAddress!, buffer.count)
            if n == -Int(EAGAIN) { return }
            if n < 0 {
                self.close(reason: Status(code: .unavailable, message: "read failed: \(String(cString: strerror(Int32(-n))))"))
                return
            }
            if n == 0 {
                self.close(reason: self.closedByPeerStatus())
                return
            }
            self.lastReadAt = self.reactor.now
            if !self.sawFirstBytes {
                self.sawFirstBytes = true
                if let http1 = Self.detectHTTP1(UnsafeRawBufferPointer(start: buffer.baseAddress, count: n)) {
                    let hint = self.tls == nil ? http1 : "server answered the TLS handshake with HTTP/1.x"
                    self.close(reason: Status(code: .unavailable, message: hint))
                    return
                }
            }
            if let tls = self.tls {
                tls.feed(UnsafeRawBufferPointer(start: buffer.baseAddress, count: n))
                if !tls.handshakeDone {
                    self.stepTLSHandshake()
                    if self.state == .closed || !tls.handshakeDone { return }
                }
                if !self.receiveDecrypted(tls) { return }
            } else {
                guard self.receive(UnsafeRawBufferPointer(start: buffer.baseAddress, count: n)) else { return }
            }
            if self.state == .closed { return }
            self.scheduleFlush()
            if n < buffer.count { return }
        }
    }

    /// Hands plaintext to nghttp2. Returns false when the connection closed.
    private func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let session = self.session, bytes.count > 0 else { return self.state != .closed }
        let consumed = nghttp2_session_mem_recv(session, bytes.baseAddress!.assumingMemoryBound(to: UInt8.self), bytes.count)
        if consumed < 0 {
            self.close(
                reason: Status(
                    code: .unavailable,
                    message: "HTTP/2 protocol error from \(self.address): \(String(cString: nghttp2_strerror(Int32(consumed))))"))
            return false
        }
        return self.state != .closed
    }

    /// Decrypts every complete record and hands the plaintext to nghttp2.
    private func receiveDecrypted(_ tls: TLSSession) -> Bool {
        let plain = self.reactor.plaintextBuffer
        while true {
            let n: Int
            do {
                n = try tls.readPlaintext(into: UnsafeMutableRawBufferPointer(plain))
            } catch {
                self.close(reason: Status(code: .unavailable, message: "TLS error from \(self.address): \(error)"))
                return false
            }
            if n == 0 { return true }
            if n < 0 {
                self.close(reason: self.closedByPeerStatus())
                return false
            }
            guard self.receive(UnsafeRawBufferPointer(start: plain.baseAddress, count: n)) else { return false }
        }
    }

    private func closedByPeerStatus() -> Status {
        let base: String
        switch self.state {
        case .connecting, .handshaking:
            base = "connection to \(self.address) closed by the server during the HTTP/2 handshake"
        default:
            base = "connection to \(self.address) closed by the server"
        }
        if let goAway = self.goAwayDebug { return Status(code: .unavailable, message: "\(base) after \(goAway)") }
        return Status(code: .unavailable, message: base)
    }

    /// A server that speaks HTTP/1.x answers our preface with a status line.
    static func detectHTTP1(_ bytes: UnsafeRawBufferPointer) -> String? {
        let prefix = Array("HTTP/1.".utf8)
        guard bytes.count >= prefix.count, zip(bytes, prefix).allSatisfy({ $0 == $1 }) else { return nil }
        let line = bytes.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }.prefix(80)
        return "server answered with HTTP/1.x, not HTTP/2 (\"\(String(decoding: line, as: UTF8.self))\"); "
            + "is it a gRPC server, and does it need TLS?"
    }

    private func scheduleFlush() {
        if !self.flushScheduled && self.state != .closed {
            self.flushScheduled = true
            self.reactor.scheduleFlush(self)
        }
    }

    override func reactorFlush() {
        self.flushScheduled = false
        self.flushNow()
    }

    /// Pulls everything nghttp2 wants to send into one buffer and writes it with as few syscalls as possible.
    private func flushNow() {
        guard self.fd >= 0, self.state != .connecting else { return }
        guard let session = self.session else {
            // The TLS handshake: only ciphertext is waiting.
            self.writeOutput()
            return
        }
        do {
            try self.output.collect(from: session, tls: self.tls)
        } catch {
            switch error {
            case .http2(let code):
                self.close(reason: Status(code: .internal, message: "nghttp2: \(String(cString: nghttp2_strerror(code)))"))
            default:
                self.close(reason: Status(code: .unavailable, message: "TLS error: \(error)"))
            }
            return
        }
        guard self.writeOutput() else { return }
        if self.output.isDrained && nghttp2_session_want_read(session) == 0
            && nghttp2_session_want_write(session) == 0
        {
            self.close(reason: self.closedByPeerStatus())
            return
        }
        if self.state == .draining && self.streams.isEmpty {
            self.shutdown(reason: Status(code: .unavailable, message: self.goAwayDebug ?? "connection drained"))
        }
    }

    /// Writes what is waiting; asks for writability while the socket is full (or nghttp2 has more than the cap
    /// let through). False when the connection closed.
    @discardableResult
    private func writeOutput() -> Bool {
        do {
            try self.output.write(to: self.fd)
        } catch {
            let errno: Int32
            if case .write(let code) = error { errno = code } else { errno = EIO }
            self.close(reason: Status(code: .unavailable, message: "write failed: \(String(cString: strerror(errno)))"))
            return false
        }
        let moreFromHTTP2 = self.session.map { nghttp2_session_want_write($0) != 0 } ?? false
        self.setInterest(
            self.output.isDrained && !moreFromHTTP2 ? Reactor.Events.read : Reactor.Events.read | Reactor.Events.write)
        return true
    }

    private func setInterest(_ interest: UInt32) {
        guard interest != self.interest, let registration = self.registration else { return }
        self.interest = interest
        self.reactor.setInterest(registration, interest)
    }

    // MARK: closing

    /// Takes no new streams, tells the server with GOAWAY, and closes once the open streams finish.
    func beginGracefulClose() {
        guard let session = self.session, self.state == .ready || self.state == .handshaking else {
            if self.state != .draining { self.close(reason: Status(code: .unavailable, message: "connection closed")) }
            return
        }
        self.state = .draining
        nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, NGHTTP2_NO_ERROR.rawValue, nil, 0)
        let unstarted = self.takeUnstarted()
        for call in unstarted {
            call.finish(UnaryResponse(status: Status(code: .unavailable, message: "connection is closing")))
        }
        self.scheduleFlush()
    }

    /// Closes gracefully: a GOAWAY goes out first (best effort), then the socket closes.
    func shutdown(reason: Status) {
        if let session = self.session, self.fd >= 0, self.state != .closed {
            nghttp2_session_terminate_session(session, NGHTTP2_NO_ERROR.rawValue)
            try? self.output.collect(from: session, tls: self.tls)
            if let tls = self.tls {
                tls.shutdown()  // close_notify
                self.output.takeCiphertext(from: tls)
            }
            self.output.writeOnce(to: self.fd)
        }
        self.close(reason: reason)
    }

    /// Closes now: every open stream fails with `reason`; calls never sent go back to the delegate.
    func close(reason: Status) {
        if self.state == .closed { return }
        let wasReady = self.state == .ready || self.state == .draining
        self.state = .closed
        for timer in [self.connectTimer, self.keepaliveTimer, self.keepaliveTimeoutTimer] where timer != 0 {
            self.reactor.cancelTimer(timer)
        }
        self.connectTimer = 0
        self.keepaliveTimer = 0
        self.keepaliveTimeoutTimer = 0
        if let registration = self.registration {
            self.reactor.deregister(registration, handler: self)
            self.registration = nil
        }
        if self.fd >= 0 {
            _ = cr_close(self.fd)
            self.fd = -1
        }
        self.reactor.removeShutdownHook(self)
        let open = self.streams
        self.streams.removeAll()
        if let session = self.session {
            nghttp2_session_del(session)
            self.session = nil
        }
        self.output.reset()
        self.tls = nil
        for (_, call) in open.sorted(by: { $0.key < $1.key }) {
            call.finish(UnaryResponse(status: reason))
        }
        let unstarted = self.takeUnstarted()
        self.delegate?.connectionClosed(self, reason: reason, unstarted: unstarted, wasReady: wasReady)
    }

    /// The reactor is stopping.
    override func reactorRunSubmitted() {
        self.close(reason: Status(code: .unavailable, message: "the reactor is shutting down"))
    }
}

extension Duration {
    /// Whole nanoseconds, saturating.
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = self.components
        let (ns, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? Int64.min : Int64.max }
        return ns &+ attoseconds / 1_000_000_000
    }
}
