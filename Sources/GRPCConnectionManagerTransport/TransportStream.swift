import GRPCConnectionManager
import GRPCCore

/// One `withStream`: the call starts when GRPCCore writes the request metadata (it comes first, and carries
/// `grpc-timeout` and `grpc-previous-rpc-attempts`), so the reader waits on buffers that exist from the start.
final class TransportStream: Sendable {
    let channel: GRPCChannel
    let path: String
    let options: GRPCCore.CallOptions
    let buffers: StreamBuffers
    private let state = PThreadLock(StartState())

    /// Where the call is in starting, under the lock. The call is started outside it (its interceptors run then, for
    /// as long as they take): a cancel meanwhile is kept, and applied by the start once the handle exists.
    private struct StartState {
        var handle: CallHandle?
        var starting = false
        var cancelled = false
        /// The status of a cancel that came while starting (nil: CANCELLED).
        var cancelStatus: CallStatus?
        /// That cancel was GRPCCore's deadline passing (`cancelStatus` says so), not the caller giving up.
        var cancelExpired = false
        /// When GRPCCore's deadline passes (from `grpc-timeout`, as the call was started), if it set one.
        var deadline: ContinuousClock.Instant?
        /// The timeout `deadline` was reckoned from.
        var timeout: Duration?
    }

    /// How much earlier than `deadline` GRPCCore's own may pass: GRPCCore's one-shot executor computes
    /// `grpc-timeout` before it spawns the task that calls `withStream`, and on a loaded machine (2 cores, a
    /// sanitizer) that task can start milliseconds later. A tenth of the timeout, at least 1 ms and at most 100 ms:
    /// a caller's own cancel that late is counted as the timeout it almost was.
    static func slack(_ timeout: Duration?) -> Duration {
        guard let timeout else { return .zero }
        return min(max(timeout / 10, .milliseconds(1)), .milliseconds(100))
    }

    /// How a cancel that GRPCCore's deadline caused ends the call: as the call's own deadline would have, a failure
    /// the breaker and the metrics count, not the caller's cancel (which the breaker ignores).
    static let deadlineExceeded = CallStatus(code: .deadlineExceeded, message: "deadline exceeded")

    /// When `withStream` made it: GRPCCore wrote `grpc-timeout` just before, so its deadline is this plus that
    /// timeout. (Not the metadata's arrival: GRPCCore's own interceptors, a token fetch say, run in between.)
    private let openedAt = ContinuousClock.now

    init(channel: GRPCChannel, path: String, options: GRPCCore.CallOptions) {
        self.channel = channel
        self.path = path
        self.options = options
        self.buffers = channel.makeStreamBuffers(
            path: path, maxSendMessageSize: options.maxRequestMessageBytes,
            compression: options.compression.map(Self.algorithm))
    }

    /// GRPCCore's name for a compression algorithm, in ours.
    private static func algorithm(_ algorithm: GRPCCore.CompressionAlgorithm) -> CallCompression {
        switch algorithm {
        case .gzip: .gzip
        case .deflate: .deflate
        default: .identity
        }
    }

