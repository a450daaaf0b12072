import CNghttp2
import CReactor
@_spi(Reactor) import GRPCConnectionManager

#if canImport(Glibc)
import Glibc
#endif

/// One accepted HTTP/2 connection with an nghttp2 server session. Reactor thread only.
final class EchoServerConnection: ReactorHandler, @unchecked Sendable {
    unowned let reactor: Reactor
    unowned let listener: EchoListener
    var options: EchoServer.Options { self.listener.options }
    private var fd: Int32
    private var registration: Reactor.Registration?
    private var interest: UInt32 = 0
    fileprivate var session: OpaquePointer?
    private var output = SocketOutput()
    private var flushScheduled = false
    private var closed = false
    private var goingAway = false
    /// Open streams; nghttp2 holds unretained pointers to them as stream user data.
    var streams: [Int32: EchoStream] = [:]
    private var tls: TLSSession?

    init(reactor: Reactor, fd: Int32, listener: EchoListener) {
        self.reactor = reactor
        self.fd = fd
        self.listener = listener
    }

    deinit {
        if let session = self.session { nghttp2_session_del(session) }
    }

    func start() {
        if let context = self.listener.tls {
            do {
                self.tls = try TLSSession(context: context, serverName: nil, verifyName: nil)
            } catch {
                self.close()
                return
            }
        }
        do {
            self.session = try EchoServerSession.make(for: self)
            self.interest = Reactor.Events.read
            self.registration = try self.reactor.register(fd: self.fd, interest: self.interest, handler: self)
        } catch {
            self.close()
            return
        }
        self.scheduleFlush()
    }

    override func reactorFDReady(_ events: UInt32) {
        if events & Reactor.Events.write != 0 {
            self.flushNow()
        }
        guard !self.closed, events & Reactor.Events.read != 0, let session = self.session else { return }
        let buffer = self.reactor.readBuffer
        for _ in 0..<4 {
            let n = cr_read(self.fd, buffer.baseAddress!, buffer.count)
            if n == -Int(EAGAIN) { break }
            if n <= 0 {
                self.close()
                return
            }
            if let tls = self.tls {
                tls.feed(UnsafeRawBufferPointer(start: buffer.baseAddress, count: n))
                if !tls.handshakeDone {
                    let result = tls.handshake()
                    self.output.takeCiphertext(from: tls)
                    if case .failed = result {
                        self.flushCiphertextAndClose()
                        return
                    }
                    if !tls.handshakeDone { continue }
                }
                let plain = self.reactor.plaintextBuffer
                while true {
                    guard let got = try? tls.readPlaintext(into: UnsafeMutableRawBufferPointer(plain)), got >= 0 else {
                        self.close()
                        return
                    }
                    if got == 0 { break }
                    if nghttp2_session_mem_recv(session, plain.baseAddress!, got) < 0 {
                        self.close()
                        return
                    }
                }
            } else if nghttp2_session_mem_recv(session, buffer.baseAddress!, n) < 0 {
                self.close()
                return
            }
            if self.closed { return }
            if n < buffer.count { break }
        }
        self.scheduleFlush()
    }

    func scheduleFlush() {
        if !self.flushScheduled && !self.closed {
            self.flushScheduled = true
            self.reactor.scheduleFlush(self)
        }
    }

    override func reactorFlush() {
        self.flushScheduled = false
        self.flushNow()
    }

    private func flushNow() {
        guard !self.closed, let session = self.session else { return }
        // Under TLS, HTTP/2 bytes wait until the handshake is done (nghttp2 forgets what mem_send returned).
        let http2Allowed = self.tls?.handshakeDone ?? true
        do {
            if http2Allowed { try self.output.collect(from: session, tls: self.tls) }
            try self.output.write(to: self.fd)
        } catch {
            self.close()
            return
        }
        let wantWrite = !self.output.isDrained || (http2Allowed && nghttp2_session_want_write(session) != 0)
        self.setInterest(wantWrite ? Reactor.Events.read | Reactor.Events.write : Reactor.Events.read)
        if self.output.isDrained && nghttp2_session_want_read(session) == 0 && nghttp2_session_want_write(session) == 0 {
            self.close()
        }
    }

    private func setInterest(_ interest: UInt32) {
        guard interest != self.interest, let registration = self.registration else { return }
        self.interest = interest
        self.reactor.setInterest(registration, interest)
    }

    /// Graceful: GOAWAY with the last stream id, then close once open streams are done.
    func goAway() {
        guard let session = self.session, !self.goingAway, !self.closed else { return }
        self.goingAway = true
        nghttp2_submit_goaway(
            session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nghttp2_session_get_last_proc_stream_id(session),
            NGHTTP2_NO_ERROR.rawValue, nil, 0)
        // Once the GOAWAY is out and no stream is left, nghttp2 stops wanting to read; flushNow closes then.
        self.scheduleFlush()
    }

    /// Sends the TLS alert that explains a failed handshake, then closes.
    private func flushCiphertextAndClose() {
        self.output.writeOnce(to: self.fd)
        self.close()
    }

    func close() {
        guard !self.closed else { return }
        self.closed = true
        if let registration = self.registration {
            self.reactor.deregister(registration, handler: self)
            self.registration = nil
        }
        if self.fd >= 0 {
            _ = cr_close(self.fd)
            self.fd = -1
        }
        for stream in self.streams.values { stream.cancelTimer() }
        self.streams.removeAll()
        if let session = self.session {
            nghttp2_session_del(session)
            self.session = nil
        }
        self.listener.connectionClosed(self)
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
        guard let session = self.session, !self.closed else { return }
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
        guard let session = self.session, !self.closed else { return }
        nghttp2_session_resume_data(session, stream.streamID)
        self.scheduleFlush()
    }

    /// A single HEADERS frame with END_STREAM carrying the status.
    func respondTrailersOnly(_ stream: EchoStream, headers: [(String, String)]) {
        guard let session = self.session, !self.closed else { return }
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

    override func reactorRunSubmitted() {}
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
