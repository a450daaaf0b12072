import CNghttp2

#if canImport(Glibc)
import Glibc
#endif

/// One RPC of any kind from start to its single completion. Reactor-thread only after it is submitted.
///
/// The request is either one message known up front (unary, server streaming: it can be replayed for retries)
/// or messages written while the call runs (client and bidirectional streaming, through `StreamBuffers`). The
/// response is either one message handed over with the status (unary, client streaming) or each message as it
/// arrives, to callbacks on the reactor thread or to `StreamBuffers` for an async reader.
///
/// Life: created on the caller's thread → submitted to the reactor → waiting (in the channel or a connection's
/// queue) → open on an HTTP/2 stream → finished. `finish(_:)` is the only way out and runs the completion exactly
/// once; everything that can end a call (trailers, a reset, the deadline, a cancel, a dead connection) goes
/// through it, and whatever arrives later is ignored.
final class ClientCall: ReactorHandler, @unchecked Sendable {
    enum State {
        case created
        case waiting
        case open(connection: HTTP2ClientConnection, streamID: Int32)
        /// Between attempts: the retry timer runs.
        case backingOff
        case finished
    }

    /// Where response messages go.
    enum Delivery {
        /// Exactly one message, handed over with the status.
        case single
        /// Each message to callbacks, on the reactor thread, as it arrives.
        case callbacks(StreamingCallbacks)
        /// Each message into `buffers`, for a reader on another thread.
        case buffered
    }

    let path: String
    let metadata: Metadata
    /// The request message of a call whose request is one message (empty when `requestsStreamed`).
    let request: [UInt8]
    /// Messages written while the call runs, and buffered responses; nil for unary and callback server streaming.
    let buffers: StreamBuffers?
    /// The request is written as a stream (client and bidirectional streaming): never retried by policy.
    var requestsStreamed: Bool { self.buffers != nil && !self.singleRequest }
    private let singleRequest: Bool
    let delivery: Delivery
    /// Absolute deadline on the monotonic clock in ns; 0 = none.
    let deadline: UInt64
    let maxReceiveMessageSize: Int
    let waitForReady: Bool
    private let completion: (UnaryResponse) -> Void
    /// A callback writer's "send buffer drained" notification.
    private let onWritable: (() -> Void)?
    let pool: ServicePool
    /// Reactor clock when the pool took the call (for durations).
    var startedAt: UInt64 = 0

    private(set) var state: State = .created
    var deadlineTimer: Reactor.TimerID = 0
    /// Attempts made before this call by someone else's retry logic (GRPCCore's), for `grpc-previous-rpc-attempts`.
    var previousAttemptsElsewhere = 0
    /// The attempt in progress (1 = the first). 0 while the circuit breaker has not let the call out.
    var attempt = 0
    /// Set when the attempt's own timeout ended it (the only retryable DEADLINE_EXCEEDED).
    private var attemptTimedOut = false
    private var attemptTimer: Reactor.TimerID = 0
    private var retryTimer: Reactor.TimerID = 0
    private(set) var sentBytes = 0
    private(set) var receivedBytes = 0
    /// The response began with a header block of its own (not trailers-only): gRFC A6 commits the call then.
    private var trailersOnly = false

    private enum TimerTag {
        static let deadline: UInt64 = 0
        static let retry: UInt64 = 1
        static let attempt: UInt64 = 2
    }
    /// Set when the request is invalid (bad path, metadata, size): the call fails before anything is sent.
    var invalid: Status?
    /// Set once a never-sent call has been moved to another connection after a GOAWAY (transparent retry).
    var transparentlyRetried = false

    // Sending: the 5-byte prefix, then `request`.
    private var sendOffset = 0

    // Receiving.
    private var deframer: MessageDeframer
    private var httpStatus = 0
    private var grpcStatus: Int?
    private var grpcMessage: String?
    private var contentType: String?
    private var grpcEncoding: String?
    private var headerBlocks = 0
    private var inFinalHeaders = false
    private var initialMetadata = Metadata()
    private var trailingMetadata = Metadata()
    private var responseMessage: [UInt8]?
    private var extraMessages = false
    /// A failure found while receiving (oversized, bad flag); the call ends with it.
    private var localFailure: Status?