    /// Starts the HTTP/2 stream with the request metadata.
    func start(_ metadata: GRPCCore.Metadata) throws {
        var converted = GRPCConnectionManager.CallMetadata()
        var timeout = self.options.timeout
        var previousAttempts = 0
        for (key, value) in metadata {
            let name = key.lowercased()
            switch (name, value) {
            case ("grpc-timeout", .string(let text)):
                // GRPCCore's deadline, recomputed for each attempt: it wins over the options' timeout.
                if let nanos = GRPCTimeout.decode(text) { timeout = .nanoseconds(nanos) }
            case ("grpc-previous-rpc-attempts", .string(let text)):
                previousAttempts = Int(text) ?? 0
            case (_, .string(let text)) where name.hasSuffix("-bin"):
                // grpc-swift's own transport sends such a string as it is, taking it for the value's base64: so do
                // we, as the bytes it encodes. One that is not base64 is refused (INVALID_ARGUMENT) by validation.
                if let bytes = Base64.decode(text.utf8) {
                    converted.add(name, binary: bytes)
                } else {
                    converted.add(name, text)
                }
            case (_, .string(let text)):
                converted.add(name, text)
            case (_, .binary(let bytes)):
                converted.add(name, binary: bytes)
            }
        }
        // The compression too, though the buffers already compress with it: interceptors read it from the options.
        let callOptions = GRPCConnectionManager.RequestOptions(
            timeout: timeout, maxReceiveMessageSize: self.options.maxResponseMessageBytes,
            waitForReady: self.options.waitForReady ?? false, compression: self.options.compression.map(Self.algorithm))
        let proceed = self.state.withLock { state -> Bool? in
            if state.handle != nil || state.starting { return nil }
            // Cancelled first: the buffers already hold the CANCELLED end; nothing starts.
            if state.cancelled { return false }
            state.starting = true
            state.deadline = timeout.map { self.openedAt + $0 }
            state.timeout = timeout
            return true
        }
        guard let proceed else {
            throw GRPCCore.RPCError(code: .internalError, message: "request metadata written twice")
        }
        guard proceed else { return }
        // Outside the lock: the channel runs the interceptors now, and a cancel must not wait for them.
        let handle = self.channel.startStream(
            path: self.path, metadata: converted, options: callOptions, previousAttempts: previousAttempts,
            buffers: self.buffers)
        let cancel = self.state.withLock { state -> (status: CallStatus?, expired: Bool)? in
            state.handle = handle
            state.starting = false
            return state.cancelled ? (state.cancelStatus, state.cancelExpired) : nil
        }
        if let cancel { Self.cancel(handle, with: cancel.status, expired: cancel.expired) }
    }

    private static func cancel(_ handle: CallHandle, with status: CallStatus?, expired: Bool) {
        if expired {
            handle.fail(with: Self.deadlineExceeded)
        } else if let status {
            handle.cancel(with: status)
        } else {
            handle.cancel()
        }
    }

    /// Sends one message, suspending while the send buffer is full.
    func write(_ message: [UInt8]) async throws {
        guard self.state.withLock({ $0.handle != nil || $0.cancelled }) else {
            throw GRPCCore.RPCError(code: .internalError, message: "a request message was written before the metadata")
        }
        // A cancelled writer's task ends the RPC, whether or not the buffer has room: its producer (a loop over an
        // AsyncStream, say) may stop quietly when cancelled, and what follows must not look like a whole request.
        if Task.isCancelled {
            self.cancel()
            throw GRPCCore.RPCError(code: .cancelled, message: "the task writing the requests was cancelled")
        }
        switch self.buffers.write(message) {
        case .accepted: return
        case .refused(let error): throw GRPCCore.RPCError(error)
        case .acceptedFull:
            do {
                // A writer's task that is cancelled ends the RPC (as cancelling a reader's does): GRPCCore abandons
                // an attempt by cancelling the tasks that use its stream, not the one that opened it.
                try await withTaskCancellationHandler {
                    try await self.buffers.waitUntilWritable()
                } onCancel: {
                    self.cancel()
                }
            } catch let error as GRPCConnectionManager.CallError {
                throw GRPCCore.RPCError(error)
            }
        }
    }

    /// Half-closes the requests; in a cancelled task, cancels the RPC instead (GRPCCore finishes the writer when the
    /// producer returns, and a producer returns early when cancelled: END_STREAM would send a truncated request as
    /// a whole one).
    func finishRequests() {
        if Task.isCancelled {
            self.cancel()
        } else {
            self.buffers.closeRequests()
        }
    }

    /// Resets the stream (or, before it started, ends it) with CANCELLED, or with `status` when given. Safe to call
    /// more than once; free once the stream has ended (every `withStream` calls it on the way out).
    ///
    /// GRPCCore enforces its deadline itself, by cancelling the tasks that use the stream, and its timer fires
    /// before the call's own (which starts a little later, from the `grpc-timeout` it was given). A cancel once that
    /// deadline has passed (without a status, or CANCELLED: a request producer stopped by it) is therefore the
    /// deadline, and ends the call DEADLINE_EXCEEDED as a failure: as the caller's cancel, the breaker never counted
    /// a server that does not answer in time.
    func cancel(with status: CallStatus? = nil) {
        if self.buffers.isFinished { return }
        let (handle, starting, expired) = self.state.withLock { state -> (CallHandle?, Bool, Bool) in
            let expired = (status == nil || status?.code == .cancelled)
                && state.deadline.map { ContinuousClock.now + Self.slack(state.timeout) >= $0 } == true
            if state.starting && !state.cancelled {
                state.cancelStatus = expired ? Self.deadlineExceeded : status
                state.cancelExpired = expired
            }
            state.cancelled = true
            return (state.handle, state.starting, expired)
        }
        if let handle {
            Self.cancel(handle, with: status, expired: expired)
        } else if starting {
            // Being started on another thread: the start cancels the call once it has it (the buffers are the
            // call's to end then).
        } else {
            self.buffers.finish(
                StreamResult(status: status ?? .init(code: .cancelled, message: "cancelled before the request was sent")))
        }
    }

