/// A call that did not end with OK, as a Swift error: the status plus the trailing metadata that came with it.
public struct CallError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The status the call ended with.
    public var status: CallStatus
    /// Trailing metadata received with the status (empty when the failure was local).
    public var trailers: CallMetadata

    /// An error for `status`, with the trailers that came with it.
    public init(status: CallStatus, trailers: CallMetadata = CallMetadata()) {
        self.status = status
        self.trailers = trailers
    }

    /// The status's code.
    public var code: StatusCode { self.status.code }
    /// The status's message.
    public var message: String { self.status.message }

    public var description: String { "\(self.status.code): \"\(self.status.message)\"" }
}
