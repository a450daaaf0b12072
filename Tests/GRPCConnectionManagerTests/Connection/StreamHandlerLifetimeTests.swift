import GRPCEchoServer
import Testing

@_spi(Reactor) @testable import GRPCCMReactor
@_spi(Transport) @testable import GRPCCMTransport
@testable import GRPCCMWire

/// nghttp2's callbacks reach a stream's handler without retaining it (`HTTP2ClientConnection.handler(for:)`). These
/// handlers are owned by nothing but the connection, against the embedded echo server: a handler the connection lets
/// go of while one of its callbacks runs must outlive that callback, and must then be freed, not leaked.
@Suite("Stream handler lifetime")
struct StreamHandlerLifetimeTests {
    /// What happened, in order, as the handlers and the delegate saw it (reactor thread only).
    final class Journal: @unchecked Sendable {
        // `@unchecked`: written and read on the reactor thread only (the test reads it through `onReactor`).
        var entries: [String] = []
    }

    /// Sends one empty message; on the response's first header it resets its own stream (the connection then holds
    /// the only reference to it, and drops it from the table) and goes on writing to the journal from the same
    /// callback. With `resetOnHeader` false it never resets and waits for the connection to fail it.
    final class Handler: HTTP2StreamHandler {
        let journal: Journal
        let resetOnHeader: Bool
        var handle: HTTP2StreamHandle?

        init(journal: Journal, resetOnHeader: Bool) {
            self.journal = journal
            self.resetOnHeader = resetOnHeader
        }

        deinit { self.journal.entries.append("freed") }

        override func streamReadRequest(
            into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool
        ) -> RequestBodyRead {
            // One gRPC frame: uncompressed, empty.
            buffer.initialize(repeating: 0, count: 5)
            eof = true
            return .copied(5)
        }
        override func streamWriteRequest(length: Int, to sink: (UnsafeRawBufferPointer) -> Void) -> Bool { false }
        override func streamHeader(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) -> Bool {
            self.journal.entries.append("header")
            guard self.resetOnHeader, let handle = self.handle else { return true }
            self.handle = nil
            handle.reset(errorCode: 8)  // CANCEL
            // Still inside the callback, after the table let go: this object must still be here.
            self.journal.entries.append("reset by itself, then still running")
            return true
        }
        override func streamHeadersEnded(endStream: Bool) { self.journal.entries.append("headers ended") }
        override func streamData(_ bytes: UnsafeRawBufferPointer) -> Int {
            self.journal.entries.append("data")
            return bytes.count
        }
        override func streamDataEndedStream() { self.journal.entries.append("data ended stream") }
        override func streamClosed(errorCode: UInt32) { self.journal.entries.append("closed \(errorCode)") }
        override func streamFailed(_ reason: CallStatus, unprocessed: Bool) {
            self.handle = nil
            self.journal.entries.append("failed")
        }
    }

    final class Delegate: HTTP2TransportDelegate {
        let journal: Journal
        init(journal: Journal) { self.journal = journal }
        func transportReady(_ transport: any HTTP2Transport) { self.journal.entries.append("ready") }
        func transportDraining(_ transport: any HTTP2Transport, errorCode: UInt32, debugData: String, tookStreams: Bool) {}
        func transportHasCapacity(_ transport: any HTTP2Transport) {}
        func transportClosed(_ transport: any HTTP2Transport, reason: CallStatus, wasReady: Bool, keepaliveTimedOut: Bool) {
            self.journal.entries.append("connection closed")
        }
    }

    /// Everything one test needs, made and touched on the reactor thread.
    final class Setup: @unchecked Sendable {
        // `@unchecked`: made and used on the reactor thread only.
        let journal = Journal()
        let delegate: Delegate
        let connection: HTTP2ClientConnection

        init(reactor: Reactor, port: Int) {
            self.delegate = Delegate(journal: self.journal)
            let settings = HTTP2ClientSettings(
                connectTimeout: .seconds(5), keepAliveTime: .seconds(3600), keepAliveTimeout: .seconds(20),
                keepAlivePermitWithoutStream: false, initialStreamWindowSize: 65_535, connectionWindowSize: 1 << 20,
                maxFrameSize: 16_384, maxHeaderListSize: 16_384, userAgent: "lifetime-test")
            self.connection = HTTP2ClientConnection(
                reactor: reactor, address: NetworkAddress(ip: "127.0.0.1", port: port)!, authority: "127.0.0.1:\(port)",
                id: 1, settings: settings)
            self.connection.delegate = self.delegate
            self.connection.connect()
        }

        /// Opens a stream whose handler only the connection owns.
        func open(resetOnHeader: Bool, metadata: CallMetadata = CallMetadata()) -> Bool {
            let handler = Handler(journal: self.journal, resetOnHeader: resetOnHeader)
            var head = RequestHead(
                path: "/test.Echo/Unary", metadata: metadata, timeoutNanoseconds: nil, previousRPCAttempts: 0)
            guard case .opened(let handle) = self.connection.openStream(&head, handler: handler) else { return false }
            handler.handle = handle
            return true
        }
    }

    func withConnection(_ body: (Reactor, Setup) async throws -> Void) async throws {
        let loop = try ReactorLoop()
        loop.start()
        let server = try EchoServer(eventLoop: loop)
        defer {
            server.close()
            loop.shutdown()
        }
        let reactor = loop.reactor
        let setup = await onReactor(reactor) { Setup(reactor: reactor, port: server.port) }
        #expect(await eventually { await onReactor(reactor) { setup.journal.entries.contains("ready") } })
        try await body(reactor, setup)
        await onReactor(reactor) { setup.connection.close(reason: CallStatus(code: .unavailable, message: "test over")) }
    }

    @Test("a handler that resets its own stream from a callback outlives the callback, then is freed")
    func resetFromItsOwnCallback() async throws {
        try await self.withConnection { reactor, setup in
            #expect(await onReactor(reactor) { setup.open(resetOnHeader: true) })
            #expect(await eventually { await onReactor(reactor) { setup.journal.entries.contains("freed") } })
            let entries = await onReactor(reactor) { setup.journal.entries }
            // Freed once the callback was over (in the deferred phase), and told nothing after its reset.
            #expect(entries == ["ready", "header", "reset by itself, then still running", "freed"])
        }
    }

    @Test("a handler failed by the connection's end hears it once, and is freed after")
    func failedByConnectionEnd() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // A server of its own, on a loop of its own, so that it can go away under the stream.
        let server = try EchoServer()
        let reactor = loop.reactor
        let setup = await onReactor(reactor) { Setup(reactor: reactor, port: server.port) }
        #expect(await eventually { await onReactor(reactor) { setup.journal.entries.contains("ready") } })
        // The server answers in a minute; it closes long before.
        #expect(await onReactor(reactor) { setup.open(resetOnHeader: false, metadata: ["x-sleep-ms": "60000"]) })
        server.close()
        #expect(await eventually { await onReactor(reactor) { setup.journal.entries.contains("freed") } })
        let entries = await onReactor(reactor) { setup.journal.entries }
        #expect(entries == ["ready", "failed", "connection closed", "freed"])
    }
}