    /// The status a request producer's error ends the RPC with: its own code and message when it threw an
    /// `RPCError` (GRPCCore wraps any other error in one, UNKNOWN "Write failed.", the original as its cause).
    static func status(forProducerError error: any Error) -> CallStatus {
        guard let error = error as? GRPCCore.RPCError else {
            return CallStatus(code: .unknown, message: "the request producer failed: \(error)")
        }
        // A producer that stopped because it was cancelled (GRPCCore wraps the CancellationError): CANCELLED.
        if error.cause is CancellationError {
            return CallStatus(code: .cancelled, message: "the request producer was cancelled")
        }
        let code = StatusCode(rawValue: GRPCCore.Status.Code(error.code).rawValue)
        let message = error.cause.map { "\(error.message) (\($0))" } ?? error.message
        return CallStatus(code: code, message: message)
    }
}

/// GRPCCore's request writer: metadata starts the call, messages go to the send buffer, `finish` half-closes.
struct RequestWriter: ClosableRPCWriterProtocol {
    typealias Element = RPCRequestPart<[UInt8]>
    let stream: TransportStream

    func write(_ element: Element) async throws {
        switch element {
        case .metadata(let metadata): try self.stream.start(metadata)
        case .message(let message): try await self.stream.write(message)
        }
    }

    func write(contentsOf elements: some Sequence<Element>) async throws {
        for element in elements { try await self.write(element) }
    }

    func finish() async {
        self.stream.finishRequests()
    }

    /// The request producer failed: the RPC ends with its error (the stream reset with CANCEL), not as if the caller
    /// had cancelled.
    func finish(throwing error: any Error) async {
        self.stream.cancel(with: TransportStream.status(forProducerError: error))
    }
}

/// GRPCCore's response sequence: `.metadata` (unless trailers-only), the messages, then `.status`, then the end.
struct ResponseParts: AsyncSequence, Sendable {
    typealias Element = RPCResponsePart<[UInt8]>
    let stream: TransportStream

    func makeAsyncIterator() -> Iterator { Iterator(stream: self.stream) }

    struct Iterator: AsyncIteratorProtocol {
        let stream: TransportStream
        var finished = false

        mutating func next() async throws -> Element? {
            if self.finished { return nil }
            // Cancelling the reading task cancels the RPC, which ends it with CANCELLED: GRPCCore's hedging abandons
            // a losing attempt so, and its RPC waits for that attempt's reader.
            let stream = self.stream
            let part = await withTaskCancellationHandler {
                await stream.buffers.nextPart()
            } onCancel: {
                stream.cancel()
            }
            switch part {
            case .metadata(let metadata):
                return .metadata(GRPCCore.Metadata(metadata))
            case .message(let message):
                return .message(message)
            case .end(let result):
                self.finished = true
                return .status(GRPCCore.Status(result.status), GRPCCore.Metadata(result.trailingMetadata))
            }
        }
    }
}

extension GRPCCore.Metadata {
    init(_ metadata: GRPCConnectionManager.CallMetadata) {
        self.init()
        for entry in metadata {
            switch entry.value {
            case .string(let text): self.addString(text, forKey: entry.name)
            case .binary(let bytes): self.addBinary(bytes, forKey: entry.name)
            }
        }
    }
}

extension GRPCCore.Status {
    init(_ status: GRPCConnectionManager.CallStatus) {
        self.init(code: Code(rawValue: status.code.rawValue) ?? .unknown, message: status.message)
    }
}

extension GRPCCore.RPCError {
    init(_ error: GRPCConnectionManager.CallError) {
        let code = GRPCCore.RPCError.Code(GRPCCore.Status.Code(rawValue: error.status.code.rawValue) ?? .unknown) ?? .unknown
        self.init(code: code, message: error.status.message, metadata: GRPCCore.Metadata(error.trailers))
    }
}
