/// What a unary call ended with. `status` is always set; `message` is the response (empty unless OK).
public struct UnaryResponse: Sendable, Hashable {
    /// The call's final status.
    public var status: CallStatus
    /// The response message bytes (empty unless the status is OK).
    public var message: [UInt8]
    /// Response headers (the server's initial metadata).
    public var initialMetadata: CallMetadata
    /// Trailers (trailing metadata) that came with the status.
    public var trailingMetadata: CallMetadata

    /// A response with these fields (tests and interceptors make them; calls deliver them).
    public init(status: CallStatus, message: [UInt8] = [], initialMetadata: CallMetadata = CallMetadata(), trailingMetadata: CallMetadata = CallMetadata()) {
        self.status = status
        self.message = message
        self.initialMetadata = initialMetadata
        self.trailingMetadata = trailingMetadata
    }

    /// The response itself when the call ended OK; otherwise its `CallError` (the status and the trailers), thrown.
    /// What the throwing call forms return.
    public func get() throws(CallError) -> UnaryResponse {
        guard self.status.isOK else { throw CallError(status: self.status, trailers: self.trailingMetadata) }
        return self
    }
}

/// How a streaming call ended: always a status, plus the metadata the server sent.
public struct StreamResult: Sendable, Hashable {
    /// The call's final status.
    public var status: CallStatus
    /// Response headers (empty for a trailers-only response or a call that never reached the server).
    public var initialMetadata: CallMetadata
    /// Trailers that came with the status.
    public var trailingMetadata: CallMetadata

    /// A result with these fields.
    public init(status: CallStatus, initialMetadata: CallMetadata = CallMetadata(), trailingMetadata: CallMetadata = CallMetadata()) {
        self.status = status
        self.initialMetadata = initialMetadata
        self.trailingMetadata = trailingMetadata
    }

    package init(_ response: UnaryResponse) {
        self.init(
            status: response.status, initialMetadata: response.initialMetadata,
            trailingMetadata: response.trailingMetadata)
    }
}

