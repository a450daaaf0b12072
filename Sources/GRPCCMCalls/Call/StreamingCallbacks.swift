import GRPCCMWire

/// What a callback-driven streaming call reports, each on the reactor thread, outside the library's I/O processing
/// and never inside the call that started the stream (so each may use the whole API: send, cancel, start another
/// call, close the channel). They must not block: a slow `onMessage` holds up every connection of the reactor (use
/// the async form to read at your own pace).
public struct StreamingCallbacks: Sendable {
    /// Response headers, once, before the first message (not called for a trailers-only response).
    public var onInitialMetadata: @Sendable (CallMetadata) -> Void
    /// Each response message, in order. Its bytes return to the server's flow-control window as they arrive: the
    /// reactor is the pace of a callback reader (read with the async form to hold the server back).
    public var onMessage: @Sendable ([UInt8]) -> Void
    /// The send buffer drained after `StreamingCall.isWritable` (or `send`) reported it full.
    public var onWritable: @Sendable () -> Void
    /// The end, exactly once, after every message.
    public var onFinish: @Sendable (StreamResult) -> Void

    /// Callbacks for a stream; only `onMessage` and `onFinish` are required.
    public init(
        onInitialMetadata: @escaping @Sendable (CallMetadata) -> Void = { _ in },
        onMessage: @escaping @Sendable ([UInt8]) -> Void,
        onWritable: @escaping @Sendable () -> Void = {},
        onFinish: @escaping @Sendable (StreamResult) -> Void
    ) {
        self.onInitialMetadata = onInitialMetadata
        self.onMessage = onMessage
        self.onWritable = onWritable
        self.onFinish = onFinish
    }
}

