import CNghttp2
@_spi(Reactor) import GRPCConnectionManager

/// One request stream on the echo server: collects the request, then answers (now or after `x-sleep-ms`).
final class EchoStream: ReactorHandler, @unchecked Sendable {
    unowned let connection: EchoServerConnection
    let streamID: Int32
    var path = ""
    var metadata: [(String, String)] = []
    var failCode: Int?
    var failMessage = ""
    var sleepMilliseconds = 0
    var responseBytes: Int?
    var failFirst = 0
    var requestKey: String?
    var pushback: String?
    var requestBody: [UInt8] = []
    var responseBody: [UInt8] = []
    var responseOffset = 0
    var responseTrailers: [(String, String)] = []
    private var timer: Reactor.TimerID = 0
    private var answered = false

    init(connection: EchoServerConnection, streamID: Int32) {
        self.connection = connection
        self.streamID = streamID
    }

    /// Headers that are not echoed back.
    private static let notEchoed: Set<String> = [
        "te", "content-type", "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
        "x-fail-code", "x-fail-message", "x-sleep-ms", "x-response-bytes", "x-fail-first", "x-request-key",
        "x-pushback-ms",
    ]

    func header(name: String, value: String) {
        switch name {
        case ":path": self.path = value
        case "x-fail-code": self.failCode = Int(value) ?? 2
        case "x-fail-message": self.failMessage = PercentEncoding.decode(value)  // lets tests send any Unicode
        case "x-sleep-ms": self.sleepMilliseconds = max(0, Int(value) ?? 0)
        case "x-response-bytes": self.responseBytes = max(0, Int(value) ?? 0)
        case "x-fail-first": self.failFirst = max(0, Int(value) ?? 0)
        case "x-request-key": self.requestKey = value
        case "x-pushback-ms": self.pushback = value
        default:
            if !name.hasPrefix(":") && !Self.notEchoed.contains(name) { self.metadata.append((name, value)) }
        }
    }

    func data(_ bytes: UnsafeRawBufferPointer) {
        self.requestBody.append(contentsOf: bytes)
    }

    /// The client half-closed: answer now or after the requested sleep.
    func requestComplete() {
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
        let messages: [[UInt8]]
        switch EchoMessages.split(self.requestBody, limit: self.connection.options.maxReceiveMessageSize) {
        case .success(let parsed): messages = parsed
        case .failure(let status):
            self.trailersOnly(code: status.code.rawValue, message: status.message)
            return
        }
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
        } else if let code = self.failCode, code != 0 {
            self.trailersOnly(code: code, message: self.failMessage, pushback: self.pushback)
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
            body = MessageFramer.frame([UInt8](repeating: 0x61, count: count))
        } else {
            if messages.isEmpty {
                self.trailersOnly(code: 13, message: "echo: request had no message")
                return
            }
            for message in messages { body.append(contentsOf: MessageFramer.frame(message)) }
        }
        var headers: [(String, String)] = [(":status", "200"), ("content-type", "application/grpc")]
        headers.append(contentsOf: self.metadata)
        self.connection.respond(self, headers: headers, body: body, trailers: [("grpc-status", "0")])
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

/// Splits a request body into messages.
enum EchoMessages {
    static func split(_ body: [UInt8], limit: Int) -> Result<[[UInt8]], Status> {
        var messages: [[UInt8]] = []
        var index = 0
        while index < body.count {
            guard body.count - index >= 5 else {
                return .failure(Status(code: .internal, message: "truncated message prefix"))
            }
            if body[index] != 0 {
                return .failure(Status(code: .unimplemented, message: "compression is not supported"))
            }
            let length =
                Int(body[index + 1]) << 24 | Int(body[index + 2]) << 16 | Int(body[index + 3]) << 8
                | Int(body[index + 4])
            if length > limit {
                return .failure(
                    Status(code: .resourceExhausted, message: "request message of \(length) bytes exceeds \(limit)"))
            }
            guard body.count - index - 5 >= length else {
                return .failure(Status(code: .internal, message: "truncated message"))
            }
            messages.append(Array(body[(index + 5)..<(index + 5 + length)]))
            index += 5 + length
        }
        return .success(messages)
    }
}

