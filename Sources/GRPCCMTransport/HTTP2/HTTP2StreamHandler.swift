import GRPCCMWire

@_spi(Reactor) import GRPCCMReactor

/// What the HTTP/2 transport tells the owner of one stream (a call attempt), and asks of it. The transport knows
/// streams, not calls: it never sees attempt numbers, deadlines or retries.
///
/// Reactor thread only, and always from inside nghttp2's processing: an implementation records what happened and
/// must not run user code or close the connection from here (user code runs later, from the reactor's deferred
/// phase). After `streamClosed` or `streamFailed`, or once the owner has reset the stream through its handle, the
/// transport never calls the handler again for that stream.
///
/// A base class, not a protocol: nghttp2's callbacks reach the handler of a stream through an unretained reference
/// and a vtable call (`Unmanaged._withUnsafeGuaranteedRef`), about nine retain/release pairs less per unary call than
/// through an existential, which Swift retains for every call made on it. The connection's stream table holds the
/// strong reference; a handler it lets go of while nghttp2 may still be calling back (a reset from inside a callback)
/// is kept until the turn's deferred phase. Every method must be overridden. `open` behind an SPI only because a
/// `package` class cannot be subclassed from another module.
@_spi(Transport)
open class HTTP2StreamHandler: ReactorHandler, @unchecked Sendable {
    // `@unchecked Sendable` as `ReactorHandler`: reactor thread only.
    public override init() { super.init() }

    /// A stream of the client's own, not the application's (a health watch): its end is no activity of the
    /// connection's, which would otherwise never go idle while the watch is restarted (a proxy ending long streams).
    /// `@exclusivity(unchecked)`: set once before the stream opens and read on the loop thread only; the runtime
    /// check on each stream's close cost about 70 instructions.
    @exclusivity(unchecked)
    package var isBackground = false
    /// Set by the connection while the stream's request body has not been asked for by nghttp2 yet (see
    /// `HTTP2ClientConnection.streamsWithBodyUnasked`). Loop thread only, as `isBackground`.
    @exclusivity(unchecked)
    package var bodyUnasked = false

    /// nghttp2 asks for the next DATA frame of the request body, at most `length` bytes: copy them into `buffer` now,
    /// or, when there are at least `RequestBodyRead.noCopyMinimum`, only say how many and hand them over later
    /// through `streamWriteRequest`. Set `eof` when the frame carries the last byte.
    open func streamReadRequest(into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool) -> RequestBodyRead {
        Self.mustOverride()
    }
    /// The frame announced by `.later(length)` goes out now: pass exactly `length` bytes to `sink`, in order, in as
    /// many pieces as they are stored in. Nothing else touches the body in between (both calls happen in one
    /// `mem_send`).
    /// - Returns: false when the bytes are no longer there (the stream is then reset).
    open func streamWriteRequest(length: Int, to sink: (UnsafeRawBufferPointer) -> Void) -> Bool { Self.mustOverride() }
    /// One header of a block (response headers, or trailers): a block's fields, then `streamHeadersEnded`.
    /// - Returns: false to refuse the block (it is too large): the transport resets the stream, which then closes.
    open func streamHeader(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) -> Bool {
        Self.mustOverride()
    }
    /// The current header block is complete; `endStream` when it ends the response.
    open func streamHeadersEnded(endStream: Bool) { Self.mustOverride() }
    /// DATA payload. Its bytes count against the stream's receive window until the handler consumes them (the
    /// connection's window is returned on arrival, so one slow stream never stalls the others).
    /// - Returns: How many of these bytes the handler consumed at once (their window goes back to the server); the
    ///   rest it consumes later through its handle.
    open func streamData(_ bytes: UnsafeRawBufferPointer) -> Int { Self.mustOverride() }
    /// The server ended its side of the stream with a DATA frame (END_STREAM), so the response has no trailers.
    /// nghttp2 closes the stream (`streamClosed`) only once this side has ended its requests too.
    open func streamDataEndedStream() { Self.mustOverride() }
    /// The stream closed: `errorCode` 0 after a clean end, else the RST_STREAM code. REFUSED_STREAM means the server
    /// provably never processed it (a reset before it started, or a stream above a GOAWAY's last stream id).
    open func streamClosed(errorCode: UInt32) { Self.mustOverride() }
    /// The connection went away under the stream (`reason` says how); nothing more will arrive. `unprocessed`: its
    /// request never left this process (nghttp2 still held its HEADERS, or they sat unwritten in the socket's
    /// output), so the server cannot have seen it.
    open func streamFailed(_ reason: CallStatus, unprocessed: Bool) { Self.mustOverride() }

