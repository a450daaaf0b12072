import GRPCCMCalls
import GRPCCMReactor
import GRPCCMWire

/// The request side of a callback-driven client- or bidirectional-streaming call. Safe from any thread.
///
/// Backpressure follows grpc-java's `isReady`/`onReady`: `send` always buffers the message (unless the call ended
/// or the requests were closed) and tells whether the buffer is now full; when it is, stop sending until
/// `onWritable` runs.
///
/// Letting go of it does not end the call (unlike the async forms, which cancel when released): the requests stay
/// open until `closeSend()` or `cancel()`, or the call's deadline; without one, a server that waits for the end of
/// the requests keeps the stream for good.
public struct StreamingCall: Sendable {
    let handle: CallHandle
    let buffers: StreamBuffers

    /// Buffers `message` for sending.
    /// - Returns: `.accepted`, `.full` (accepted, but wait for `onWritable` before sending more), or `.refused`
    ///   when the requests were closed or the call has ended (the message is dropped).
    @discardableResult
    public func send(_ message: [UInt8]) -> SendResult {
        switch self.buffers.write(message) {
        case .accepted: return .accepted
        case .acceptedFull: return .full
        case .refused(let error): return .refused(error)
        }
    }

    /// Whether a message sent now would go out without waiting (false after the end or `closeSend`).
    public var isWritable: Bool { self.buffers.isWritable }

    /// Half-closes the requests: END_STREAM follows the buffered messages. Idempotent.
    public func closeSend() { self.buffers.closeRequests() }

    /// Ends the call with CANCELLED (RST_STREAM CANCEL), unless it already ended.
    public func cancel() { self.handle.cancel() }

    /// What `send` did with a message.
    public enum SendResult: Sendable, Equatable {
        /// Accepted; there is room for more.
        case accepted
        /// Accepted; the buffer is full: wait for `onWritable`.
        case full
        /// Dropped: the call ended (with this status) or the requests were closed.
        case refused(CallError)
    }
}

/// A streaming call driven with async/await: server streaming (its request already sent) or bidirectional.
///
/// One task writes and one task reads; they may be different tasks. Dropping the object cancels the call if it
/// has not ended, so an abandoned stream never leaks.
public final class AsyncStreamingCall: Sendable {
    let handle: CallHandle
    let buffers: StreamBuffers
    private let writable: Bool

    init(handle: CallHandle, buffers: StreamBuffers, writable: Bool) {
        self.handle = handle
        self.buffers = buffers
        self.writable = writable
    }

    deinit {
        self.handle.cancel()
    }

    /// Sends one request message, suspending while the send buffer is full (the HTTP/2 window drains it).
    /// - Throws: `CallError` when the call has ended (its status; FAILED_PRECONDITION after an OK end) or the requests
    ///   were closed. Called from a cancelled task, or cancelled while it waits, it cancels the call (CANCELLED).
    public func write(_ message: [UInt8]) async throws {
        guard self.writable else {
            throw CallError(status: CallStatus(code: .failedPrecondition, message: "a server-streaming call takes no more requests"))
        }
        let handle = self.handle
        try await self.buffers.writeWaitingForRoom(message, cancel: { handle.cancel() })
    }

    /// Half-closes the requests (END_STREAM after what was written). Idempotent. Called from a cancelled task, it
    /// cancels the call instead: requests cut short by the cancellation must not reach the server as complete. Does
    /// nothing on a server-streaming call, whose one request went out complete.
    public func closeSend() {
        guard self.writable else { return }
        self.buffers.closeSend(cancelling: self.handle)
    }

    /// Ends the call with CANCELLED unless it already ended.
    public func cancel() { self.handle.cancel() }

    /// The response messages, in order, read at the caller's pace: the server's window reopens as they are read.
    /// Iteration ends after the last message when the call ends with OK, and throws `CallError` otherwise. Read
    /// from one task at a time.
    public var responses: ResponseMessages { ResponseMessages(call: self) }

    /// Waits for the end: status, headers and trailers. It may be awaited while another task reads `responses`, or
    /// with no reader at all when the response is small. Unread messages keep their flow control: once more than
    /// `Configuration.streamBufferSize` bytes of them wait, the server is not given room to send the rest, so a call
    /// that ignores a large response waits for its deadline. Read (or cancel) what you do not want. Cancelling the
    /// task cancels the call.
    public func result() async -> StreamResult {
        await withTaskCancellationHandler {
            await self.buffers.result()
        } onCancel: {
            self.handle.cancel()
        }
    }

    /// The next response part (headers, a message, or the end). Cancelling the task cancels the call.
    func nextPart() async -> ResponsePart {
        await withTaskCancellationHandler {
            await self.buffers.nextPart()
        } onCancel: {
            self.handle.cancel()
        }
    }

