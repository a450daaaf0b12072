import CNghttp2
import GRPCCMCompression
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

/// One request stream on the echo server.
///
/// The method name (the path's last part) picks the behaviour, for any service:
/// - `Expand` (server streaming): each request message split at spaces, one response per word; or, with
///   `x-response-count N`, N messages of `x-response-bytes` bytes, generated as nghttp2 pulls them.
/// - `Collect` (client streaming): one response, the request messages joined with spaces.
/// - `Update` (bidirectional): each message echoed as soon as it arrives; OK when the client half-closes.
/// - anything else (unary): the request messages echoed after the client half-closes (or after `x-sleep-ms`).
/// For the `echo.Echo` service the messages are protobuf `EchoRequest`/`EchoResponse` (field 1, `text`), so
/// generated grpc-swift-2 clients can call it; for every other service they are raw bytes.
/// `x-fail-after N` ends `Expand`/`Update` with `x-fail-code` after N responses (the server ending first);
/// `x-hold-window` never returns received bytes to the client's window (to test a writer's backpressure).
/// Compressed requests (`grpc-encoding` gzip or deflate) are inflated; `x-compress-response ENC` compresses every
/// response message; the answer's headers report `x-received-grpc-encoding` and `x-received-compressed` (how many
/// request messages came compressed), and with `x-report-accept-encoding` the request's `grpc-accept-encoding`, so
/// tests see what the client sent.
///
/// `@unchecked Sendable` (through `ReactorHandler`): reactor thread only.
final class EchoStream: ReactorHandler, @unchecked Sendable {
    enum Method {
        case unary, expand, collect, update
    }
    unowned let connection: EchoServerConnection
    let streamID: Int32
    var path = ""
    var metadata: [(String, String)] = []
    var failCode: Int?
    var failMessage = ""
    var sleepMilliseconds = 0
    var responseBytes: Int?
    var failFirst = 0
    /// `x-refuse-first N`: RST_STREAM(REFUSED_STREAM) for the first N attempts of the request key, before any work.
    var refuseFirst = 0
    /// `x-goaway-first N`: for the first N attempts of the request key, GOAWAY with a last stream id below this
    /// stream, so the stream is one the server never processed.
    var goAwayFirst = 0
    var requestKey: String?
    /// `x-pushback-ms`: one value, or a comma-separated list read by attempt (`grpc-previous-rpc-attempts`), the last
    /// one for every later attempt; an empty one sends none.
    var pushbacks: [String] = []
    var previousAttempts = 0
    var pushback: String? {
        guard !self.pushbacks.isEmpty else { return nil }
        let value = self.pushbacks[min(self.previousAttempts, self.pushbacks.count - 1)]
        return value.isEmpty ? nil : value
    }
    var failAfter: Int?
    var responseCount: Int?
    /// Never consume this stream's received bytes (its window closes after the initial window).
    var holdWindow = false
    /// Received bytes not yet returned to the client's window (held while responses wait for the client).
    var unconsumedBytes = 0
    /// Bytes of the request messages held for the answer.
    private var heldRequestBytes = 0

    /// Response bytes waiting for the client's window.
    var pendingResponseBytes: Int { self.responseBody.count - self.responseOffset }

    /// Whether received bytes stay out of the client's window: on request (`x-hold-window`), or while more responses
    /// wait for the client than `maxPendingResponseBytes` (the client writes and does not read).
    var holdsWindow: Bool {
        if self.holdWindow { return true }
        guard self.pendingResponseBytes > self.connection.options.maxPendingResponseBytes else { return false }
        if self.unconsumedBytes == 0 { self.connection.listener.responseHolds += 1 }
        return true
    }

