import GRPCCMReactor
import GRPCCMWire

/// A client connection as the layers above see it: `HTTP2ClientConnection`, or a test double that needs no socket.
/// Reactor thread only.
package protocol HTTP2Transport: HTTP2StreamControl {
    /// Unique per manager (or standalone channel), for events and logs.
    var id: Int { get }
    /// The keepalive interval this connection uses.
    var keepAliveTime: Duration { get }
    /// Starts connecting; the outcome arrives through the delegate (`transportReady` or `transportClosed`).
    func connect()
    /// Streams that may open now: 0 until the server's SETTINGS, while draining, or at its MAX_CONCURRENT_STREAMS.
    var availableStreams: Int { get }
    /// Ready, and at the server's MAX_CONCURRENT_STREAMS: what gRFC A105 opens another connection for (a connection
    /// out of streams for a moment for a reason of its own, such as bodies it has not sent yet, is not).
    var atServerStreamLimit: Bool { get }
    /// Streams open now.
    var openStreamCount: Int { get }
    /// When the connection became ready or a stream last closed (reactor clock, ns): the idle timers measure from
    /// it, once no stream is open (which the owner checks). Opening a stream does not stamp it: while the stream is
    /// open the connection is busy anyway, and its close stamps it again.
    var lastStreamActivity: UInt64 { get }
    /// Opens a stream for `handler` with `head`, if this connection can take one. `head` is read, never changed:
    /// `inout` only so that the caller's stored head is lent in place rather than copied (see `ClientCall`).
    func openStream(_ head: inout RequestHead, handler: HTTP2StreamHandler) -> OpenStreamResult
    /// Takes no new streams and tells the server (GOAWAY); closes once the open streams have finished.
    func beginGracefulClose()
    /// Closes now: GOAWAY and close_notify go out (best effort); every open stream fails with `reason`.
    func close(reason: CallStatus)
    /// Its owner is going away: no delegate call from now on.
    func detachDelegate()
    /// Whether calls wait for a stream (set by its owner): freed capacity is reported only while they do, or when
    /// this is nil.
    var streamDemand: StreamDemand? { get set }
}

/// Whether calls wait for a stream, kept by the owner of the queue they wait in (a pool) and read by its connections
/// whenever a stream closes: freed capacity is news only to a queue with calls in it, and asking the owner through
/// its subchannel each time cost about 60 instructions a call. Reactor thread only.
package final class StreamDemand {
    package var waiting = false

    package init() {}
}

/// What a connection tells its owner (a subchannel). Reactor thread; may be called from inside nghttp2's processing,
/// so an implementation must not run user code from here.
package protocol HTTP2TransportDelegate: AnyObject {
    /// The server's SETTINGS arrived: the connection takes streams.
    func transportReady(_ transport: any HTTP2Transport)
    /// No new streams here any more: the server sent GOAWAY (`errorCode`, `debugData`), or the stream ids ran out.
    /// Open streams finish; streams the server never processed close with REFUSED_STREAM. `tookStreams`: the server
    /// processed some of this connection's streams (the GOAWAY's last stream id is not 0; always, for stream ids
    /// that ran out): it served, rather than refused, the connection.
    func transportDraining(_ transport: any HTTP2Transport, errorCode: UInt32, debugData: String, tookStreams: Bool)
    /// A stream closed, or the server raised its stream limit: `availableStreams` may have grown.
    func transportHasCapacity(_ transport: any HTTP2Transport)
    /// The connection is gone (its open streams have failed with `reason`). `wasReady`: it had been READY;
    /// `keepaliveTimedOut`: a PING went unanswered.
    func transportClosed(_ transport: any HTTP2Transport, reason: CallStatus, wasReady: Bool, keepaliveTimedOut: Bool)
    /// The TLS files changed on disk and could not be loaded (`reason` says why): the connection goes on with the
    /// last good ones. Heard once per change, from the first connection to find it.
    func transportTLSFilesRefused(_ transport: any HTTP2Transport, reason: String)
}

extension HTTP2TransportDelegate {
    package func transportTLSFilesRefused(_ transport: any HTTP2Transport, reason: String) {}
}

extension HTTP2Transport {
    /// A transport whose only bound on streams is the server's.
    package var atServerStreamLimit: Bool { self.availableStreams == 0 }
}