    /// Response messages of an `AsyncStreamingCall`.
    public struct ResponseMessages: AsyncSequence, Sendable {
        public typealias Element = [UInt8]
        let call: AsyncStreamingCall

        public func makeAsyncIterator() -> Iterator { Iterator(call: self.call) }

        /// Reads the response messages in order; see `ResponseMessages`.
        public struct Iterator: AsyncIteratorProtocol {
            let call: AsyncStreamingCall
            var done = false

            /// The next response message; nil once the call ended OK; throws the call's `CallError` when it ended
            /// with another status. In a cancelled task it cancels the call and throws at once, with the call's
            /// status (CANCELLED, unless it had ended otherwise), whatever messages were still unread; once the call
            /// has ended and every message was read, it ends as it would have.
            public mutating func next() async throws(CallError) -> [UInt8]? {
                while !self.done {
                    if Task.isCancelled && !self.call.buffers.isFinishedAndRead {
                        // Not the backlog first: the reader asked to stop, and a long backlog would keep it reading.
                        // Not nil either when the call had ended OK: unread messages would pass for a complete read.
                        self.done = true
                        self.call.cancel()
                        let result = await self.call.buffers.result()
                        let status = result.status.isOK
                            ? CallStatus(code: .cancelled, message: "the task reading the responses was cancelled")
                            : result.status
                        throw CallError(status: status, trailers: result.trailingMetadata)
                    }
                    switch await self.call.nextPart() {
                    case .metadata: continue
                    case .message(let message): return message
                    case .end(let result):
                        self.done = true
                        if !result.status.isOK {
                            throw CallError(status: result.status, trailers: result.trailingMetadata)
                        }
                    }
                }
                return nil
            }
        }
    }
}

/// A client-streaming call driven with async/await: write, close, then read the one response.
public final class AsyncClientStreamingCall: Sendable {
    let handle: CallHandle
    let buffers: StreamBuffers
    let response: AsyncResponseBox

    init(handle: CallHandle, buffers: StreamBuffers, response: AsyncResponseBox) {
        self.handle = handle
        self.buffers = buffers
        self.response = response
    }

    deinit {
        self.handle.cancel()
    }

    /// Sends one request message, suspending while the send buffer is full.
    /// - Throws: `CallError` when the call has ended or the requests were closed. Called from a cancelled task, or
    ///   cancelled while it waits, it cancels the call (CANCELLED).
    public func write(_ message: [UInt8]) async throws {
        let handle = self.handle
        try await self.buffers.writeWaitingForRoom(message, cancel: { handle.cancel() })
    }

    /// Half-closes the requests. Idempotent. Called from a cancelled task, it cancels the call instead: requests
    /// cut short by the cancellation must not reach the server as complete.
    public func closeSend() { self.buffers.closeSend(cancelling: self.handle) }

    /// Ends the call with CANCELLED unless it already ended.
    public func cancel() { self.handle.cancel() }

    /// Closes the requests (if still open) and waits for the response: returned when the call ends OK, otherwise
    /// the call's `CallError` (status and trailers) is thrown. Cancelling the task cancels the call.
    public func finish() async throws(CallError) -> UnaryResponse {
        let response = await self.finishResult()
        return try response.get()
    }

    /// The non-throwing form of `finish()`: closes the requests and returns how the call ended, whatever the status.
    /// Cancelling the task cancels the call.
    public func finishResult() async -> UnaryResponse {
        // In a cancelled task (an upload loop over an AsyncStream ends quietly when its task is cancelled), the call
        // is cancelled, not half-closed: its requests were cut short.
        self.buffers.closeSend(cancelling: self.handle)
        return await withTaskCancellationHandler {
            await self.response.value()
        } onCancel: {
            self.handle.cancel()
        }
    }
}

/// Holds a unary-style response until someone asks for it.
final class AsyncResponseBox: Sendable {
    private let state = PThreadLock<(response: UnaryResponse?, waiters: [CheckedContinuation<UnaryResponse, Never>])>((nil, []))

    func set(_ response: UnaryResponse) {
        let waiters = self.state.withLock { state -> [CheckedContinuation<UnaryResponse, Never>] in
            state.response = response
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(returning: response) }
    }

    func value() async -> UnaryResponse {
        await withCheckedContinuation { continuation in
            let response = self.state.withLock { state -> UnaryResponse? in
                if let response = state.response { return response }
                state.waiters.append(continuation)
                return nil
            }
            if let response { continuation.resume(returning: response) }
        }
    }
}

extension StreamBuffers {
    /// `closeSend()` of the async calls: half-closes the requests, or, in a cancelled task, cancels the call.
    fileprivate func closeSend(cancelling handle: CallHandle) {
        if Task.isCancelled {
            handle.cancel()
        } else {
            self.closeRequests()
        }
    }
}