    /// Returns the held bytes to the client's window once the responses have drained below the limit.
    func releaseWindow() {
        guard self.unconsumedBytes > 0, !self.holdWindow,
            self.pendingResponseBytes <= self.connection.options.maxPendingResponseBytes,
            let session = self.connection.session
        else { return }
        nghttp2_session_consume_stream(session, self.streamID, self.unconsumedBytes)
        self.unconsumedBytes = 0
    }
    /// The request's `grpc-encoding` (nil: identity), and the algorithm for response messages (`x-compress-response`).
    private var requestEncoding: CallCompression?
    private var responseEncoding: CallCompression?
    private var compressedRequests = 0
    /// `x-report-accept-encoding`: the answer reports the request's `grpc-accept-encoding` (only when asked: every
    /// request carries one, and echoing it on every answer would cost the benchmarks a header per call).
    private var acceptEncoding: String?
    private var reportAcceptEncoding = false
    /// Request messages as they arrived (the shared deframer splits them), and a failure that ends the call.
    var requestMessages: [[UInt8]] = []
    private var deframer: MessageDeframer
    private var requestFailure: CallStatus?
    /// Response messages still to be generated on demand (`x-response-count`).
    var generateRemaining = 0
    /// Response headers went out; messages may follow.
    var responseStarted = false
    /// No more messages: trailers follow what is buffered.
    var responseDone = false
    private var responsesSent = 0
    var responseBody: [UInt8] = []
    var responseOffset = 0
    var responseTrailers: [(String, String)] = []
    private var timer: Reactor.TimerID = 0
    var answered = false

    init(connection: EchoServerConnection, streamID: Int32) {
        self.connection = connection
        self.streamID = streamID
        self.deframer = MessageDeframer(maxMessageSize: connection.options.maxReceiveMessageSize)
    }

    /// Headers that are not echoed back.
    private static let notEchoed: Set<String> = [
        "te", "content-type", "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
        "x-fail-code", "x-fail-message", "x-sleep-ms", "x-response-bytes", "x-fail-first", "x-request-key",
        "x-pushback-ms", "x-fail-after", "x-response-count", "x-hold-window", "x-refuse-first", "x-goaway-first",
        "x-compress-response", "x-report-accept-encoding",
    ]

    var method: Method {
        switch self.path.split(separator: "/").last {
        case "Expand": .expand
        case "Collect": .collect
        case "Update": .update
        default: .unary
        }
    }

    /// `Update` echoes each message on arrival unless the call is set to fail up front.
    private var echoesAsItArrives: Bool {
        self.method == .update && self.failFirst == 0 && (self.failCode == nil || self.failAfter != nil)
    }

    /// Whether messages are protobuf `echo.EchoRequest`/`EchoResponse`.
    var usesProtobuf: Bool { self.path.hasPrefix("/echo.Echo/") }

    /// The request's headers are all in: count it (under its `x-request-key` and its connection), then refuse it
    /// unprocessed if `x-refuse-first` or `x-goaway-first` asks for that.
    func headersComplete() {
        let listener = self.connection.listener
        listener.requestsByConnection[self.connection.serial, default: 0] += 1
        guard let key = self.requestKey else { return }
        listener.requestsByKey[key, default: 0] += 1
        // Refused means unprocessed: mark it answered, so that the rest of its request cannot reach `answer()`.
        if self.refuseFirst > 0 && listener.countAttempt("refuse:" + key) < self.refuseFirst {
            self.answered = true
            self.connection.resetStream(self, errorCode: NGHTTP2_REFUSED_STREAM.rawValue)
        } else if self.goAwayFirst > 0 && listener.countAttempt("goaway:" + key) < self.goAwayFirst {
            self.answered = true
            self.connection.goAway(lastStreamID: self.streamID - 2)
        }
    }

