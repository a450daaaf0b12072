import Foundation
import Logging
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// Limits that hold against peers that break them: each test names the rule and brings the peer that tries.
@Suite("Limits against peers that break them", .serialized)
struct LimitsTests {
    /// The most unwritten bytes any of `channel`'s connections holds in its socket output.
    static func outputHeld(_ channel: GRPCChannel) -> Int {
        channel.inspect { pool in
            pool.currentTransports.compactMap { ($0 as? HTTP2ClientConnection)?.outputHeldBytes }.max() ?? 0
        }
    }

    static func plain() -> Configuration {
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        configuration.maxReconnectDelay = .milliseconds(200)
        return configuration
    }

    /// A scripted peer in `mode` and a started loop for the client, both stopped after `body`.
    static func withPeer<T>(
        _ mode: String, _ arguments: [String] = [], _ body: (ScriptedPeer, ReactorLoop) async throws -> T
    ) async throws -> T {
        let peer = try ScriptedPeer(mode, arguments)
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        return try await body(peer, loop)
    }

    @Test("response headers and trailers over maxHeaderListSize end the call RESOURCE_EXHAUSTED; the connection stays", arguments: ["headers-bytes", "trailers-bytes"])
    func headerListSizeIsEnforced(_ mode: String) async throws {
        let peer = try ScriptedPeer(mode, ["20000"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        for _ in 0..<3 {
            let response = await channel.call([1, 2, 3], timeout: .seconds(5))
            #expect(response.status.code == .resourceExhausted)
            #expect(response.status.message.contains("maxHeaderListSize"))
        }
        // The oversized blocks cost their streams, not the connection (HPACK decoding went on).
        #expect(recorder.story.filter { $0 == "start" }.count == 1)
        // Not retried by policy either, though RESOURCE_EXHAUSTED is one of its codes: the server ran the call, and
        // another attempt would run it again for the same refusal.
        var retrying = Configuration()
        retrying.enableCircuitBreaker = false
        let withRetry = try GRPCChannel(target: peer.target, configuration: retrying, eventLoop: loop)
        let before = peer.headerBlocks()
        #expect(await withRetry.call([1, 2, 3], timeout: .seconds(5)).status.code == .resourceExhausted)
        #expect(peer.headerBlocks() == before + 1, "one attempt")
        var bigger = Self.plain()
        bigger.http2.maxHeaderListSize = 64 << 10
        let roomy = try GRPCChannel(target: peer.target, configuration: bigger, eventLoop: loop)
        #expect(await roomy.call([1, 2, 3], timeout: .seconds(5)).status == .ok)
        guard mode == "headers-bytes" else { return }
        // The client's health Watch takes the headers every call takes (it had 16 KiB of its own, whatever was
        // configured: refused, the connection went to TRANSIENT_FAILURE and calls failed UNAVAILABLE).
        var watched = bigger
        watched.healthCheckServiceName = ""
        let watchedChannel = try GRPCChannel(target: peer.target, configuration: watched, eventLoop: loop)
        let response = await watchedChannel.call([1, 2, 3], timeout: .seconds(5))
        #expect(response.status == .ok, "\(response.status)")
    }

    @Test("a unary call answered with a second message fails at once, INTERNAL, and the connection stays")
    func unaryAnsweredWithAStream() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel(Self.plain())
        // Expand streams x-response-count messages: as good as for ever here. Read to the end, as before, the call
        // ended only at its deadline.
        let response = await channel.call(
            "/raw.Raw/Expand", [1], metadata: ["x-response-count": "100000000", "x-response-bytes": "16"],
            timeout: .seconds(3))
        #expect(response.status == CallStatus(code: .internal, message: "expected one response message, received more"))
        #expect(await channel.call([2], timeout: .seconds(2)).status == .ok)
    }

    @Test("calls waiting for stream capacity on a connection count against maxQueuedCalls")
    func streamCapacityWaitsCountAgainstTheQueue() async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 1
        let fixture = try LoopbackFixture(options: options)
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.maxQueuedCalls = 3
        let channel = try fixture.channel(configuration)
        #expect(await channel.call([1], timeout: .seconds(2)).status == .ok)
        let statuses = PThreadLock<[Int: CallStatus]>([:])
        // The first call holds the only stream for 2 s, long enough for the checks below on a slow machine; the
        // queued ones then take 300 ms each.
        for id in 0..<4 {
            let sleep = id == 0 ? "2000" : "300"
            channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": sleep], options: RequestOptions(timeout: .seconds(10))) {
                response in statuses.withLock { $0[id] = response.status }
            }
        }
        #expect(await eventually { channel.openCount == 4 && channel.queuedCount == 3 })
        let refused = await channel.call([9], timeout: .seconds(2))
        #expect(refused.status.code == .resourceExhausted)
        #expect(refused.status.message.contains("maxQueuedCalls 3"))
        #expect(await eventually(timeout: 10) { statuses.withLock { $0.count } == 4 })
        #expect(statuses.withLock { $0.values.allSatisfy(\.isOK) }, "the queued calls ran one after another")
    }

    @Test("the socket output buffer stays bounded over a long upload: it never grows with the bytes ever sent")
    func outputBufferIsBounded() throws {
        // A socket pair whose reader takes exactly what the writer adds each round, after the socket was filled once:
        // the output never drains completely, which is when written bytes used to pile up at its front.
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        var small: Int32 = 32 << 10
        setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        _ = fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK)
        var output = SocketOutput()
        let chunk = [UInt8](repeating: 7, count: 32 << 10)
        for _ in 0..<16 { output.append(chunk) }  // more than the socket holds
        try output.write(to: fds[0])
        var scratch = [UInt8](repeating: 0, count: chunk.count)
        var largest = 0
        let rounds = 2048  // 64 MiB through the socket
        for _ in 0..<rounds {
            output.append(chunk)
            try output.write(to: fds[0])
            largest = max(largest, output.heldBytes)
            var taken = 0
            while taken < chunk.count {
                let n = scratch.withUnsafeMutableBytes { read(fds[1], $0.baseAddress, chunk.count - taken) }
                if n <= 0 { break }
                taken += n
            }
        }
        let drained = output.isDrained  // read first: #expect cannot capture a noncopyable value
        #expect(!drained, "the socket stayed backed up, as intended")
        #expect(largest < 2 << 20, "held \(largest) bytes at most while \(rounds * chunk.count) went through")
    }

    @Test("the deframer's buffer grows with the bytes that arrive, not with the length announced")
    func deframerGrowsAsBytesArrive() throws {
        var deframer = MessageDeframer(maxMessageSize: 4 << 20)
        let prefix: [UInt8] = [0, 0, 0x40, 0, 0]  // 4 MiB announced
        try prefix.withUnsafeBytes { bytes in try deframer.process(bytes) { _, _ in } }
        let ten = [UInt8](repeating: 1, count: 10)
        try ten.withUnsafeBytes { bytes in try deframer.process(bytes) { _, _ in } }
        #expect(deframer.bufferedBytes == 10)
        #expect(deframer.bufferedCapacity < 4096, "reserved \(deframer.bufferedCapacity) bytes for 10")
        #expect(deframer.hasPartialMessage)
    }

    @Test("a large message is moved about a third of its size while its buffer grows, never beyond its length")
    func deframerGrowsFourfold() throws {
        let length = 1 << 20
        var deframer = MessageDeframer(maxMessageSize: 4 << 20)
        var framed = MessageFramer.frame([UInt8](repeating: 3, count: length))
        var delivered: [[UInt8]] = []
        var moved = 0
        var capacity = 0
        var offset = 0
        while offset < framed.count {
            let end = min(offset + 16384, framed.count)
            try framed[offset..<end].withUnsafeBytes { bytes in try deframer.process(bytes) { message, _ in delivered.append(message) } }
            if deframer.bufferedCapacity > capacity {
                // Growing copies what was buffered before this chunk.
                moved += capacity == 0 ? 0 : deframer.bufferedBytes - (end - offset)
                capacity = deframer.bufferedCapacity
                #expect(capacity <= length + 64, "reserved \(capacity) for a message of \(length)")
            }
            offset = end
        }
        framed = []
        #expect(delivered.count == 1 && delivered[0].count == length && delivered[0].allSatisfy { $0 == 3 })
        #expect(moved < length / 2, "moved \(moved) bytes while growing")
    }

    @Test("a peer that opens its windows wide and stops reading: the socket's output holds its cap and one frame more")
    func outputBoundedUnderWideWindows() async throws {
        let peer = try ScriptedPeer("wide-open-stall")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let call = channel.bidirectionalStreaming(path: "/test.Stream/Update")
        let message = [UInt8](repeating: 9, count: 1 << 20)
        let writer = Task {
            // More than loopback's socket buffers take: the rest backs up in our output, then in the call's buffer.
            for _ in 0..<48 { try await call.write(message) }
        }
        func held() -> Int { Self.outputHeld(channel) }
        #expect(await eventually(timeout: 20) { held() >= SocketOutput.cap })
        #expect(await eventually { peer.events.contains("stalled") })
        // The cap of unwritten bytes, one frame past it, and up to 64 KiB already written that the buffer drops at
        // its next compaction.
        let limit = SocketOutput.cap + 16384 + 9 + (64 << 10)
        #expect(held() <= limit, "held \(held()) bytes")
        #expect(await eventually(timeout: 5) { call.buffers.hasWaitingWriter }, "the writer waits for room")
        #expect(held() <= limit, "held \(held()) bytes")
        call.cancel()
        #expect(await call.result().status.code == .cancelled)
        _ = await writer.result
    }

    @Test("a peer whose TCP stops taking bytes (zero window past TCP_USER_TIMEOUT): the call says the connection timed out, not that the server closed it, GOAWAY before or not", arguments: [[], ["goaway"]])
    func zeroWindowPastUserTimeoutSaysTimedOut(_ arguments: [String]) async throws {
        // The kernel aborts the connection with ETIMEDOUT once the peer's zero window outlasts TCP_USER_TIMEOUT
        // (keepAliveTimeout). The write that meets the error consumes it; the read after it finds only the end of the
        // stream, which was reported as "closed by the server" (with a graceful GOAWAY before it, "closed by the
        // server after GOAWAY NO_ERROR").
        let peer = try ScriptedPeer("wide-open-stall", arguments)
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.plain()
        configuration.keepAliveTime = .seconds(3600)
        configuration.keepAliveTimeout = .milliseconds(300)
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let call = channel.bidirectionalStreaming(path: "/test.Stream/Update")
        let message = [UInt8](repeating: 9, count: 1 << 20)
        let writer = Task { for _ in 0..<48 { try await call.write(message) } }
        if arguments.isEmpty {
            // (A draining connection, after the GOAWAY, is no longer among the pool's current ones to look at.)
            #expect(await eventually(timeout: 20) { Self.outputHeld(channel) >= SocketOutput.cap })
        }
        let status = await call.result().status
        _ = await writer.result
        #expect(status.code == .unavailable)
        #expect(status.message.contains("timed out"), "\(status.message)")
        #expect(!status.message.contains("closed by the server"), "\(status.message)")
    }

    @Test("a request stream that always has data and window does not hold up another call's request on its connection")
    func busyUploadDoesNotStarveOtherCalls() async throws {
        // Windows wide open, one frame read every 2 ms: the upload never runs out of window, its writer keeps its
        // buffer full, and the socket backs up.
        _ = try await Self.withEndlessUpload(readingAFrameEvery: 2) { _, channel in
            // On the same connection: its request goes out between the upload's frames, not after all of them.
            let response = await channel.unaryResult(
                path: "/echo.Echo/Get", request: [42], options: RequestOptions(timeout: .seconds(10)))
            #expect(response.status == .ok)
            #expect(response.message == [42])
        }
    }

    /// A client-streaming upload whose writer keeps its 16 MiB buffer full (far more than one turn of the loop sends:
    /// it never runs dry between writes) to a `wide-open-slow` peer reading one frame every `milliseconds`; `body`
    /// runs once the socket's output has backed up to half its cap. `adjust` shapes the configuration, `prepare`
    /// sees the channel before the upload starts. The upload is cancelled after `body`; how it ended is returned.
    static func withEndlessUpload(
        readingAFrameEvery milliseconds: Int, adjust: (inout Configuration) -> Void = { _ in },
        prepare: (GRPCChannel) -> Void = { _ in }, _ body: (ScriptedPeer, GRPCChannel) async throws -> Void
    ) async throws -> UnaryResponse {
        try await Self.withPeer("wide-open-slow", [String(milliseconds)]) { peer, loop in
            var configuration = Self.plain()
            configuration.streamBufferSize = 16 << 20
            adjust(&configuration)
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            prepare(channel)
            let upload = channel.clientStreaming(path: "/test.Stream/Collect")
            let message = [UInt8](repeating: 7, count: 64 << 10)
            let writer = Task {
                while !Task.isCancelled { try await upload.write(message) }
            }
            #expect(await eventually(timeout: 20) { Self.outputHeld(channel) >= SocketOutput.cap / 2 }, "the upload backs up")
            try await body(peer, channel)
            upload.cancel()
            writer.cancel()
            _ = await writer.result
            return await upload.finishResult()
        }
    }

    @Test("a burst of calls goes out in rounds: the server never waits on more than 256 streams whose body has not begun, and every call ends OK")
    func burstSendsBodiesCloseBehindHeaders() async throws {
        // nghttp2 sends every queued HEADERS frame before any DATA: a burst submitted at once, or calls starting faster
        // than a slow server reads, would put all their headers ahead of all their bodies (under open-loop overload
        // no call completed). The connection takes a new stream only while fewer than 256 bodies wait to be asked for.
        try await Self.withPeer("echo") { peer, loop in
            // Room for gRFC A105's growth, which is for the server's MAX_CONCURRENT_STREAMS only: the burst's wait for
            // its bodies opens no other connection.
            var configuration = Self.plain()
            configuration.maxConnectionsPerTarget = 3
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            #expect(await channel.unaryResult(path: "/echo.Echo/Get", request: [0]).status == .ok)
            let count = 3 * HTTP2ClientConnection.maxStreamsWithBodyUnasked
            let ended = PThreadLock<[UnaryResponse]>([])
            _ = loop.execute {
                for index in 0..<count {
                    channel.unary(path: "/echo.Echo/Get", request: [UInt8(index & 0xff)], options: RequestOptions(timeout: .seconds(60))) {
                        response in ended.withLock { $0.append(response) }
                    }
                }
            }
            #expect(await eventually(timeout: 60) { ended.withLock { $0.count } == count })
            let responses = ended.withLock { $0 }
            #expect(responses.filter { $0.status != .ok }.map(\.status).prefix(3) == [])
            let most = peer.mostBodiless()
            #expect(most > 1 && most <= HTTP2ClientConnection.maxStreamsWithBodyUnasked, "at most \(most) bodies unbegun")
            #expect(peer.events.filter { $0.hasPrefix("settings") }.count == 1, "one connection")
        }
    }

    @Test("keepalive: a PING stuck behind an upload on a slow link is no death while the server acknowledges the upload's bytes")
    func pingBehindUploadIsNoDeath() async throws {
        // Windows wide open, one frame read every 20 ms (about 0.8 MB/s): the megabyte of output alone keeps the PING
        // back some 1.3 s, past its 1 s timeout, and the server sends nothing meanwhile (no window to give back).
        // Before, the connection closed ("keepalive: no PING ACK") under a healthy upload. (A timeout of a second, not
        // a quarter: the peer, a Python process, must not be taken for dead when another process holds the CPU.)
        let timeouts = PThreadLock(0)
        let ended = try await Self.withEndlessUpload(readingAFrameEvery: 20) { configuration in
            configuration.keepAliveTime = .milliseconds(200)
            configuration.keepAliveTimeout = .seconds(1)
        } prepare: { channel in
            channel.events.subscribe { event in
                if case .keepaliveTimeout = event { timeouts.withLock { $0 += 1 } }
            }
        } _: { peer, _ in
            // Three keepalive timeouts of uploading.
            try await Task.sleep(for: .seconds(3))
            #expect(timeouts.withLock { $0 } == 0)
            #expect(peer.events.filter { $0.hasPrefix("settings") }.count == 1, "one connection")
        }
        #expect(ended.status.code == .cancelled, "the upload ran until cancelled")
    }

    /// In one turn of `loop`, before any output is written: three unary calls (requests [1], [2], [3]) open streams on
    /// `connection`, which then closes ("closed by the test"). Their responses by call number, once all three ended.
    static func threeCallsThenClose(
        _ channel: GRPCChannel, closing connection: HTTP2ClientConnection, on loop: ReactorLoop, options: RequestOptions
    ) async -> [(Int, UnaryResponse)] {
        let responses = PThreadLock<[Int: UnaryResponse]>([:])
        _ = loop.execute {
            for index in 1...3 {
                channel.unary(path: "/echo.Echo/Get", request: [UInt8(index)], options: options) { response in
                    responses.withLock { $0[index] = response }
                }
            }
            connection.close(reason: CallStatus(code: .unavailable, message: "closed by the test"))
        }
        #expect(await eventually(timeout: 20) { responses.withLock { $0.count } == 3 })
        return responses.withLock { $0 }.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    @Test("requests that never left when their connection closes (a keepalive timeout, say) go to the next address")
    func refusedAtCloseGoElsewhere() async throws {
        // Takes a request's headers, then reads nothing more; refuses any later connection.
        let stall = try ScriptedPeer("wide-open-stall", ["once"])
        defer { stall.stop() }
        let fixture = try LoopbackFixture()  // the next address: the embedded echo server
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.loadBalancingPolicy = .pickFirst
        // The stalled peer must be the one in use: no Happy Eyeballs race with the next address, however slow.
        configuration.connectionAttemptDelay = .seconds(30)
        let channel = try GRPCChannel(
            target: "two.test:1", configuration: configuration,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), metricsFactory: nil,
            interceptors: [], loops: [fixture.loop.reactor],
            resolver: ScriptedResolver([[
                NetworkAddress(ip: "127.0.0.1", port: stall.port)!, NetworkAddress(ip: "127.0.0.1", port: fixture.server.port)!,
            ]]))
        // An upload the stalled peer never reads backs the connection's output up to its cap.
        let upload = channel.bidirectionalStreaming(path: "/test.Stream/Update")
        let message = [UInt8](repeating: 9, count: 1 << 20)
        let writer = Task { for _ in 0..<48 { try await upload.write(message) } }
        func connection() -> HTTP2ClientConnection? {
            channel.inspect { pool in pool.currentTransports.compactMap { $0 as? HTTP2ClientConnection }.first }
        }
        #expect(await eventually(timeout: 20) { (connection()?.outputHeldBytes ?? 0) >= SocketOutput.cap })
        // In one turn of the loop, before any output is written: three calls open streams on this connection, and the
        // connection closes, as a keepalive timeout closes it. Their requests never left: nghttp2's last output refuses
        // the ones it can still reach (REFUSED_STREAM), the others it never wrote (behind the full output). Either way
        // the calls are retried at once, and must not be sent to the dying connection again (refused a second time,
        // they failed), but to the next address.
        guard let stalled = connection() else { return }
        let responses = await Self.threeCallsThenClose(
            channel, closing: stalled, on: fixture.loop, options: RequestOptions(timeout: .seconds(15)))
        for (index, response) in responses {
            #expect(response.status == .ok, "call \(index): \(response.status)")
            #expect(response.message == [UInt8(index)])
        }
        upload.cancel()
        _ = await writer.result
    }

    @Test(
        "requests still in the socket's output, never taken by the kernel, when their connection closes go to the next address",
        arguments: [false, true])
    func unwrittenAtCloseGoElsewhere(tls: Bool) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        // Takes a request's headers, then reads nothing more; refuses any later connection.
        let stall = try ScriptedPeer(
            "wide-open-stall", ["once"], tls: tls ? (certificates.serverCertificate, certificates.serverKey) : nil)
        defer { stall.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // The next address: the embedded echo server.
        let next = tls ? try TLSTests.server(certificates, loop: loop) : try EchoServer(eventLoop: loop)
        defer { next.close() }
        var configuration = tls ? TLSTests.tls(certificates) { $0.serverName = "localhost" } : Self.plain()
        configuration.loadBalancingPolicy = .pickFirst
        configuration.connectionAttemptDelay = .seconds(30)  // the stalled peer in use, however slow its handshake
        configuration.maxReconnectDelay = .milliseconds(200)
        let channel = try GRPCChannel(
            target: "two.test:1", configuration: configuration,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), metricsFactory: nil,
            interceptors: [], loops: [loop.reactor],
            resolver: ScriptedResolver([[
                NetworkAddress(ip: "127.0.0.1", port: stall.port)!, NetworkAddress(ip: "127.0.0.1", port: next.port)!,
            ]]))
        let upload = channel.bidirectionalStreaming(path: "/test.Stream/Update")
        #expect(await eventually(timeout: 10) { stall.events.contains("stalled") })
        guard let connection = channel.inspect({ $0.currentTransports.compactMap { $0 as? HTTP2ClientConnection }.first })
        else {
            Issue.record("no connection")
            return
        }
        func onLoop<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T { channel.inspect { _ in body() } }
        // A small kernel send buffer, fixed (Linux would grow it to megabytes): one 1 MiB message the peer never reads
        // fills it and the peer's receive queue, and the rest of the message waits in the socket's output, under its
        // cap, so nghttp2 still writes new requests out into it.
        onLoop { connection.fixSendBuffer(bytes: 16384) }
        try await upload.write([UInt8](repeating: 9, count: 1 << 20))
        #expect(await eventually(timeout: 10) { onLoop { connection.outputHeldBytes } > 0 })
        // One turn opens three calls; the flush that ends it writes their requests out into the socket's output,
        // behind the message.
        let mark = onLoop { connection.outputMark }
        let responses = PThreadLock<[Int: UnaryResponse]>([:])
        _ = loop.execute {
            for index in 1...3 {
                channel.unary(path: "/echo.Echo/Get", request: [UInt8(index)], options: RequestOptions(timeout: .seconds(15))) {
                    response in responses.withLock { $0[index] = response }
                }
            }
        }
        #expect(await eventually(timeout: 10) { onLoop { connection.outputMark } > mark })
        #expect(onLoop { connection.outputHeldBytes } > 0)
        // A later turn closes the connection, as a keepalive timeout would. The requests were never in the kernel:
        // the calls are retried at once, at the next address.
        _ = loop.execute { connection.close(reason: CallStatus(code: .unavailable, message: "closed by the test")) }
        #expect(await eventually(timeout: 20) { responses.withLock { $0.count } == 3 })
        for (index, response) in responses.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            #expect(response.status == .ok, "call \(index): \(response.status)")
            #expect(response.message == [UInt8(index)])
        }
        upload.cancel()
    }

    @Test("requests nghttp2 refuses as their connection closes are not sent to it again, but to a new connection")
    func refusedAtCloseReconnect() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel(Self.plain())
        #expect(try await channel.unary(path: "/echo.Echo/Get", request: [0]).message == [0])
        guard let connection = channel.inspect({ pool in pool.currentTransports.first as? HTTP2ClientConnection }) else {
            Issue.record("no connection")
            return
        }
        // In one turn, before any output is written: three calls open streams, and the connection closes. nghttp2's
        // last output refuses their requests (REFUSED_STREAM); retried at once, they used to find this connection
        // still READY, were refused again and failed.
        // Wait-for-ready: a connection lost this soon after it was made is reconnected after a backoff.
        let responses = await Self.threeCallsThenClose(
            channel, closing: connection, on: fixture.loop, options: RequestOptions(timeout: .seconds(15), waitForReady: true))
        for (index, response) in responses {
            #expect(response.status == .ok, "call \(index): \(response.status)")
        }
    }

    @Test("a server that answers, then resets the connection while a request is still being written: the call gets the answer")
    func answerBeforeResetWins() async throws {
        let peer = try ScriptedPeer("status-and-reset", ["8"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.plain()
        configuration.maxMessageSize = 64 << 20
        // Far more than loopback's socket buffers hold: the write is still under way when the reset comes, and the
        // answer waits in the receive queue behind it. A channel each: the reset connection is gone.
        let request = [UInt8](repeating: 7, count: 32 << 20)
        for round in 0..<3 {
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            let response = await channel.call("/test.Raw/Get", request, timeout: .seconds(10))
            #expect(response.status.code == .resourceExhausted, "round \(round): \(response.status)")
            channel.close()
        }
    }

    @Test("a server that sends GOAWAY and resets the connection while a request is being written: the call is told of the GOAWAY, not of the failed write")
    func goAwayBeforeResetIsNamed() async throws {
        try await Self.withPeer("goaway-and-reset") { peer, loop in
            var configuration = Self.plain()
            configuration.maxMessageSize = 64 << 20
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            // Far more than loopback's socket buffers hold: the write is under way when the reset comes.
            let response = await channel.call("/test.Raw/Get", [UInt8](repeating: 7, count: 32 << 20), timeout: .seconds(10))
            #expect(response.status.code == .unavailable)
            #expect(response.status.message.contains("GOAWAY ENHANCE_YOUR_CALM (going)"), "\(response.status)")
        }
    }

    @Test("a stream nghttp2 resets for the server's violation says what the server did, not that the server reset it")
    func localResetIsNamed() async throws {
        try await Self.withPeer("window-overflow") { peer, loop in
            let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
            let response = await channel.call("/test.Raw/Get", [1], timeout: .seconds(5))
            #expect(response.status.code == .internal)
            #expect(response.status.message.hasPrefix("the server broke HTTP/2 on the stream (WINDOW_UPDATE: "), "\(response.status)")
            #expect(response.status.message.hasSuffix("this client reset it (FLOW_CONTROL_ERROR)"), "\(response.status)")
            // The connection stays: a stream error.
            #expect(await channel.call("/test.Raw/Get", [2], timeout: .seconds(5)).status.code == .internal)
            #expect(peer.events.filter { $0.hasPrefix("settings") }.count == 1, "one connection")
        }
    }

    @Test(
        "a header block of CONTINUATION frames without end closes its connection, saying why; the next call gets a new one",
        arguments: [[], ["16000"]])
    func continuationFloodEndsTheConnection(_ arguments: [String]) async throws {
        // nghttp2 bounds a block to 8 CONTINUATION frames since the fix of CVE-2024-28182 (1.61, backported to
        // Debian's 1.52): without it, the call and every other on the connection would wait for their deadlines while
        // the peer flooded. Empty frames; or frames of 16,000 bytes, over maxHeaderListSize from the second, whose
        // stream this client resets while nghttp2 reads the rest of the block (ignored, to keep HPACK in step).
        try await Self.withPeer("continuation-flood", arguments) { peer, loop in
            let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
            let reasons = PThreadLock<[String]>([])
            channel.events.subscribe { event in
                if case .connectivityStateChanged(_, _, .ready, _, let reason?) = event {
                    reasons.withLock { $0.append(reason.message) }
                }
            }
            let began = ContinuousClock.now
            let response = await channel.call("/test.Raw/Get", [1], timeout: .seconds(60))
            // With large frames, whichever reaches the call first: the stream's reset or the connection's end (both
            // come from one read when the frames arrive together).
            let expected: [StatusCode] = arguments.isEmpty ? [.unavailable] : [.unavailable, .resourceExhausted]
            #expect(expected.contains(response.status.code), "\(response.status)")
            #expect(ContinuousClock.now - began < .seconds(30), "ended by the bound, not the deadline")
            #expect(await eventually { !reasons.withLock { $0 }.isEmpty })
            #expect(
                reasons.withLock { $0 }.first?.hasSuffix("Too many CONTINUATION frames following a HEADER frame") == true,
                "\(reasons.withLock { $0 })")
            try await Self.expectNewConnection(channel, peer)
        }
    }

    /// The flood's connection is gone and the next call, waiting for a connection, gets an answer on a second one.
    private static func expectNewConnection(_ channel: GRPCChannel, _ peer: ScriptedPeer) async throws {
        #expect(await eventually { peer.events.contains { $0.hasPrefix("flood-cut") } })
        // The connection failed before it was established: the next one comes after a backoff.
        let next = await channel.unaryResult(
            path: "/test.Raw/Get", request: [2], options: RequestOptions(timeout: .seconds(20), waitForReady: true))
        #expect(next.status == .ok, "\(next.status)")
        #expect(peer.events.filter { $0.hasPrefix("settings") }.count == 2, "a second connection")
    }

    @Test("keepalive: data arriving after an unanswered PING is a sign of life, as in grpc-go; only silence closes")
    func dataAfterPingIsLife() async throws {
        // Silent for 400 ms (the PING goes at 200 ms), then 40 messages 50 ms apart; the PING is never answered.
        try await Self.withPeer("quiet-then-stream", ["400", "40", "50"]) { peer, loop in
            var configuration = Self.plain()
            configuration.keepAliveTime = .milliseconds(200)
            configuration.keepAliveTimeout = .milliseconds(1000)
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            let call = channel.serverStreaming(path: "/test.Raw/Watch", request: [1], options: RequestOptions(timeout: .seconds(20)))
            var received = 0
            do {
                for try await message in call.responses {
                    #expect(message == [UInt8(received)])
                    received += 1
                }
            } catch {
                Issue.record("the stream failed after \(received) messages: \(error)")
            }
            #expect(received == 40)
            #expect(await call.result().status == .ok)
        }
    }

    @Test("a stream refused and a GOAWAY in one read: the transparent retry goes to a new connection, not the one going away")
    func refusalThenGoAwayInOneRead() async throws {
        try await Self.withPeer("refuse-then-goaway") { peer, loop in
            // No retry by policy: only the transparent one (a refused request never ran) may save the call. Opened at
            // once, inside the read, it went to the connection the GOAWAY then took away, and nghttp2 refused it too.
            let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
            let response = await channel.call("/test.Raw/Get", [1, 2], timeout: .seconds(10))
            #expect(response.status == .ok, "\(response.status)")
            #expect(response.message == [1, 2])
            #expect(peer.headerBlocks() == 2, "the refused request, then its retry on the second connection")
        }
    }

    @Test("a server that sends a whole large answer, then resets while the request is still being written: every byte of it is read")
    func largeAnswerBeforeResetIsReadWhole() async throws {
        try await Self.withPeer("answer-and-reset", [String(6 << 20)]) { peer, loop in
            var configuration = Self.plain()
            configuration.maxMessageSize = 64 << 20
            configuration.http2.initialStreamWindowSize = 16 << 20  // the whole answer may come at once
            configuration.http2.connectionWindowSize = 16 << 20
            // The answer (6 MiB and OK trailers) is in the client's receive queue, all of it, when the reset comes (the
            // peer waits for that); the write fails then. A loop busy elsewhere may not have read much of it yet: reading
            // only the next 256 KiB lost the rest, and the call failed UNAVAILABLE on the write. (On an idle loopback the
            // client reads it as it comes, so this guards the outcome more than it provokes the old loss.)
            let request = [UInt8](repeating: 7, count: 32 << 20)
            for round in 0..<3 {
                let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
                let response = await channel.call("/test.Raw/Get", request, timeout: .seconds(10))
                #expect(response.status == .ok, "round \(round): \(response.status)")
                #expect(response.message.count == 6 << 20, "round \(round)")
                channel.close()
            }
        }
    }

    @Test("a grpc-status outside 0...16, or not a number, becomes UNKNOWN", arguments: [("99", StatusCode.unknown), ("abc", .unknown), ("-1", .unknown), ("5", .notFound)])
    func outOfRangeStatusIsUnknown(_ sent: String, _ expected: StatusCode) async throws {
        let peer = try ScriptedPeer("status", [sent])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let response = await channel.call([1], timeout: .seconds(5))
        #expect(response.status.code == expected)
        if sent == "99" { #expect(response.status.message.contains("99")) }
    }

    @Test("a compressed message in a grpc-encoding the client does not implement ends the call INTERNAL")
    func unofferedEncodingIsInternal() async throws {
        let peer = try ScriptedPeer("compressed", ["x-unknown"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let response = await channel.call([1, 2], timeout: .seconds(5))
        #expect(response.status.code == .internal)
        #expect(response.status.message.contains("x-unknown"))
        #expect(response.message.isEmpty)
    }

    @Test("repeated -bin values joined with commas decode piece by piece")
    func joinedBinaryValues() async throws {
        let peer = try ScriptedPeer("bin-joined")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let response = await channel.call([1], timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.initialMetadata.values(for: "x-data-bin") == [.binary([1, 2, 3]), .binary([0xFF, 0xFE])])
    }

    @Test("request metadata over the client's own 64 KiB header block fails before sending, INTERNAL, not retried")
    func requestHeadersOverTheClientsLimit() async throws {
        let peer = try ScriptedPeer("max-header-list", ["100000000"])  // the server would take them
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Configuration()  // retry and the breaker on, as by default
        configuration.circuitBreaker.failureThreshold = 1
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let nearly: CallMetadata = ["x-big": String(repeating: "b", count: 60_000)]
        #expect(await channel.call([1], metadata: nearly, timeout: .seconds(5)).status == .ok)
        #expect(peer.headerBlocks() == 1)
        // Before, nghttp2 closed such a stream as REFUSED_STREAM: the server's refusal, retried, then UNAVAILABLE,
        // which opened the breaker of a healthy method.
        let big: CallMetadata = ["x-big": String(repeating: "b", count: 70_000)]
        let response = await channel.call([1], metadata: big, timeout: .seconds(5))
        #expect(response.status.code == .internal)
        #expect(response.status.message.contains("the 65536 bytes this client sends in one header block"), "\(response.status)")
        #expect(peer.headerBlocks() == 1, "nothing of it reached the server")
        #expect(await channel.call([2], timeout: .seconds(5)).status == .ok, "the breaker did not open")
    }

    @Test("request metadata larger than the server accepts fails before sending, INTERNAL, and is not retried")
    func requestHeadersOverThePeersLimit() async throws {
        let peer = try ScriptedPeer("max-header-list", ["600"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Configuration()  // retries on: a refused stream would be retried, this must not be
        configuration.enableCircuitBreaker = false
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        #expect(peer.headerBlocks() == 1)
        let big: CallMetadata = ["x-big": String(repeating: "b", count: 800)]
        let response = await channel.call([1], metadata: big, timeout: .seconds(5))
        #expect(response.status.code == .internal)
        #expect(response.status.message.contains("SETTINGS_MAX_HEADER_LIST_SIZE of 600"))
        #expect(peer.headerBlocks() == 1, "nothing of the oversized request reached the server")
        #expect(await channel.call([2], timeout: .seconds(5)).status == .ok)
    }

    @Test("stream ids running out drain the connection like a GOAWAY, and a new one opens")
    func streamIDsRunOut() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel(Self.plain())
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        #expect(await channel.call([1], timeout: .seconds(2)).status == .ok)
        channel.inspect { pool in
            for case let connection as HTTP2ClientConnection in pool.currentTransports {
                connection.setNextStreamID(Int32.max - 4)
            }
        }
        var codes: [StatusCode] = []
        for index in 0..<6 { codes.append(await channel.call([UInt8(index)], timeout: .seconds(2)).status.code) }
        #expect(codes.allSatisfy { $0 == .ok }, "\(codes)")
        #expect(recorder.story.filter { $0 == "start" }.count == 2, "one new connection: \(recorder.story)")
    }

    @Test("keepalive doubling after too_many_pings stops at its cap, without overflow")
    func keepaliveDoublingIsCapped() throws {
        let loop = try ReactorLoop()
        let bus = EventBus(reactor: loop.reactor).single
        let connector = FakeConnector()
        let subchannel = Subchannel(
            reactor: loop.reactor, address: NetworkAddress(ip: "127.0.0.1", port: 1)!, service: "s", connector: connector,
            bus: bus, connectionIDs: ConnectionIDSource(),
            backoff: .init(base: .milliseconds(100), multiplier: 1.6, jitter: 0.2, maximum: .seconds(3)),
            keepAliveTime: .seconds(30), idleTimeout: .zero)
        subchannel.connect()
        for _ in 0..<200 {
            guard let transport = connector.made.last else { break }
            // The server took the connection's streams: each GOAWAY leaves it IDLE (two refusals in a row before it
            // was established would be a failed attempt, TRANSIENT_FAILURE).
            subchannel.transportDraining(transport, errorCode: 0xb, debugData: "too_many_pings", tookStreams: true)
            subchannel.connect()
        }
        #expect(subchannel.keepAliveTime == Subchannel.maximumKeepAliveTime)
    }
}
