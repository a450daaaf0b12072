import CNghttp2
import CReactor
@_spi(Reactor) import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// One accepted HTTP/2 connection: the shared `HTTP2Socket` (reads, TLS, coalesced writes, the close rule) plus what
/// only the server does: make the server session and dispatch its streams, and close a connection whose client
/// does not finish its handshake in time.
///
/// `@unchecked Sendable` (a `ReactorHandler`, for the handshake timer): reactor thread only.
final class EchoServerConnection: ReactorHandler, HTTP2SocketOwner, @unchecked Sendable {
    unowned let reactor: Reactor
    unowned let listener: EchoListener
    var options: EchoServer.Options { self.listener.options }
    private var socket: HTTP2Socket?
    private var goingAway = false
    /// Open streams; nghttp2 holds unretained pointers to them as stream user data.
    var streams: [Int32: EchoStream] = [:]

    /// The listener's number for this connection (1, 2, ...), for `EchoServer.requestsPerConnection()`.
    let serial: Int

    init(reactor: Reactor, fd: Int32, listener: EchoListener, serial: Int) {
        self.serial = serial
        self.reactor = reactor
        self.listener = listener
        self.acceptedFD = fd
    }

    private let acceptedFD: Int32

    var session: OpaquePointer? { self.socket?.session }

    /// Until the client's SETTINGS arrive (after its TLS handshake and preface): then the connection is closed.
    private var handshakeTimer: Reactor.TimerID = 0

    func start() {
        var tls: TLSSession?
        var refusal: CallStatus?
        if let context = self.listener.tls {
            do {
                tls = try TLSSession(context: context, serverName: nil, verifyName: nil)
            } catch {
                refusal = CallStatus(code: .internal, message: "TLS session could not be made: \(error)")
            }
        }
        let socket = HTTP2Socket(reactor: self.reactor, owner: self, acceptedFD: self.acceptedFD, peer: "client", tls: tls)
        self.socket = socket
        if let refusal {
            socket.close(reason: refusal)
            return
        }
        self.handshakeTimer = self.reactor.scheduleTimer(
            at: self.reactor.now &+ UInt64(max(self.options.handshakeTimeout.nanoseconds, 0)), handler: self)
        socket.startAccepted()
    }

    /// The client's SETTINGS arrived: the handshake is over.
    func prefaceReceived() {
        self.reactor.disarm(&self.handshakeTimer)
    }

    override func reactorTimerFired(tag: UInt64) {
        self.handshakeTimer = 0
        self.socket?.close(reason: CallStatus(code: .unavailable, message: "the client did not finish its handshake in time"))
    }

    // MARK: HTTP2SocketOwner

    func socketReceivedFirstBytes(_ bytes: UnsafeRawBufferPointer) -> CallStatus? { nil }
    func socketReceivedFirstPlaintext(_ bytes: UnsafeRawBufferPointer) -> CallStatus? { nil }

    /// h2 through ALPN: the context's callback refuses a ClientHello that offers ALPN without h2, but OpenSSL calls
    /// it only when ALPN is offered at all, and a client that offers none would get an HTTP/2 session unasked.
    func socketSecured(_ tls: TLSSession) -> CallStatus? {
        if tls.negotiatedProtocol == "h2" { return nil }
        return CallStatus(code: .unavailable, message: "the client did not negotiate h2 through ALPN")
    }

    func socketReadyForHTTP2() {
        do {
            self.socket?.session = try EchoServerSession.make(for: self)
        } catch {
            self.socket?.close(reason: CallStatus(code: .internal, message: "nghttp2 server session: \(error)"))
        }
    }

    func socketDidRead() {}

    func socketDidFlush() {}

    func socketClosed(_ reason: CallStatus) {
        self.reactor.disarm(&self.handshakeTimer)
        for stream in self.streams.values { stream.cancelTimer() }
        self.streams.removeAll()
        self.listener.connectionClosed(self)
    }

    func scheduleFlush() {
        self.socket?.scheduleFlush()
    }

    /// Tests: asks the client for a TLS 1.3 key update (`TLSSession.requestKeyUpdate()`), sent with this turn's
    /// flush. False on a plaintext connection, or when OpenSSL refuses.
    func requestKeyUpdate() -> Bool {
        guard let tls = self.socket?.tls, tls.requestKeyUpdate() else { return false }
        self.scheduleFlush()
        return true
    }

    /// Tests: KeyUpdates the client sent since the first `requestKeyUpdate()`.
    var clientKeyUpdates: Int { self.socket?.tls?.peerKeyUpdates ?? 0 }

    /// Graceful: GOAWAY with the last stream id, then close once open streams are done.
    func goAway() {
        guard let session = self.session else { return }
        self.goAway(lastStreamID: nghttp2_session_get_last_proc_stream_id(session))
    }

    /// GOAWAY naming `lastStreamID` as the last stream processed: nghttp2 closes the streams above it once the frame
    /// is out (the client may retry those anywhere); the others run to their end, then the connection closes.
    func goAway(lastStreamID: Int32) {
        guard let session = self.session, !self.goingAway else { return }
        self.goingAway = true
        nghttp2_submit_goaway(
            session, UInt8(NGHTTP2_FLAG_NONE.rawValue), max(0, lastStreamID), NGHTTP2_NO_ERROR.rawValue, nil, 0)
        // Once the GOAWAY is out and no stream is left, nghttp2 stops wanting to read; the socket closes then.
        self.scheduleFlush()
    }