    func header(name: String, value: String) {
        switch name {
        case ":path": self.path = value
        case "x-fail-code": self.failCode = StatusCode(name: value)?.rawValue ?? Int(value) ?? 2  // 14 or UNAVAILABLE
        case "x-fail-message": self.failMessage = PercentEncoding.decode(value)  // lets tests send any Unicode
        // Clamped: a client's value must not trap the server (a day at most; responses of 64 MiB at most).
        case "x-sleep-ms": self.sleepMilliseconds = min(max(0, Int(value) ?? 0), 86_400_000)
        case "x-response-bytes": self.responseBytes = min(max(0, Int(value) ?? 0), 64 << 20)
        case "x-fail-first": self.failFirst = max(0, Int(value) ?? 0)
        case "x-request-key": self.requestKey = value
        case "x-refuse-first": self.refuseFirst = max(0, Int(value) ?? 0)
        case "x-goaway-first": self.goAwayFirst = max(0, Int(value) ?? 0)
        // Echoed back under another name, so a test sees the deadline the server was told.
        case "grpc-timeout": self.metadata.append(("x-received-grpc-timeout", value))
        case "x-pushback-ms": self.pushbacks = value.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        case "grpc-previous-rpc-attempts":
            self.previousAttempts = max(0, Int(value) ?? 0)
            self.metadata.append((name, value))  // echoed, as other metadata is
        case "x-fail-after": self.failAfter = max(0, Int(value) ?? 0)
        case "x-response-count": self.responseCount = max(0, Int(value) ?? 0)
        case "x-hold-window": self.holdWindow = true
        case "grpc-encoding":
            self.metadata.append(("x-received-grpc-encoding", value))
            if let algorithm = CallCompression(name: value) {
                self.requestEncoding = algorithm == .identity ? nil : algorithm
                self.deframer.compressionAllowed = algorithm != .identity
            } else {
                self.requestFailure = CallStatus(code: .unimplemented, message: "grpc-encoding \"\(value)\" is not supported")
            }
        case "grpc-accept-encoding": self.acceptEncoding = value
        case "x-report-accept-encoding": self.reportAcceptEncoding = true
        case "x-compress-response":
            self.responseEncoding = CallCompression(name: value).flatMap { $0 == .identity ? nil : $0 }
        default:
            if !name.hasPrefix(":") && !Self.notEchoed.contains(name) { self.metadata.append((name, value)) }
        }
    }

    func data(_ bytes: UnsafeRawBufferPointer) {
        guard self.requestFailure == nil else { return }
        do {
            try self.deframer.process(bytes) { message, compressed in
                guard compressed, let encoding = self.requestEncoding else {
                    self.hold(message)
                    return
                }
                self.compressedRequests += 1
                let decompressor = self.connection.reactor.shared { MessageDecompressor() }
                do {
                    self.hold(
                        try decompressor.decompress(
                            message, with: encoding, limit: self.connection.options.maxReceiveMessageSize))
                } catch {
                    if self.requestFailure == nil {
                        self.requestFailure = CallStatus(code: .internal, message: "request message: \(error)")
                    }
                }
            }
        } catch {
            switch error {
            case .messageTooLarge(let length, let limit):
                self.requestFailure = CallStatus(
                    code: .resourceExhausted, message: "request message of \(length) bytes exceeds \(limit)")
            case .compressedWithoutEncoding:
                self.requestFailure = CallStatus(code: .unimplemented, message: "compressed message without a grpc-encoding")
            case .invalidFlag(let flag):
                self.requestFailure = CallStatus(code: .internal, message: "invalid message flag \(flag)")
            }
        }
        if self.echoesAsItArrives && !self.responseDone { self.echoArrivedMessages() }
    }

    /// Keeps a request message for the answer, up to `maxHeldRequestBytes` in all: past it the call fails, and
    /// what it held goes (a client streaming without end must not grow the server without end).
    private func hold(_ message: [UInt8]) {
        guard self.requestFailure == nil else { return }
        self.heldRequestBytes += message.count
        guard self.heldRequestBytes <= self.connection.options.maxHeldRequestBytes else {
            self.requestFailure = CallStatus(
                code: .resourceExhausted,
                message: "the request messages exceed the \(self.connection.options.maxHeldRequestBytes) bytes held for the answer")
            self.requestMessages.removeAll()
            return
        }
        self.requestMessages.append(message)
    }

    /// Bidirectional echo: answers every message that has arrived, at once.
    private func echoArrivedMessages() {
        if let failure = self.requestFailure {
            self.endResponse(code: failure.code.rawValue, message: failure.message)
            return
        }
        if self.failAfter == 0 {
            self.endResponse(code: self.failCode ?? 13, message: self.failMessage)
            return
        }
        let arrived = self.requestMessages
        self.requestMessages.removeAll()
        self.heldRequestBytes = 0
        for message in arrived {
            self.sendResponse(self.usesProtobuf ? EchoProtobuf.encode(EchoProtobuf.decode(message)) : message)
            if self.responseDone { break }
        }
    }

