import GRPCCMCalls
import GRPCCMReactor
import GRPCCMWire

/// Server-, client- and bidirectional-streaming calls, in callback and async form.
///
/// Every call ends exactly once with a status, whatever ends it: the server's trailers (possibly before the client
/// closed its requests), a reset, the deadline (which covers the whole stream), `cancel()` from any thread, task
/// cancellation, or the connection going away. Retries: a server-streaming call is retried by the retry policy
/// until the server's headers arrive (gRFC A6 commit); a call whose requests are a stream is never retried by
/// policy (its messages are not kept for replay), only transparently when the server provably never saw it.
extension GRPCChannel {
    // MARK: callbacks

    /// Starts a server-streaming call: one request, then `callbacks` receive the headers, each message and the end
    /// on the reactor thread.
    /// - Returns: A handle that can cancel the call from any thread.
    @discardableResult
    public func serverStreaming(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions(),
        callbacks: StreamingCallbacks
    ) -> CallHandle {
        let onFinish = callbacks.onFinish
        return self.start(
            path: path, request: request, metadata: metadata, options: options, delivery: .callbacks(callbacks),
            completion: { onFinish(StreamResult($0)) })
    }

    /// Starts a client-streaming call: send messages through the returned call, `closeSend()`, and `completion`
    /// receives the one response with the status, exactly once, on the reactor thread.
    /// - Parameters:
    ///   - path: The method, `/package.Service/Method`.
    ///   - metadata: Request metadata.
    ///   - options: Deadline, receive limit, wait-for-ready.
    ///   - onWritable: Runs when the send buffer drains after `send` returned `.full`.
    ///   - completion: Receives the response and the status, exactly once, on the reactor thread.
    public func clientStreaming(
        path: String, metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions(),
        onWritable: @escaping @Sendable () -> Void = {},
        completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> StreamingCall {
        let buffers = self.makeBuffers(path: path, options: options)
        let handle = self.start(
            path: path, request: nil, metadata: metadata, options: options, delivery: .single, buffers: buffers,
            onWritable: onWritable, completion: completion)
        return StreamingCall(handle: handle, buffers: buffers)
    }

    /// Starts a bidirectional-streaming call: send through the returned call; `callbacks` receive the headers,
    /// each message and the end on the reactor thread.
    public func bidirectionalStreaming(
        path: String, metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions(), callbacks: StreamingCallbacks
    ) -> StreamingCall {
        let buffers = self.makeBuffers(path: path, options: options)
        let onFinish = callbacks.onFinish
        let handle = self.start(
            path: path, request: nil, metadata: metadata, options: options, delivery: .callbacks(callbacks),
            buffers: buffers, onWritable: callbacks.onWritable, completion: { onFinish(StreamResult($0)) })
        return StreamingCall(handle: handle, buffers: buffers)
    }

    // MARK: async

    /// Starts a server-streaming call read with async/await: iterate `responses`, or await `result()`.
    public func serverStreaming(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions()
    ) -> AsyncStreamingCall {
        let buffers = self.makeBuffers(path: path, options: options)
        let handle = self.start(
            path: path, request: request, metadata: metadata, options: options, delivery: .buffered, buffers: buffers,
            completion: { _ in })
        return AsyncStreamingCall(handle: handle, buffers: buffers, writable: false)
    }

    /// Starts a client-streaming call driven with async/await: `write`, then `finish()` for the response.
    public func clientStreaming(
        path: String, metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions()
    ) -> AsyncClientStreamingCall {
        let buffers = self.makeBuffers(path: path, options: options)
        let box = AsyncResponseBox()
        let handle = self.start(
            path: path, request: nil, metadata: metadata, options: options, delivery: .single, buffers: buffers,
            completion: { box.set($0) })
        return AsyncClientStreamingCall(handle: handle, buffers: buffers, response: box)
    }

    /// Starts a bidirectional-streaming call driven with async/await: `write` and `closeSend()` from one task,
    /// iterate `responses` from another (or the same).
    public func bidirectionalStreaming(
        path: String, metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions()
    ) -> AsyncStreamingCall {
        let buffers = self.makeBuffers(path: path, options: options)
        let handle = self.start(
            path: path, request: nil, metadata: metadata, options: options, delivery: .buffered, buffers: buffers,
            completion: { _ in })
        return AsyncStreamingCall(handle: handle, buffers: buffers, writable: true)
    }

    // MARK: for the grpc-swift-2 transport

    /// Buffers for a stream that starts later (the transport's reader may wait on them before the request
    /// metadata, and so the call, exists).
    package func makeStreamBuffers(
        path: String, maxSendMessageSize: Int?, compression: CallCompression? = nil
    ) -> StreamBuffers {
        StreamBuffers(
            limit: self.configuration.streamBufferSize,
            // The call's own limit when it sets one (GRPCCore's CallOptions), larger or smaller, as for responses.
            maxSendMessageSize: maxSendMessageSize ?? self.configuration.maxMessageSize,
            requestEncoding: compression ?? self.configuration.requestEncoding(forPath: path))
    }

    /// Starts a bidirectional call on `buffers` (every grpc-swift-2 method is a stream to its transport).
    /// - Parameter previousAttempts: Attempts GRPCCore's retry executor already made (`grpc-previous-rpc-attempts`).
    package func startStream(
        path: String, metadata: CallMetadata, options: RequestOptions, previousAttempts: Int, buffers: StreamBuffers
    ) -> CallHandle {
        self.start(
            path: path, request: nil, metadata: metadata, options: options, delivery: .buffered, buffers: buffers,
            previousAttempts: previousAttempts, completion: { _ in })
    }
}