    /// - Parameters:
    ///   - request: The one request message, or nil when `buffers` carries a request stream.
    init(
        pool: ServicePool, path: String, metadata: Metadata, request: [UInt8]?, deadline: UInt64,
        maxReceiveMessageSize: Int, waitForReady: Bool, delivery: Delivery = .single, buffers: StreamBuffers? = nil,
        onWritable: (() -> Void)? = nil, completion: @escaping (UnaryResponse) -> Void
    ) {
        self.onWritable = onWritable
        self.singleRequest = request != nil
        self.buffers = buffers
        self.delivery = delivery
        self.pool = pool
        self.waitForReady = waitForReady
        self.path = path
        self.metadata = metadata
        self.request = request ?? []
        self.deadline = deadline
        self.maxReceiveMessageSize = maxReceiveMessageSize
        self.completion = completion
        self.deframer = MessageDeframer(maxMessageSize: maxReceiveMessageSize)
        super.init()
        if let buffers {
            buffers.waker.call = self
            buffers.waker.reactor = pool.reactor
        }
    }

    var isFinished: Bool {
        if case .finished = self.state { return true }
        return false
    }

    // MARK: reactor entry points

    /// Submitted from the caller's thread: the channel takes it from here.
    override func reactorRunSubmitted() {
        self.pool.start(self)
    }

    override func reactorTimerFired(tag: UInt64) {
        switch tag {
        case TimerTag.retry:
            self.retryTimer = 0
            guard case .backingOff = self.state else { return }
            self.attempt += 1
            self.state = .waiting
            self.pool.dispatchAttempt(self)
        case TimerTag.attempt:
            self.attemptTimer = 0
            self.attemptTimedOut = true
            self.fail(Status(code: .deadlineExceeded, message: "attempt timed out"), reset: true, retryable: true)
        default:
            // The call's deadline: final, whatever attempt is running or waiting.
            self.deadlineTimer = 0
            self.fail(Status(code: .deadlineExceeded, message: "deadline exceeded"), reset: true)
        }
    }

    /// Arms the per-attempt timeout when it ends before the call's deadline.
    func armAttemptTimeout(_ timeout: Duration?) {
        guard let timeout else { return }
        let at = Reactor.clock() &+ UInt64(max(timeout.nanoseconds, 0))
        if self.deadline != 0 && at >= self.deadline { return }
        if self.attemptTimer != 0 { self.pool.reactor.cancelTimer(self.attemptTimer) }
        self.attemptTimer = self.pool.reactor.scheduleTimer(at: at, handler: self, tag: TimerTag.attempt)
    }

    func markWaiting() {
        if case .created = self.state { self.state = .waiting }
    }

    /// True when the server provably never processed the call and it has not been retried transparently yet.
    var canRetryTransparently: Bool {
        !self.transparentlyRetried && self.headerBlocks == 0 && !self.isFinished
            && (!self.requestsStreamed || self.buffers!.canReplay)
    }

    /// Rewinds the call so it can be sent again from the start on another stream.
    func prepareTransparentRetry() {
        self.transparentlyRetried = true
        self.resetAttemptState()
        self.state = .waiting
    }

    private func resetAttemptState() {
        self.attemptTimedOut = false
        self.trailersOnly = false
        self.headerBlocks = 0
        self.responseMessage = nil
        self.extraMessages = false
        self.localFailure = nil
        self.sendOffset = 0
        self.deframer = MessageDeframer(maxMessageSize: self.maxReceiveMessageSize)
        self.initialMetadata = Metadata()
        self.trailingMetadata = Metadata()
        self.grpcStatus = nil
        self.grpcMessage = nil
        self.httpStatus = 0
    }

    func markOpen(connection: HTTP2ClientConnection, streamID: Int32) {
        self.sentBytes += self.request.count
        self.state = .open(connection: connection, streamID: streamID)
    }

    // MARK: streaming