    /// Sends one response message (headers first if they have not gone out); ends the call after `x-fail-after`.
    private func sendResponse(_ message: [UInt8]) {
        if !self.responseStarted {
            self.responseStarted = true
            self.connection.startResponse(self, headers: self.responseHeaders())
        }
        self.responseBody.append(contentsOf: self.frame(message))
        self.responsesSent += 1
        let listener = self.connection.listener
        listener.mostPendingResponseBytes = max(listener.mostPendingResponseBytes, self.pendingResponseBytes)
        if let limit = self.failAfter, self.responsesSent >= limit {
            self.endResponse(code: self.failCode ?? 13, message: self.failMessage)
        } else {
            self.connection.resumeResponse(self)
        }
    }

    /// Trailers after whatever is buffered.
    private func endResponse(code: Int, message: String = "") {
        guard !self.responseDone else { return }
        if !self.responseStarted {
            self.trailersOnly(code: code, message: message)
            self.responseDone = true
            return
        }
        self.responseDone = true
        self.responseTrailers = [("grpc-status", String(code))]
        if !message.isEmpty { self.responseTrailers.append(("grpc-message", PercentEncoding.encode(message))) }
        self.connection.resumeResponse(self)
    }

    /// Called by the data source when the buffered response is sent: makes the next generated message.
    func generateNext() -> Bool {
        guard self.generateRemaining > 0 else { return false }
        self.generateRemaining -= 1
        self.responseBody.removeAll(keepingCapacity: true)
        self.responseOffset = 0
        let payload = [UInt8](repeating: 0x61, count: self.responseBytes ?? 0)
        self.responseBody.append(contentsOf: self.frame(self.usesProtobuf ? EchoProtobuf.encode(payload) : payload))
        self.responsesSent += 1
        if self.generateRemaining == 0 {
            self.endResponse(code: 0)
        } else if let limit = self.failAfter, self.responsesSent >= limit {
            self.generateRemaining = 0
            self.endResponse(code: self.failCode ?? 13, message: self.failMessage)
        }
        return true
    }

    /// The client half-closed: answer now or after the requested sleep.
    func requestComplete() {
        if self.method == .update {
            if self.echoesAsItArrives && !self.answered {
                self.answered = true
                self.endResponse(code: 0)
                return
            }
        }
        if self.sleepMilliseconds > 0 {
            self.timer = self.connection.reactor.scheduleTimer(
                at: Reactor.clock() &+ UInt64(self.sleepMilliseconds) * 1_000_000, handler: self)
        } else {
            self.answer()
        }
    }

    override func reactorTimerFired(tag: UInt64) {
        self.timer = 0
        self.answer()
        self.connection.scheduleFlush()
    }

    func cancelTimer() {
        if self.timer != 0 {
            self.connection.reactor.cancelTimer(self.timer)
            self.timer = 0
        }
    }

    private func answer() {
        guard !self.answered, self.connection.streams[self.streamID] === self else { return }
        self.answered = true
        if self.requestFailure == nil && self.deframer.hasPartialMessage {
            self.requestFailure = CallStatus(code: .internal, message: "truncated message")
        }
        if let failure = self.requestFailure {
            self.trailersOnly(code: failure.code.rawValue, message: failure.message)
            return
        }
        let messages = self.requestMessages
        if self.failFirst > 0 {
            // Fail the first N attempts of each request key (UNAVAILABLE unless x-fail-code says otherwise), then
            // answer normally: retries are tested against this.
            let key = self.requestKey ?? ""
            let seen = self.connection.listener.attempts[key, default: 0]
            self.connection.listener.attempts[key] = seen + 1
            if seen < self.failFirst {
                self.trailersOnly(
                    code: self.failCode ?? 14, message: "failing attempt \(seen + 1) of \(self.failFirst) on purpose",
                    pushback: self.pushback)
                return
            }
        } else if let code = self.failCode, code != 0, self.failAfter == nil {
            self.trailersOnly(code: code, message: self.failMessage, pushback: self.pushback)
            return
        }
        if self.method != .unary && self.path != HealthProto.watchPath {
            self.answerStreaming(messages)
            return
        }
        var body: [UInt8] = []
        if self.path == HealthProto.watchPath {
            // No server streaming here: clients fall back to polling Check.
            self.trailersOnly(code: 12, message: "grpc.health.v1.Health/Watch is not implemented by the echo server")
            return
        }
        if self.path == HealthProto.checkPath {
            let service = HealthProto.decodeRequest(messages.first ?? [])
            let options = self.connection.options
            if service.isEmpty || options.healthyServices.contains(service) {
                body = MessageFramer.frame(HealthProto.encodeResponse(.serving))
            } else if options.notServingServices.contains(service) {
                body = MessageFramer.frame(HealthProto.encodeResponse(.notServing))
            } else {
                self.trailersOnly(code: 5, message: "unknown service \(service)")
                return
            }
        } else if let count = self.responseBytes {
            body = self.frame([UInt8](repeating: 0x61, count: count))
        } else {
            if messages.isEmpty {
                self.trailersOnly(code: 13, message: "echo: request had no message")
                return
            }
            for message in messages { body.append(contentsOf: self.frame(message)) }
        }
        self.connection.respond(self, headers: self.responseHeaders(), body: body, trailers: [("grpc-status", "0")])
    }