    private static func mustOverride(_ method: StaticString = #function) -> Never {
        preconditionFailure("\(Self.self) does not override HTTP2StreamHandler.\(method)")
    }
}

/// What a stream's owner did with nghttp2's request for the next DATA frame.
@_spi(Transport)
public enum RequestBodyRead {
    /// This many bytes are in the buffer nghttp2 gave.
    case copied(Int)
    /// This many bytes go out in the next frame, passed straight to the socket's output by `streamWriteRequest`:
    /// one copy instead of two (through nghttp2's frame buffer, then into the output).
    case later(Int)
    /// Nothing is buffered and the requests are still open: resume through the handle when there is.
    case waiting

    /// Frames smaller than this are copied at once: the later hand-over costs a callback more, which only pays off
    /// when there are kilobytes to move.
    public static let noCopyMinimum = 4096
}

/// The request headers of a stream, as the attempt wants them sent. The transport adds the connection's fixed ones
/// (`:method`, `:scheme`, `:authority`, `te`, `content-type`, `user-agent`).
package struct RequestHead {
    package var path: String
    package var metadata: CallMetadata
    /// `grpc-timeout`, in nanoseconds (nil: none).
    package var timeoutNanoseconds: Int64?
    /// `grpc-previous-rpc-attempts` (0: not sent).
    package var previousRPCAttempts: Int
    /// `grpc-encoding` of the request messages (`.identity`: not sent).
    package var encoding: CallCompression

    package init(
        path: String, metadata: CallMetadata, timeoutNanoseconds: Int64?, previousRPCAttempts: Int,
        encoding: CallCompression = .identity
    ) {
        self.path = path
        self.metadata = metadata
        self.timeoutNanoseconds = timeoutNanoseconds
        self.previousRPCAttempts = previousRPCAttempts
        self.encoding = encoding
    }
}

/// What a stream's owner may do to it. Implemented by the connection that carries it.
package protocol HTTP2StreamControl: AnyObject {
    /// Resets the stream (RST_STREAM `errorCode`) and detaches its handler: no later event reaches it.
    func resetStream(_ streamID: Int32, errorCode: UInt32)
    /// Gives `bytes` of received DATA back to the stream's receive window.
    func consumeStream(_ streamID: Int32, bytes: Int)
    /// The request body has more bytes (or its end): let nghttp2 pull again.
    func resumeStream(_ streamID: Int32)
    /// True once our END_STREAM (or a reset) went out on the stream.
    func isLocallyClosed(_ streamID: Int32) -> Bool
}

/// One open stream, as its owner holds it.
package struct HTTP2StreamHandle {
    package let streamID: Int32
    package let control: any HTTP2StreamControl

    package init(streamID: Int32, control: any HTTP2StreamControl) {
        self.streamID = streamID
        self.control = control
    }

    package func reset(errorCode: UInt32) { self.control.resetStream(self.streamID, errorCode: errorCode) }
    package func consume(_ bytes: Int) { self.control.consumeStream(self.streamID, bytes: bytes) }
    package func resume() { self.control.resumeStream(self.streamID) }
    package var isLocallyClosed: Bool { self.control.isLocallyClosed(self.streamID) }
}

/// What opening a stream came to.
package enum OpenStreamResult {
    /// Open: the request headers go out at the end of this turn.
    case opened(HTTP2StreamHandle)
    /// Nothing was sent and this connection takes no more streams (it is draining, or its stream ids ran out): try
    /// another.
    case tryElsewhere
    /// The request cannot be sent anywhere as it is (its headers exceed what the server accepts, say).
    case failed(CallStatus)
}
