@testable import GRPCCMPool
@testable import GRPCCMReactor
@_spi(Transport) @testable import GRPCCMTransport
@testable import GRPCCMWire

/// A connection that needs no socket: the test decides when it is ready, how many streams it takes, and how each
/// stream ends. For tests of the pool and the subchannel (picking, waiting, reconnecting), never of HTTP/2 itself.
/// Reactor-thread rules apply as to the real one; tests drive it from one thread.
final class FakeTransport: HTTP2Transport, @unchecked Sendable {
    // `@unchecked`: touched by one test thread (or the reactor thread) at a time.
    let id: Int
    let keepAliveTime: Duration
    unowned(unsafe) var delegate: (any HTTP2TransportDelegate)?
    var streamDemand: StreamDemand?
    var streamLimit = 100
    var isReady = false
    var connectCalls = 0
    var closedWith: CallStatus?
    var gracefulClose = false
    private(set) var streams: [Int32: HTTP2StreamHandler] = [:]
    private var nextStreamID: Int32 = 1
    private(set) var opened: [(streamID: Int32, path: String)] = []

    init(id: Int, keepAliveTime: Duration, delegate: any HTTP2TransportDelegate) {
        self.id = id
        self.keepAliveTime = keepAliveTime
        self.delegate = delegate
    }

    /// Fail inside `connect()`, as a socket whose connect(2) fails at once does.
    var failsAtConnect = false

    func connect() {
        self.connectCalls += 1
        if self.failsAtConnect { self.fail("failed as it started") }
    }
    var availableStreams: Int { self.isReady ? max(0, self.streamLimit - self.streams.count) : 0 }
    var openStreamCount: Int { self.streams.count }
    /// Stamped when it becomes ready, as the real one is.
    private(set) var lastStreamActivity: UInt64 = 0

    func openStream(_ head: inout RequestHead, handler: HTTP2StreamHandler) -> OpenStreamResult {
        guard self.availableStreams > 0 else { return .tryElsewhere }
        let streamID = self.nextStreamID
        self.nextStreamID += 2
        self.streams[streamID] = handler
        self.opened.append((streamID, head.path))
        return .opened(HTTP2StreamHandle(streamID: streamID, control: self))
    }

    func beginGracefulClose() { self.gracefulClose = true }

    func close(reason: CallStatus) {
        guard self.closedWith == nil else { return }
        self.closedWith = reason
        let wasReady = self.isReady
        self.isReady = false
        let open = self.streams
        self.streams.removeAll()
        for (_, handler) in open { handler.streamFailed(reason, unprocessed: false) }
        self.delegate?.transportClosed(self, reason: reason, wasReady: wasReady, keepaliveTimedOut: false)
    }

    func detachDelegate() { self.delegate = nil }

    // HTTP2StreamControl
    func resetStream(_ streamID: Int32, errorCode: UInt32) { self.streams.removeValue(forKey: streamID) }
    func consumeStream(_ streamID: Int32, bytes: Int) {}
    func resumeStream(_ streamID: Int32) {}
    func isLocallyClosed(_ streamID: Int32) -> Bool { true }

    // What the test makes happen.

    /// The server's SETTINGS arrived.
    func becomeReady() {
        self.isReady = true
        self.lastStreamActivity = Reactor.clock()
        self.delegate?.transportReady(self)
    }

    /// The server sent GOAWAY (NO_ERROR unless said): no new streams here. `lastStreamID` 0 (the default): it
    /// processed none of this connection's streams.
    func goAway(errorCode: UInt32 = 0, debugData: String = "", lastStreamID: Int32 = 0) {
        self.isReady = false
        self.delegate?.transportDraining(self, errorCode: errorCode, debugData: debugData, tookStreams: lastStreamID > 0)
    }

    /// The connection attempt failed.
    func fail(_ message: String = "refused") {
        self.close(reason: CallStatus(code: .unavailable, message: message))
    }

    /// Answers stream `streamID` with `message` and `grpc-status` `code`, the way nghttp2 would report it.
    func answer(_ streamID: Int32, message: [UInt8] = [], code: Int = 0) {
        guard let handler = self.streams[streamID] else { return }
        func header(_ name: String, _ value: String) {
            let n = Array(name.utf8)
            let v = Array(value.utf8)
            n.withUnsafeBufferPointer { name in v.withUnsafeBufferPointer { value in _ = handler.streamHeader(name: name, value: value) } }
        }
        header(":status", "200")
        header("content-type", "application/grpc")
        handler.streamHeadersEnded(endStream: false)
        let framed = MessageFramer.frame(message)
        _ = framed.withUnsafeBytes { handler.streamData($0) }
        header("grpc-status", String(code))
        handler.streamHeadersEnded(endStream: true)
        self.streams.removeValue(forKey: streamID)
        handler.streamClosed(errorCode: 0)
        self.delegate?.transportHasCapacity(self)
    }
}

/// Hands out `FakeTransport`s and keeps them for the test.
final class FakeConnector: TransportConnector, @unchecked Sendable {
    // `@unchecked`: `made` is appended on one thread at a time (the test's or the reactor's).
    private(set) var made: [FakeTransport] = []
    /// The indexes (in `made`) of the transports that fail inside `connect()`.
    var failAtConnect: Set<Int> = []

    func makeTransport(
        address: NetworkAddress, id: Int, keepAliveTime: Duration, delegate: any HTTP2TransportDelegate
    ) -> any HTTP2Transport {
        let transport = FakeTransport(id: id, keepAliveTime: keepAliveTime, delegate: delegate)
        transport.failsAtConnect = self.failAtConnect.contains(self.made.count)
        self.made.append(transport)
        return transport
    }
}