    /// Writes or reads happened on another thread (reactor thread, through `StreamWaker`).
    func streamWake() {
        guard let buffers = self.buffers else { return }
        let work = buffers.takeWakeWork()
        guard case .open(let connection, let streamID) = self.state else { return }
        if work.resumeSending && self.requestsStreamed { connection.resumeData(streamID) }
        if work.consume > 0 { connection.consume(streamID, bytes: work.consume) }
    }

    /// The send buffer drained below its limit after a callback writer was told it was full.
    func notifyWritable() {
        if !self.isFinished { self.onWritable?() }
    }

    /// Ends the attempt locally (deadline, cancel, a receive limit), resetting its stream with CANCEL if it has
    /// one. Only an attempt timeout may be `retryable`.
    func fail(_ status: Status, reset: Bool, retryable: Bool = false) {
        if case .open(let connection, let streamID) = self.state, reset {
            connection.resetStream(streamID, errorCode: NGHTTP2_CANCEL.rawValue)
        }
        self.finish(UnaryResponse(status: status, initialMetadata: self.initialMetadata), retryable: retryable)
    }

    /// `fail(_:reset:)` from any thread: inline on the reactor thread, else handed to it. A streaming call that is
    /// known to have ended costs no hand-off at all.
    func failFromAnyThread(_ status: Status) {
        if self.buffers?.isFinished == true { return }
        let reactor = self.pool.reactor
        if reactor.inReactorThread {
            self.fail(status, reset: true)
        } else {
            reactor.execute { self.fail(status, reset: true) }
        }
    }

