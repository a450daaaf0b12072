import CNghttp2
import CReactor
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// One HTTP/2 client connection: an `HTTP2Socket` plus what only a client does (connect with a bounded attempt,
/// check ALPN and spot HTTP/1.x answers, keep the connection alive with PINGs, open streams for handlers and route
/// nghttp2's stream events to them).
///
/// It knows streams, not calls: a stream is opened for an `HTTP2StreamHandler` with a `RequestHead`, and everything
/// nghttp2 reports for it goes to that handler until it closes or its owner resets it.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class HTTP2ClientConnection: ReactorHandler, HTTP2Transport, HTTP2SocketOwner, @unchecked Sendable {
    package enum State: Equatable {
        case idle
        case connecting
        case ready
        case draining
        case closed
    }

    private enum TimerTag {
        static let connect: UInt64 = 1
        static let keepalive: UInt64 = 2
        static let keepaliveTimeout: UInt64 = 3
        static let idleTrim: UInt64 = 4
    }

    /// How long a connection without streams waits before it gives its idle memory back (`trimIdleMemory`): long
    /// enough that a busy connection between two calls never pays for it.
    static let idleTrimDelay: UInt64 = 1_000_000_000

    package unowned let reactor: Reactor
    /// The same reactor, read unretained on the loop's own paths (see `Reactor`).
    private let loopReactor: Unmanaged<Reactor>
    /// Unowned, not weak (a weak reference would put the subchannel's every retain on the slow path): the subchannel
    /// owns this connection and detaches itself before it goes.
    @exclusivity(unchecked)
    package unowned(unsafe) var delegate: (any HTTP2TransportDelegate)?
    @exclusivity(unchecked)
    package var streamDemand: StreamDemand?
    package let address: NetworkAddress
    package let id: Int
    package let settings: HTTP2ClientSettings
    /// Keepalive interval of this connection (the target's, doubled after `too_many_pings`).
    package let keepAliveTime: Duration

    private let tls: TLSContextSource?
    private let tlsServerName: String?
    @exclusivity(unchecked)
    private var socket: HTTP2Socket?
    @exclusivity(unchecked)
    package private(set) var state: State = .idle
    @exclusivity(unchecked)
    private var connectTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var keepaliveTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var keepaliveTimeoutTimer: Reactor.TimerID = 0
    /// Streams nghttp2 is about to reset for something the server sent (`noteStreamViolation`); usually empty.
    @exclusivity(unchecked)
    private var streamViolations: [Int32: String] = [:]
    /// When the keepalive PING went out (the timeout counts from it).
    @exclusivity(unchecked)
    private var pingSentAt: UInt64 = 0
    /// The socket's `bytesAcknowledged` when the keepalive PING was submitted, or when its timeout was last extended
    /// (nil: not known, as on a Unix socket).
    @exclusivity(unchecked)
    private var acknowledgedAtPing: Int64?
    @exclusivity(unchecked)
    private var idleTrimTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var lastReadAt: UInt64 = 0
    /// DATA bytes of the read nghttp2 is processing, given back to the connection's window in one call once it
    /// returns (`socketDidRead`): one `nghttp2_session_consume_connection` a read, not one a DATA frame (about 50
    /// instructions a call at 64 calls in flight). The WINDOW_UPDATE goes out at the same flush either way.
    @exclusivity(unchecked)
    var arrivedDataBytes = 0
    /// See `HTTP2Transport.lastStreamActivity` (not stamped when a stream opens: one reactor read less a call).
    @exclusivity(unchecked)
    package private(set) var lastStreamActivity: UInt64 = 0
    /// Set when keepalive declared the peer dead.
    @exclusivity(unchecked)
    package private(set) var keepaliveTimedOut = false
    @exclusivity(unchecked)
    private var goAwayDetail: String?

    /// Open streams and their handlers. nghttp2 knows them by id only: its callbacks find the handler here. (A
    /// one-entry cache in front of the table cost more than it saved: with many streams in flight, callbacks alternate
    /// between streams, and every miss paid a retain and a release to refill it, where a lookup is a shift, a mask
    /// and a compare.)
    @exclusivity(unchecked)
    private var streams = StreamTable()
    /// At the socket's close: the open streams whose requests never left (see `socketClosing`).
    private var neverSent: Set<Int32> = []
    /// Streams submitted and not yet closed by nghttp2, reset ones included: what counts against the server's
    /// MAX_CONCURRENT_STREAMS.
    @exclusivity(unchecked)
    private var streamsOnWire = 0
    /// Streams submitted whose request body nghttp2 has not asked for yet (`HTTP2StreamHandler.bodyUnasked`): their
    /// HEADERS are queued or sent, their first DATA frame is not. nghttp2 sends every queued HEADERS frame before any
    /// DATA, so while the socket backs up (a server that reads slower than calls start), new calls' HEADERS would keep
    /// going out ahead of the bodies of the calls before them, and the server would get requests it can never answer:
    /// under overload, none completed. At `maxStreamsWithBodyUnasked`, new calls wait for a stream (`availableStreams`)
    /// until nghttp2 has asked for the bodies before them, as grpc-go's writer interleaves a HEADERS frame with DATA.
    @exclusivity(unchecked)
    private var streamsWithBodyUnasked = 0
    /// Set when nghttp2 asked for a body while `streamsWithBodyUnasked` was at the cap: after the flush, waiting calls
    /// are told there is room (`socketDidFlush`), not from inside nghttp2's `mem_send`.
    @exclusivity(unchecked)
    private var bodyAskedAtCap = false
    /// Handlers taken out of `streams` by a reset or by the connection's end, kept until the turn's deferred phase:
    /// nghttp2's callbacks hold no reference of their own to the handler they call (`handler(for:)`), and the reset
    /// may come from inside one of them, from the handler itself.
    @exclusivity(unchecked)
    private var retired: [HTTP2StreamHandler] = []

    private let headerPrefix: RequestHeaderPrefix
    private let scratch: HeaderScratchBox
    private let blockCache: HTTP2BlockCache

    /// - Parameters:
    ///   - authority: `:authority` of every request.
    ///   - tls: Where the TLS context comes from (nil: plaintext h2c), and the name for SNI and verification.
    package init(
        reactor: Reactor, address: NetworkAddress, authority: String, id: Int, settings: HTTP2ClientSettings,
        keepAliveTime: Duration? = nil, tls: TLSContextSource? = nil, tlsServerName: String? = nil
    ) {
        self.reactor = reactor
        self.loopReactor = Unmanaged.passUnretained(reactor)
        self.address = address
        self.id = id
        self.settings = settings
        self.keepAliveTime = keepAliveTime ?? settings.keepAliveTime
        self.tls = tls
        self.tlsServerName = tlsServerName
        self.headerPrefix = reactor.shared { RequestHeaderPrefixCache() }.prefix(
            authority: authority, scheme: tls == nil ? "http" : "https", userAgent: settings.userAgent,
            acceptEncoding: settings.acceptEncoding)
        self.scratch = reactor.shared { HeaderScratchBox() }
        self.blockCache = reactor.shared { HTTP2BlockCache() }
        super.init()
    }

    deinit {
        // Dropped without closing (its owner went away): the socket must not call back into this object.
        if let socket = self.socket {
            socket.detachOwner()
            socket.close(reason: CallStatus(code: .unavailable, message: "connection abandoned"))
        }
    }

    package var openStreamCount: Int { self.streams.count }

    /// The allocator of the connection's nghttp2 session (nil before HTTP/2 starts).
    package var sessionMemory: HTTP2SessionMemory? { self.socket?.sessionMemory }
    /// DATA frames of request bodies that went to the socket's output without nghttp2's copy (tests).
    package var directDataFrames: Int { self.socket?.directDataFrames ?? 0 }
    /// Bytes the TLS session's memory BIOs hold allocated (tests; nil without TLS).
    package var tlsBufferCapacity: Int? { self.socket?.tls?.bufferCapacity }

    /// Streams a connection may have whose request body nghttp2 has not asked for (see `streamsWithBodyUnasked`). A
    /// burst larger than this goes out in rounds within one turn of the loop (each flush lets the next round in).
    static let maxStreamsWithBodyUnasked = 256

    package var atServerStreamLimit: Bool {
        guard self.state == .ready, let session = self.socket?.session else { return false }
        return self.streamsOnWire
            >= Int(nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS))
    }

    package var availableStreams: Int {
        guard self.state == .ready, let session = self.socket?.session else { return 0 }
        let limit = Int(nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS))
        return max(0, min(limit - self.streamsOnWire, Self.maxStreamsWithBodyUnasked - self.streamsWithBodyUnasked))
    }

    // MARK: connecting

    /// Starts the nonblocking connect; the attempt (TCP, TLS and the server's SETTINGS) is bounded by
    /// `settings.connectTimeout`.
    package func connect() {
        precondition(self.state == .idle)
        self.state = .connecting
        self.connectTimer = self.reactor.scheduleTimer(
            at: Reactor.clock() &+ UInt64(max(self.settings.connectTimeout.nanoseconds, 0)), handler: self,
            tag: TimerTag.connect)
        var tls: TLSSession?
        if let source = self.tls {
            // The files as they are now: a certificate rotated on disk reaches this handshake.
            let choice = source.choose()
            if choice.refusedNow, let refusal = choice.refusal {
                self.delegate?.transportTLSFilesRefused(self, reason: refusal)
            }
            do {
                tls = try TLSSession(
                    context: choice.context, serverName: self.tlsServerName, verifyName: self.tlsServerName)
            } catch {
                self.connectionEnded(CallStatus(code: .unavailable, message: "TLS setup for \(self.address) failed: \(error)"))
                return
            }
        }
        let socket = HTTP2Socket(reactor: self.reactor, owner: self, peer: "\(self.address)", tls: tls)
        self.socket = socket
        socket.connect(to: self.address, userTimeout: self.settings.keepAliveTimeout)
    }

    package func socketReceivedFirstBytes(_ bytes: UnsafeRawBufferPointer) -> CallStatus? {
        Self.firstBytesProblem(bytes, tls: self.tls != nil).map { CallStatus(code: .unavailable, message: $0) }
    }

    package func socketReceivedFirstPlaintext(_ bytes: UnsafeRawBufferPointer) -> CallStatus? {
        Self.firstPlaintextProblem(bytes).map { CallStatus(code: .unavailable, message: $0) }
    }

    /// nghttp2 found the peer's input wrong (a callback, from inside `mem_recv`): the socket keeps it for the status
    /// of the close that follows when nghttp2 ends the session itself.
    func noteProtocolError(_ message: String) {
        self.socket?.protocolError = message
    }

    /// What the server did wrong on `streamID`, which nghttp2 then resets (`streamClosed` reports it).
    func noteStreamViolation(_ streamID: Int32, _ violation: String) {
        self.streamViolations[streamID] = violation
    }

    package func socketSecured(_ tls: TLSSession) -> CallStatus? {
        let alpn = tls.negotiatedProtocol
        guard alpn == "h2" else {
            return CallStatus(
                code: .unavailable,
                message: "server \(self.address) did not negotiate HTTP/2 through ALPN (selected "
                    + (alpn.isEmpty ? "nothing" : "\"\(alpn)\"") + ")")
        }
        return nil
    }

    package func socketReadyForHTTP2() {
        guard let socket = self.socket else { return }
        do {
            let memory = HTTP2SessionMemory(cache: self.blockCache)
            socket.session = try HTTP2ClientSessionFactory.make(for: self, settings: self.settings, memory: memory)
            socket.sessionMemory = memory
        } catch {
            socket.close(reason: CallStatus(code: .internal, message: "nghttp2 session: \(error)"))
        }
    }

    /// See `HTTP2Socket.fixSendBuffer` (tests).
    package func fixSendBuffer(bytes: Int32) { self.socket?.fixSendBuffer(bytes: bytes) }

    package func socketDidRead() {
        self.lastReadAt = self.loopReactor._withUnsafeGuaranteedRef { $0.now }
        if self.arrivedDataBytes > 0 {
            if let session = self.socket?.session { nghttp2_session_consume_connection(session, self.arrivedDataBytes) }
            self.arrivedDataBytes = 0
        }
    }

    package func socketDidFlush() {
        if self.state == .draining && self.streamsOnWire == 0 {
            self.socket?.shutdown(reason: CallStatus(code: .unavailable, message: self.goAwayDetail ?? "connection drained"))
        }
        if self.bodyAskedAtCap {
            self.bodyAskedAtCap = false
            if self.state == .ready && self.streamDemand?.waiting != false { self.delegate?.transportHasCapacity(self) }
        }
    }

    package func socketClosing(session: OpaquePointer) {
        // A request never left when nghttp2 never wrote its HEADERS out (it makes a request's stream object only
        // then), or when no byte of the output from its submission on reached the kernel: its frames still sat in
        // the socket's output (a peer that stopped reading, behind a full kernel buffer).
        self.neverSent = []
        guard let socket = self.socket else { return }
        for (id, mark) in self.streams.marks
        where nghttp2_session_find_stream(session, id) == nil || !socket.outputMayHaveWritten(from: mark) {
            self.neverSent.insert(id)
        }
    }

    package func socketClosed(_ reason: CallStatus) {
        self.connectionEnded(reason)
    }

    /// What the server's first bytes say when they are not what a connection must start with: a TLS record (handshake
    /// or alert) after our ClientHello; without TLS, a SETTINGS frame (RFC 9113 §3.4). A server that speaks HTTP/1.x,
    /// a TLS server reached without TLS, an h2c server reached with it, or something else altogether, said in words.
    /// nil when they start as they should (or there are too few of them to tell).
    package static func firstBytesProblem(_ bytes: UnsafeRawBufferPointer, tls: Bool) -> String? {
        if let quoted = Self.http1StatusLine(bytes) {
            return tls
                ? "server answered the TLS handshake with HTTP/1.x (\(quoted)): it does not use TLS on this port"
                : "server answered with HTTP/1.x, not HTTP/2 (\(quoted)); is it a gRPC server, and does it need TLS?"
        }
        guard bytes.count >= 4 else { return nil }
        let looksLikeTLS = (bytes[0] == 0x15 || bytes[0] == 0x16) && bytes[1] == 0x03
        let looksLikeSettings = Self.startsWithSettings(bytes)
        if tls {
            if looksLikeTLS { return nil }
            if looksLikeSettings {
                return "server answered the TLS handshake with HTTP/2 in plaintext: it does not use TLS on this port (h2c)"
            }
            return "server answered the TLS handshake with bytes that are not TLS (\(Self.preview(bytes)))"
        }
        if looksLikeSettings { return nil }
        if looksLikeTLS { return "server answered with TLS: it expects TLS on this port" }
        return "server's first bytes are not HTTP/2 (\(Self.preview(bytes))); is it a gRPC server, and does it need TLS?"
    }

    /// Why the first bytes decrypted after a TLS handshake that chose h2 are not HTTP/2, or nil when they may be:
    /// a TLS terminator that offers h2 for an HTTP/1.1 server behind it answers this way.
    package static func firstPlaintextProblem(_ bytes: UnsafeRawBufferPointer) -> String? {
        if let quoted = Self.http1StatusLine(bytes) {
            return "server negotiated HTTP/2 through ALPN, then answered with HTTP/1.x (\(quoted)):"
                + " a TLS proxy in front of a server that does not speak HTTP/2?"
        }
        guard bytes.count >= 9, !Self.startsWithSettings(bytes) else { return nil }
        return "server negotiated HTTP/2 through ALPN, then sent bytes that are not HTTP/2 (\(Self.preview(bytes)))"
    }

    /// The first line of an HTTP/1.x answer, quoted (up to 80 bytes); nil when the bytes are not one.
    private static func http1StatusLine(_ bytes: UnsafeRawBufferPointer) -> String? {
        guard bytes.starts(with: "HTTP/1.".utf8) else { return nil }
        let line = bytes.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }.prefix(80)
        return "\"\(String(decoding: line, as: UTF8.self))\""
    }

    /// A frame header's type at byte 3 is SETTINGS and its stream id (bytes 5 to 8, those that arrived) is 0.
    private static func startsWithSettings(_ bytes: UnsafeRawBufferPointer) -> Bool {
        bytes.count >= 4 && bytes[3] == 0x04 && bytes.dropFirst(5).prefix(4).allSatisfy { $0 == 0 }
    }

    /// Up to 32 bytes as quoted text, printable ASCII as it is and the rest as \xNN.
    private static func preview(_ bytes: UnsafeRawBufferPointer) -> String {
        var text = "\""
        for byte in bytes.prefix(32) {
            if byte >= 0x20 && byte < 0x7F && byte != UInt8(ascii: "\"") && byte != UInt8(ascii: "\\") {
                text.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                text += "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
            }
        }
        return text + (bytes.count > 32 ? "...\"" : "\"")
    }

    package override func reactorTimerFired(tag: UInt64) {
        switch tag {
        case TimerTag.keepalive:
            self.keepaliveTimer = 0
            self.keepaliveTick()
        case TimerTag.idleTrim:
            self.idleTrimTimer = 0
            self.idleTrimTick()
        case TimerTag.keepaliveTimeout:
            self.keepaliveTimeoutTimer = 0
            guard self.state == .ready || self.state == .draining else { return }
            // Bytes read since the PING went out are a sign of life too (grpc-go's rule): a server streaming to us
            // whose ACK is late (or never sent) is not dead. Only silence closes the connection.
            if self.lastReadAt > self.pingSentAt {
                self.armKeepalive(at: self.lastReadAt &+ UInt64(self.keepAliveTime.nanoseconds))
                return
            }
            // So are bytes of ours that the server's TCP acknowledged since (TCP_INFO) while the PING itself has not
            // reached it: behind an upload on a slow link (a megabyte of output and the kernel's buffers ahead of it)
            // the PING leaves late (nghttp2 may hold it until the output has room), and its ACK with it. The wait
            // goes on while the server's TCP takes the bytes ahead of the PING, and ends a timeout after it has the
            // PING: a frozen server (its kernel still acknowledging) or a proxy acknowledging for its backend gains
            // at most the backlog's time (nothing is produced past a PING nghttp2 still holds); a dead one
            // acknowledges nothing.
            if let acknowledged = self.socket?.bytesAcknowledged, let before = self.acknowledgedAtPing,
                acknowledged > before, self.socket?.pingEnd.map({ acknowledged < $0 }) ?? true
            {
                self.acknowledgedAtPing = acknowledged
                self.keepaliveTimeoutTimer = self.reactor.scheduleTimer(
                    at: self.reactor.now &+ UInt64(self.settings.keepAliveTimeout.nanoseconds), handler: self,
                    tag: TimerTag.keepaliveTimeout)
                return
            }
            self.keepaliveTimedOut = true
            self.close(
                reason: CallStatus(
                    code: .unavailable,
                    message: "keepalive: no PING ACK from \(self.address) within \(self.settings.keepAliveTimeout)"))
        case TimerTag.connect:
            self.connectTimer = 0
            guard self.state == .connecting else { return }
            let phase: String
            switch self.socket?.state {
            case .connecting: phase = "TCP connect"
            case .securing: phase = "TLS handshake"
            default: phase = "HTTP/2 handshake (no SETTINGS from the server)"
            }
            self.close(
                reason: CallStatus(
                    code: .unavailable,
                    message: "connect to \(self.address) timed out after \(self.settings.connectTimeout) during the \(phase)"))
        default:
            break
        }
    }

    // MARK: streams

    /// The largest request header block nghttp2 is let send. A larger one nghttp2 would close as REFUSED_STREAM,
    /// which reads as the server's refusal (and is retried): `openStream` refuses it first, with this limit's name.
    static let maxSendHeaderBlockLength = 64 << 10

    package func openStream(_ head: inout RequestHead, handler: HTTP2StreamHandler) -> OpenStreamResult {
        guard self.state == .ready, let session = self.socket?.session else { return .tryElsewhere }
        let peerLimit = nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE)
        // A header list's size (RFC 9113: names, values and 32 per field) is never below its encoded block's length
        // (HPACK writes a string literally when Huffman would be longer): within it, the block fits nghttp2's limit.
        let ownLimit = UInt32(Self.maxSendHeaderBlockLength)
        let result = self.scratch.scratch.submit(
            prefix: self.headerPrefix, session: session, head: head,
            source: Unmanaged.passUnretained(self).toOpaque(), maxHeaderListSize: min(peerLimit, ownLimit))
        switch result {
        case .submitted(let streamID):
            self.streams.insert(handler, for: streamID, mark: self.socket?.outputMark ?? 0)
            self.streamsOnWire += 1
            handler.bodyUnasked = true
            self.streamsWithBodyUnasked += 1
            self.socket?.scheduleFlush()
            if nghttp2_session_get_next_stream_id(session) > UInt32(Int32.max) - 2 {
                // The last stream id of this connection is taken: drain it, as after a GOAWAY; a new one opens.
                self.startDraining(errorCode: 0, debugData: "stream ids exhausted")
            }
            return .opened(HTTP2StreamHandle(streamID: streamID, control: self))
        case .headerListTooLarge(let size):
            let limit =
                peerLimit <= ownLimit
                ? "the server's SETTINGS_MAX_HEADER_LIST_SIZE of \(peerLimit) bytes"
                : "the \(ownLimit) bytes this client sends in one header block"
            return .failed(CallStatus(code: .internal, message: "request headers of \(size) bytes exceed \(limit)"))
        case .error(let code) where code == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE.rawValue:
            self.startDraining(errorCode: 0, debugData: "stream ids exhausted")
            return .tryElsewhere
        case .error(let code) where code == NGHTTP2_ERR_INVALID_ARGUMENT.rawValue:
            return .failed(CallStatus(code: .internal, message: "request headers refused by nghttp2: \(String(cString: nghttp2_strerror(code)))"))
        case .error(let code):
            return .failed(CallStatus(code: .unavailable, message: "could not open a stream: \(String(cString: nghttp2_strerror(code)))"))
        }
    }

    /// The handler of an open stream (nil once it closed or was reset), not retained: call it through
    /// `_withUnsafeGuaranteedRef`, within the callback that looked it up. It stays valid that long because the table
    /// holds it, and a handler leaving the table other than by `streamClosed` is kept in `retired` until the
    /// deferred phase.
    @inline(__always)
    func handler(for streamID: Int32) -> Unmanaged<HTTP2StreamHandler>? {
        self.streams.unretained(streamID)
    }

    /// nghttp2 sends a DATA frame of `length` payload bytes that the stream's handler announced as `.later`.
    /// - Returns: nghttp2's answer: 0, `NGHTTP2_ERR_PAUSE` (sent, and the output is full), or
    ///   `NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE` (the stream's bytes are gone: nghttp2 resets it).
    func sendRequestData(streamID: Int32, header: UnsafeRawBufferPointer, length: Int) -> Int32 {
        guard let handler = self.handler(for: streamID), let socket = self.socket else {
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue
        }
        return socket.appendDataFrame(header: header, length: length) { sink in
            handler._withUnsafeGuaranteedRef { $0.streamWriteRequest(length: length, to: sink) }
        }
    }

    /// nghttp2 asks stream `streamID`'s handler for the next DATA frame of its request body (see
    /// `HTTP2StreamHandler.streamReadRequest`); nil when the stream has no handler any more.
    @inline(__always)
    func readRequest(
        _ streamID: Int32, into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool
    ) -> RequestBodyRead? {
        guard let handler = self.handler(for: streamID) else { return nil }
        return handler._withUnsafeGuaranteedRef { handler in
            if handler.bodyUnasked { self.bodyAsked(handler) }
            return handler.streamReadRequest(into: buffer, length: length, eof: &eof)
        }
    }

    private func bodyAsked(_ handler: HTTP2StreamHandler) {
        handler.bodyUnasked = false
        if self.streamsWithBodyUnasked == Self.maxStreamsWithBodyUnasked { self.bodyAskedAtCap = true }
        self.streamsWithBodyUnasked -= 1
    }

    private func detach(_ streamID: Int32) -> HTTP2StreamHandler? {
        let handler = self.streams.remove(streamID)
        if let handler, handler.bodyUnasked { self.bodyAsked(handler) }
        return handler
    }

    /// Keeps `handler` alive until the deferred phase (see `retired`). Once the reactor has stopped no callback runs
    /// and no deferred phase comes: the handler goes at once.
    private func retire(_ handler: HTTP2StreamHandler) {
        if self.reactor.isStopped { return }
        if self.retired.isEmpty { self.reactor.enqueueDeferred(self) }
        self.retired.append(handler)
    }

    package override func reactorRunDeferred() {
        // Swapped out first: a handler's deinit may let go of something that resets another stream here.
        var dropping: [HTTP2StreamHandler] = []
        swap(&dropping, &self.retired)
    }

    package func resetStream(_ streamID: Int32, errorCode: UInt32) {
        if let handler = self.detach(streamID) { self.retire(handler) }
        guard let session = self.socket?.session, self.state != .closed else { return }
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, errorCode)
        self.socket?.scheduleFlush()
    }

    package func resumeStream(_ streamID: Int32) {
        guard let session = self.socket?.session, self.state != .closed else { return }
        nghttp2_session_resume_data(session, streamID)
        self.socket?.scheduleFlush()
    }

    /// The stream's handler consumed `bytes` later than they arrived (an async reader caught up): see
    /// `giveBackWindow`.
    package func consumeStream(_ streamID: Int32, bytes: Int) {
        guard let session = self.socket?.session else { return }
        if self.giveBackWindow(bytes, of: streamID, in: session) { self.socket?.scheduleFlush() }
    }

    /// `bytes` of stream `streamID`'s DATA were consumed: they go back to the server's stream window, in batches of up
    /// to a quarter of the window (at most 16 KiB). A small response is never reported: its stream ends first, and the
    /// call saves nghttp2's bookkeeping. No stall can come of it: the server, having sent the whole window, has had at
    /// least three quarters reported, past the half at which nghttp2 sends WINDOW_UPDATE. True when a batch went to
    /// nghttp2 (its WINDOW_UPDATE leaves with the next flush).
    ///
    /// Called from nghttp2's DATA callback, with its `session`, for what the handler consumed on arrival (its return
    /// value): the read that delivered the bytes schedules the flush.
    @discardableResult
    func giveBackWindow(_ bytes: Int, of streamID: Int32, in session: OpaquePointer) -> Bool {
        guard self.state != .closed, let due = self.streams.addConsumed(bytes, to: streamID, batch: self.consumeBatch)
        else { return false }
        nghttp2_session_consume_stream(session, streamID, due)
        return true
    }

    private var consumeBatch: Int { max(1, min(16 << 10, self.settings.initialStreamWindowSize / 4)) }

    package func isLocallyClosed(_ streamID: Int32) -> Bool {
        guard let session = self.socket?.session else { return true }
        return nghttp2_session_get_stream_local_close(session, streamID) != 0
    }

    /// Bytes held by the socket's output buffer (tests of its bound).
    package var outputHeldBytes: Int { self.socket?.outputHeldBytes ?? 0 }
    /// See `HTTP2Socket.outputMark` (tests).
    package var outputMark: Int { self.socket?.outputMark ?? 0 }

    /// For tests: makes the next stream id `id` (to reach the end of the id space without two billion streams).
    package func setNextStreamID(_ id: Int32) {
        guard let session = self.socket?.session else { return }
        _ = nghttp2_session_set_next_stream_id(session, id)
    }

    // MARK: nghttp2 events (from the callbacks)

    func settingsReceived() {
        if self.state == .connecting {
            self.state = .ready
            if self.connectTimer != 0 {
                self.reactor.cancelTimer(self.connectTimer)
                self.connectTimer = 0
            }
            self.lastStreamActivity = self.reactor.now
            self.lastReadAt = self.reactor.now
            self.armKeepalive(at: self.reactor.now &+ UInt64(self.keepAliveTime.nanoseconds))
            self.delegate?.transportReady(self)
            return
        }
        if self.state == .ready && self.streamDemand?.waiting != false { self.delegate?.transportHasCapacity(self) }
    }

    func goAwayReceived(lastStreamID: Int32, errorCode: UInt32, debugData: String) {
        self.goAwayDetail = "GOAWAY \(HTTP2ErrorCode.name(errorCode))" + (debugData.isEmpty ? "" : " (\(debugData))")
        self.socket?.closeDetail = self.goAwayDetail
        // Streams above lastStreamID are closed by nghttp2 with REFUSED_STREAM; the rest finish.
        self.startDraining(errorCode: errorCode, debugData: debugData, tookStreams: lastStreamID > 0)
    }

    private func startDraining(errorCode: UInt32, debugData: String, tookStreams: Bool = true) {
        guard self.state == .ready || self.state == .connecting else { return }
        self.state = .draining
        self.delegate?.transportDraining(self, errorCode: errorCode, debugData: debugData, tookStreams: tookStreams)
        self.socket?.scheduleFlush()
    }

    func streamClosed(_ streamID: Int32, errorCode: UInt32) {
        self.streamsOnWire -= 1
        // A stream its owner reset has no handler any more; its slot frees all the same.
        let handler = self.detach(streamID)
        if handler?.isBackground != true {
            self.lastStreamActivity = self.loopReactor._withUnsafeGuaranteedRef { $0.now }
        }
        if !self.streamViolations.isEmpty, let violation = self.streamViolations.removeValue(forKey: streamID) {
            // nghttp2 reset it for what the server sent: say so, not "server reset the stream".
            handler?.streamFailed(
                CallStatus(
                    code: .internal,
                    message: "the server broke HTTP/2 on the stream (\(violation)); this client reset it (\(HTTP2ErrorCode.name(errorCode)))"),
                unprocessed: false)
        } else {
            handler?.streamClosed(errorCode: errorCode)
        }
        if self.streamsOnWire == 0 && self.idleTrimTimer == 0 && self.state == .ready {
            self.idleTrimTimer = self.reactor.scheduleTimer(
                at: self.reactor.now &+ Self.idleTrimDelay, handler: self, tag: TimerTag.idleTrim)
        }
        if self.state == .ready && self.streamDemand?.waiting != false { self.delegate?.transportHasCapacity(self) }
    }

    /// A second after the last stream closed (or later, if streams came and went since): an idle connection gives
    /// back its frame buffer's pages; a busy one does nothing (its next idle moment arms this again).
    private func idleTrimTick() {
        guard self.state == .ready, self.streamsOnWire == 0 else { return }
        let due = self.lastStreamActivity &+ Self.idleTrimDelay
        if self.reactor.now >= due {
            self.streams.releaseMemoryIfEmpty()
            self.socket?.trimIdleMemory()
        } else {
            self.idleTrimTimer = self.reactor.scheduleTimer(at: due, handler: self, tag: TimerTag.idleTrim)
        }
    }

    // MARK: keepalive (gRFC A8)

    private func armKeepalive(at deadline: UInt64) {
        if self.keepaliveTimer != 0 { self.reactor.cancelTimer(self.keepaliveTimer) }
        self.keepaliveTimer = self.reactor.scheduleTimer(at: deadline, handler: self, tag: TimerTag.keepalive)
    }

    /// Pings when `keepAliveTime` has passed since the last bytes were read (never counted from the last ping
    /// sent, which would trip servers' ping-abuse checks); without streams only when permitted.
    private func keepaliveTick() {
        guard self.state == .ready || self.state == .draining, let session = self.socket?.session else { return }
        let interval = UInt64(self.keepAliveTime.nanoseconds)
        let now = self.reactor.now
        if self.streams.isEmpty && !self.settings.keepAlivePermitWithoutStream {
            self.armKeepalive(at: now &+ interval)
            return
        }
        if now &- self.lastReadAt < interval {
            self.armKeepalive(at: self.lastReadAt &+ interval)
            return
        }
        nghttp2_submit_ping(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nil)
        self.pingSentAt = now
        self.acknowledgedAtPing = self.socket?.bytesAcknowledged
        self.socket?.pingEnd = nil
        self.keepaliveTimeoutTimer = self.reactor.scheduleTimer(
            at: now &+ UInt64(self.settings.keepAliveTimeout.nanoseconds), handler: self,
            tag: TimerTag.keepaliveTimeout)
        self.socket?.scheduleFlush()
    }

    func pingAcknowledged() {
        guard self.keepaliveTimeoutTimer != 0 else { return }
        self.reactor.cancelTimer(self.keepaliveTimeoutTimer)
        self.keepaliveTimeoutTimer = 0
        self.armKeepalive(at: self.reactor.now &+ UInt64(self.keepAliveTime.nanoseconds))
    }

    // MARK: closing

    package func beginGracefulClose() {
        guard let socket = self.socket, let session = socket.session, self.state == .ready else {
            if self.state != .draining {
                self.close(reason: CallStatus(code: .unavailable, message: "connection closed"))
            }
            return
        }
        self.state = .draining
        nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, NGHTTP2_NO_ERROR.rawValue, nil, 0)
        socket.scheduleFlush()
        if self.streamsOnWire == 0 {
            socket.shutdown(reason: CallStatus(code: .unavailable, message: "connection closed"))
        }
    }

    package func detachDelegate() {
        self.delegate = nil
    }

    package func close(reason: CallStatus) {
        if self.state == .closed { return }
        // Nothing opens here any more. nghttp2's last output refuses (REFUSED_STREAM) the requests it still held
        // behind a full socket; their calls retry at once, and must find another connection, not this one.
        if self.state == .ready { self.state = .draining }
        if let socket = self.socket {
            socket.shutdown(reason: reason)  // ends in socketClosed → connectionEnded
        } else {
            self.connectionEnded(reason)
        }
    }

    /// Where every way of ending arrives, once: timers stop, open streams fail with `reason`, the delegate hears it.
    private func connectionEnded(_ reason: CallStatus) {
        if self.state == .closed { return }
        let wasReady = self.state == .ready || self.state == .draining
        var reason = reason
        if self.socket?.closedWhileSecuring == true, let refusal = self.tls?.refusal {
            // A handshake that the last good files fail (an expired certificate, a CA the server no longer uses)
            // names the rotation that did not take as well: it is most likely the cause. (Only a TLS handshake's
            // failure: a refused connect or a timeout before it has nothing to do with the files.)
            reason = CallStatus(code: reason.code, message: "\(reason.message) (\(refusal))")
        }
        self.state = .closed
        self.reactor.disarm(&self.connectTimer)
        self.reactor.disarm(&self.keepaliveTimer)
        self.reactor.disarm(&self.keepaliveTimeoutTimer)
        self.reactor.disarm(&self.idleTrimTimer)
        let open = self.streams.removeAll()
        self.streamsOnWire = 0
        self.streamsWithBodyUnasked = 0
        self.bodyAskedAtCap = false
        let neverSent = self.neverSent
        self.neverSent = []
        for (id, handler) in open {
            self.retire(handler)
            // A request that never left is retried elsewhere at once (transparently, as a refused one is).
            handler.streamFailed(reason, unprocessed: neverSent.contains(id))
        }
        self.delegate?.transportClosed(self, reason: reason, wasReady: wasReady, keepaliveTimedOut: self.keepaliveTimedOut)
    }
}