    /// Response headers: status, content type, the encoding of compressed responses, the echoed metadata.
    private func responseHeaders() -> [(String, String)] {
        var headers: [(String, String)] = [(":status", "200"), ("content-type", "application/grpc")]
        if let encoding = self.responseEncoding { headers.append(("grpc-encoding", encoding.name)) }
        if self.compressedRequests > 0 { headers.append(("x-received-compressed", String(self.compressedRequests))) }
        if self.reportAcceptEncoding {
            headers.append(("x-received-grpc-accept-encoding", self.acceptEncoding ?? ""))
        }
        headers.append(contentsOf: self.metadata)
        return headers
    }

    /// One response message framed, compressed when `x-compress-response` asked for it.
    private func frame(_ message: [UInt8]) -> [UInt8] {
        guard let encoding = self.responseEncoding else { return MessageFramer.frame(message) }
        return MessageFramer.frame(MessageCompressor.compress(message, with: encoding), compressed: true)
    }

    private func answerStreaming(_ messages: [[UInt8]]) {
        let texts = self.usesProtobuf ? messages.map(EchoProtobuf.decode) : messages
        if self.failAfter == 0 {
            self.endResponse(code: self.failCode ?? 13, message: self.failMessage)
            return
        }
        switch self.method {
        case .expand:
            if let count = self.responseCount {
                if count == 0 {
                    self.endResponse(code: 0)
                    return
                }
                self.generateRemaining = count
                self.responseStarted = true
                self.connection.startResponse(self, headers: self.responseHeaders())
                return
            }
            for text in texts {
                for word in text.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: true) {
                    self.sendResponse(self.usesProtobuf ? EchoProtobuf.encode(Array(word)) : Array(word))
                    if self.responseDone { return }
                }
            }
            self.endResponse(code: 0)
        case .collect:
            let joined = Array(texts.joined(separator: [UInt8(ascii: " ")]))
            self.sendResponse(self.usesProtobuf ? EchoProtobuf.encode(joined) : joined)
            self.endResponse(code: 0)
        case .update, .unary:
            self.endResponse(code: 0)
        }
    }

    private func trailersOnly(code: Int, message: String, pushback: String? = nil) {
        var headers: [(String, String)] = [
            (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", String(code)),
        ]
        if !message.isEmpty { headers.append(("grpc-message", PercentEncoding.encode(message))) }
        if let pushback { headers.append(("grpc-retry-pushback-ms", pushback)) }
        self.connection.respondTrailersOnly(self, headers: headers)
    }
}

/// The `text` field (1) of `echo.EchoRequest` / `echo.EchoResponse`, without a protobuf library.
enum EchoProtobuf {
    static func encode(_ text: [UInt8]) -> [UInt8] {
        ProtobufWire.lengthDelimited(1, text)
    }

    static func decode(_ bytes: [UInt8]) -> [UInt8] {
        ProtobufWire.lastLengthDelimited(1, in: bytes).map(Array.init) ?? []
    }
}