    /// Where every attempt ends. The retry handler may send another attempt; otherwise this is the call's single
    /// completion point.
    func finish(_ response: UnaryResponse, retryable: Bool = true) {
        switch self.state {
        case .finished: return
        case .backingOff where retryable: return
        default: break
        }
        if self.attemptTimer != 0 {
            self.pool.reactor.cancelTimer(self.attemptTimer)
            self.attemptTimer = 0
        }
        if self.attempt > 0 {
            if case .backingOff = self.state {
                // Cancelled or timed out between attempts: the previous attempt was already reported.
            } else {
                self.pool.attemptFinished(self, status: response.status)
                if retryable, !self.requestsStreamed, let delay = self.pool.retryDelay(
                    for: self, response: response, committed: self.headerBlocks > 0 && !self.trailersOnly,
                    attemptTimedOut: self.attemptTimedOut)
                {
                    self.resetAttemptState()
                    self.state = .backingOff
                    self.retryTimer = self.pool.reactor.scheduleTimer(
                        at: Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0)), handler: self, tag: TimerTag.retry)
                    return
                }
            }
        }
        self.state = .finished
        for timer in [self.deadlineTimer, self.retryTimer] where timer != 0 {
            self.pool.reactor.cancelTimer(timer)
        }
        self.deadlineTimer = 0
        self.retryTimer = 0
        if self.startedAt != 0 { self.pool.callFinished(self, status: response.status) }
        self.buffers?.finish(StreamResult(response))
        self.completion(response)
    }

    /// The reactor refused the call (it has stopped): complete it here, on the caller's thread, as nothing else
    /// can ever touch it.
    func finishWithoutReactor(_ status: Status) {
        self.state = .finished
        let response = UnaryResponse(status: status)
        self.buffers?.finish(StreamResult(response))
        self.completion(response)
    }

    // MARK: request body (nghttp2 data provider)

    /// Copies the next piece of the framed request into `buffer`; sets `eof` after the last byte.
    /// Returns `NGHTTP2_ERR_DEFERRED` when a request stream has nothing buffered yet.
    func readRequest(into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool) -> Int {
        if self.requestsStreamed {
            let written = self.buffers!.take(into: buffer, length: length, eof: &eof)
            if written > 0 { self.sentBytes += written }
            return written
        }
        let written = MessageFramer.copyFramed(
            self.request, offset: &self.sendOffset, into: buffer, capacity: length)
        eof = self.sendOffset == self.request.count + 5
        return written
    }

    // MARK: response (nghttp2 callbacks, through the connection)

    func beginHeaders() {
        self.inFinalHeaders = self.headerBlocks > 0
    }

    func header(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) {
        if self.isFinished { return }
        if name.first == UInt8(ascii: ":") {
            if HeaderName.equals(name, HeaderName.status) { self.httpStatus = HeaderName.parseInt(value) ?? 0 }
            return
        }
        if HeaderName.equals(name, HeaderName.grpcStatus) {
            self.grpcStatus = HeaderName.parseInt(value) ?? StatusCode.unknown.rawValue
            return
        }
        if HeaderName.equals(name, HeaderName.grpcMessage) {
            self.grpcMessage = PercentEncoding.decode(value)
            return
        }
        if HeaderName.equals(name, HeaderName.grpcAcceptEncoding) {
            // Transport negotiation, not application metadata (grpc-go and grpc-java keep it out too); it would
            // cost three allocations per call against servers that send it on every response.
            return
        }
        if !self.inFinalHeaders {
            if HeaderName.equals(name, HeaderName.contentType) {
                self.contentType = String(decoding: value, as: UTF8.self)
                return
            }
            if HeaderName.equals(name, HeaderName.grpcEncoding) {
                let encoding = String(decoding: value, as: UTF8.self)
                self.grpcEncoding = encoding
                self.deframer.compressionAllowed = encoding != "identity"
                return
            }
        }
        let nameText = String(decoding: name, as: UTF8.self)
        let entry: MetadataValue
        if nameText.hasSuffix("-bin") {
            // Repeated values may arrive joined with ","; split before decoding (PROTOCOL-HTTP2.md).
            guard let bytes = Base64.decode(value.split(separator: UInt8(ascii: ",")).joined()) else { return }
            entry = .binary(bytes)
        } else {
            entry = .string(String(decoding: value, as: UTF8.self))
        }
        if self.inFinalHeaders {
            self.trailingMetadata.append(nameText, entry)
        } else {
            self.initialMetadata.append(nameText, entry)
        }
    }

    /// A complete header block arrived; `endStream` when it ends the stream (trailers, or trailers-only).
    func headersComplete(endStream: Bool) {
        if (100..<200).contains(self.httpStatus) && self.headerBlocks == 0 && !endStream {
            // Informational (1xx) block: skip it and read the next one (PROTOCOL-HTTP2.md).
            self.httpStatus = 0
            self.initialMetadata = Metadata()
            return
        }
        if self.headerBlocks == 0 && endStream {
            self.trailersOnly = true
            // Trailers-only: what arrived belongs to the trailers.
            self.trailingMetadata = self.initialMetadata
            self.initialMetadata = Metadata()
        }
        self.headerBlocks += 1
        if self.headerBlocks == 1 && !endStream && !self.isFinished {
            switch self.delivery {
            case .single: break
            case .callbacks(let callbacks): callbacks.onInitialMetadata(self.initialMetadata)
            case .buffered: self.buffers!.deliverMetadata(self.initialMetadata)
            }
        }
        if endStream, case .open(let connection, let streamID) = self.state, !connection.isLocallyClosed(streamID) {
            // The server ended the call while requests are still open: the status is final now. Our half of the
            // stream is reset (NO_ERROR) so that nghttp2 releases it (gRPC over HTTP/2: the server may end first).
            self.finish(self.finalResponse(errorCode: 0), retryable: false)
            connection.resetStream(streamID, errorCode: NGHTTP2_NO_ERROR.rawValue)
        }
    }

    /// DATA payload bytes for this stream.
    func data(_ bytes: UnsafeRawBufferPointer) {
        if self.isFinished || self.localFailure != nil { return }
        self.receivedBytes += bytes.count
        do {
            try self.deframer.process(bytes) { message, _ in
                switch self.delivery {
                case .single:
                    if self.responseMessage == nil {
                        self.responseMessage = message
                    } else {
                        self.extraMessages = true
                    }
                case .callbacks(let callbacks):
                    if !self.isFinished { callbacks.onMessage(message) }
                case .buffered:
                    self.buffers!.deliverMessage(message)
                }
            }
            // Flow control follows consumption: bytes go back to the server's window at once, except while an async
            // reader has more than its limit unread.
            var consumeNow = bytes.count
            if case .buffered = self.delivery { consumeNow = self.buffers!.received(bytes.count) }
            if consumeNow > 0, case .open(let connection, let streamID) = self.state {
                connection.consume(streamID, bytes: consumeNow)
            }
        } catch {
            let status: Status
            switch error {
            case .messageTooLarge(let length, let limit):
                status = Status(
                    code: .resourceExhausted,
                    message: "response message of \(length) bytes exceeds the receive limit of \(limit) bytes")
            case .compressedWithoutEncoding:
                status = Status(
                    code: .internal, message: "compressed message received without a grpc-encoding header")
            case .invalidFlag(let flag):
                status = Status(code: .internal, message: "invalid message flag \(flag) in response")
            }
            self.localFailure = status
            self.fail(status, reset: true)
        }
    }

    /// The HTTP/2 stream closed; work out the one true status.
    func streamClosed(errorCode: UInt32) {
        if self.isFinished { return }
        self.finish(self.finalResponse(errorCode: errorCode))
    }

    private func finalResponse(errorCode: UInt32) -> UnaryResponse {
        var status: Status
        if let failure = self.localFailure {
            status = failure
        } else if self.headerBlocks == 0 || (self.grpcStatus == nil && self.headerBlocks < 2 && errorCode != 0) {
            status =
                errorCode == 0
                ? Status(code: .internal, message: "stream closed without a response")
                : Status.forRSTStream(errorCode: errorCode)
        } else if let code = self.grpcStatus {
            status = Status(code: StatusCode(rawValue: code), message: self.grpcMessage ?? "")
        } else if self.httpStatus != 200 && self.httpStatus != 0 {
            status = Status(
                code: Status.code(forHTTPStatus: self.httpStatus),
                message: "HTTP status \(self.httpStatus) without grpc-status"
                    + (self.contentType.map { " (content-type \($0))" } ?? ""))
        } else if let type = self.contentType, !type.hasPrefix("application/grpc") {
            status = Status(code: .unknown, message: "unexpected content-type \"\(type)\" in response")
        } else if errorCode != 0 {
            status = Status.forRSTStream(errorCode: errorCode)
        } else {
            status = Status(code: .internal, message: "stream ended without grpc-status trailers")
        }

        let singleResponse: Bool
        if case .single = self.delivery { singleResponse = true } else { singleResponse = false }
        if status.isOK {
            if self.deframer.hasPartialMessage {
                status = Status(code: .internal, message: "stream ended in the middle of a message")
            } else if !singleResponse {
            } else if self.extraMessages {
                status = Status(code: .internal, message: "expected one response message, received more")
            } else if self.responseMessage == nil {
                status = Status(code: .internal, message: "expected one response message, the call ended with OK but none")
            }
        }
        return UnaryResponse(
            status: status, message: status.isOK ? (self.responseMessage ?? []) : [],
            initialMetadata: self.initialMetadata, trailingMetadata: self.trailingMetadata)
    }
}

/// Header names compared as bytes, so the common headers never become Strings.
enum HeaderName {
    static let status: StaticString = ":status"
    static let grpcStatus: StaticString = "grpc-status"
    static let grpcMessage: StaticString = "grpc-message"
    static let contentType: StaticString = "content-type"
    static let grpcEncoding: StaticString = "grpc-encoding"
    static let grpcAcceptEncoding: StaticString = "grpc-accept-encoding"

    @inline(__always)
    static func equals(_ bytes: UnsafeBufferPointer<UInt8>, _ name: StaticString) -> Bool {
        guard bytes.count == name.utf8CodeUnitCount else { return false }
        return memcmp(bytes.baseAddress!, name.utf8Start, bytes.count) == 0
    }

    /// A non-negative decimal without a sign; nil for anything else.
    static func parseInt(_ bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        guard !bytes.isEmpty, bytes.count <= 10 else { return nil }
        var value = 0
        for byte in bytes {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + Int(byte - UInt8(ascii: "0"))
        }
        return value
    }
}