    func close() {
        self.socket?.close(reason: CallStatus(code: .unavailable, message: "server closed the connection"))
    }

    // MARK: from the callbacks

    func beginStream(_ streamID: Int32) -> EchoStream {
        let stream = EchoStream(connection: self, streamID: streamID)
        self.streams[streamID] = stream
        return stream
    }

    func streamClosed(_ streamID: Int32) {
        self.streams.removeValue(forKey: streamID)?.cancelTimer()
    }

    /// Sends response headers, the messages, and trailers.
    func respond(_ stream: EchoStream, headers: [(String, String)], body: [UInt8], trailers: [(String, String)]) {
        stream.responseBody = body
        stream.responseTrailers = trailers
        stream.responseStarted = true
        stream.responseDone = true
        self.startResponse(stream, headers: headers)
    }

    /// Sends response headers now; messages follow as the stream adds them (`resumeResponse`), then trailers.
    func startResponse(_ stream: EchoStream, headers: [(String, String)]) {
        guard let session = self.session else { return }
        let rc = withNVs(headers) { nva in
            var provider = nghttp2_data_provider(
                source: nghttp2_data_source(ptr: Unmanaged.passUnretained(stream).toOpaque()),
                read_callback: echoReadResponse)
            return nghttp2_submit_response(session, stream.streamID, nva.baseAddress, nva.count, &provider)
        }
        if rc != 0 { nghttp2_submit_rst_stream(session, 0, stream.streamID, NGHTTP2_INTERNAL_ERROR.rawValue) }
        self.scheduleFlush()
    }

    /// The stream buffered more response bytes or its end.
    func resumeResponse(_ stream: EchoStream) {
        guard let session = self.session else { return }
        nghttp2_session_resume_data(session, stream.streamID)
        self.scheduleFlush()
    }

    /// A single HEADERS frame with END_STREAM carrying the status.
    func respondTrailersOnly(_ stream: EchoStream, headers: [(String, String)]) {
        guard let session = self.session else { return }
        let rc = withNVs(headers) { nva in
            nghttp2_submit_response(session, stream.streamID, nva.baseAddress, nva.count, nil)
        }
        if rc != 0 { nghttp2_submit_rst_stream(session, 0, stream.streamID, NGHTTP2_INTERNAL_ERROR.rawValue) }
        self.scheduleFlush()
    }

    func submitTrailers(_ stream: EchoStream) {
        guard let session = self.session else { return }
        _ = withNVs(stream.responseTrailers) { nva in
            nghttp2_submit_trailer(session, stream.streamID, nva.baseAddress, nva.count)
        }
    }

    func resetStream(_ stream: EchoStream, errorCode: UInt32) {
        guard let session = self.session else { return }
        nghttp2_submit_rst_stream(session, 0, stream.streamID, errorCode)
        self.scheduleFlush()
    }
}

/// Calls `body` with nghttp2 name/value pairs for `headers` (nghttp2 copies them during the call).
func withNVs<R>(_ headers: [(String, String)], _ body: (UnsafeBufferPointer<nghttp2_nv>) -> R) -> R {
    var bytes: [UInt8] = []
    var ranges: [(Range<Int>, Range<Int>)] = []
    for (name, value) in headers {
        let nameStart = bytes.count
        bytes.append(contentsOf: name.utf8)
        let valueStart = bytes.count
        bytes.append(contentsOf: value.utf8)
        ranges.append((nameStart..<valueStart, valueStart..<bytes.count))
    }
    bytes.append(0)
    return bytes.withUnsafeMutableBufferPointer { buffer in
        let base = buffer.baseAddress!
        let nvs = ranges.map { name, value in
            nghttp2_nv(
                name: base + name.lowerBound, value: base + value.lowerBound, namelen: name.count,
                valuelen: value.count, flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue))
        }
        return nvs.withUnsafeBufferPointer { body($0) }
    }
}

private func echoReadResponse(
    _ session: OpaquePointer?, _ streamID: Int32, _ buffer: UnsafeMutablePointer<UInt8>?, _ length: Int,
    _ dataFlags: UnsafeMutablePointer<UInt32>?, _ source: UnsafeMutablePointer<nghttp2_data_source>?,
    _ userData: UnsafeMutableRawPointer?
) -> Int {
    let stream = Unmanaged<EchoStream>.fromOpaque(source!.pointee.ptr!).takeUnretainedValue()
    var written = 0
    while written < length {
        if stream.responseOffset == stream.responseBody.count && !stream.generateNext() { break }
        let take = min(stream.responseBody.count - stream.responseOffset, length - written)
        stream.responseBody.withUnsafeBufferPointer {
            (buffer! + written).update(from: $0.baseAddress! + stream.responseOffset, count: take)
        }
        stream.responseOffset += take
        written += take
    }
    stream.releaseWindow()
    if stream.responseOffset == stream.responseBody.count {
        stream.responseBody.removeAll(keepingCapacity: true)
        stream.responseOffset = 0
        if stream.responseDone && stream.generateRemaining == 0 {
            dataFlags!.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue | NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
            stream.connection.submitTrailers(stream)
        } else if written == 0 {
            return Int(NGHTTP2_ERR_DEFERRED.rawValue)
        }
    }
    return written
}
