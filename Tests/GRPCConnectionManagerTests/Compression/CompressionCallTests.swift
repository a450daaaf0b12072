import Foundation
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// Message compression on real calls: against the embedded server (which reports what it received), against grpcio
/// both ways, and against peers that compress badly.
@Suite("Compression on calls", .serialized)
struct CompressionCallTests {
    static func plain() -> Configuration {
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        return configuration
    }

    /// Compressible bytes: a repeated phrase.
    static let text = Array(String(repeating: "the quick brown fox jumps over the lazy dog. ", count: 1500).utf8)

    /// Records the bytes each finished call sent and received (message bytes as they went over the wire).
    final class ByteCounts: Sendable {
        let values = PThreadLock<[(sent: Int, received: Int)]>([])
        init(_ channel: GRPCChannel) {
            channel.events.subscribe { event in
                if case .callFinished(_, _, _, _, _, let sent, let received) = event {
                    self.values.withLock { $0.append((sent, received)) }
                }
            }
        }
        var last: (sent: Int, received: Int)? { self.values.withLock { $0.last } }
    }

    @Test("requests go compressed as the configuration, the method or the call says; the server inflates them")
    func requestCompressionAgainstEmbeddedServer() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.compression.requestEncoding = .gzip
        configuration.compression.requestEncodingPerMethod = ["/echo.Echo/Deflated": .deflate, "plain.Service": .identity]
        let channel = try fixture.channel(configuration)
        let counts = ByteCounts(channel)

        // The configuration's default: gzip.
        let gzipped = try await channel.unary(
            path: "/echo.Echo/Get", request: Self.text, metadata: ["x-report-accept-encoding": "1"])
        #expect(gzipped.message == Self.text)
        #expect(gzipped.initialMetadata["x-received-grpc-encoding"] == "gzip")
        #expect(gzipped.initialMetadata["x-received-compressed"] == "1")
        #expect(gzipped.initialMetadata["x-received-grpc-accept-encoding"] == "gzip,deflate")
        #expect(await eventually { (counts.last?.sent ?? .max) < Self.text.count / 10 })

        // Per method, then per service.
        let deflated = try await channel.unary(path: "/echo.Echo/Deflated", request: Self.text)
        #expect(deflated.message == Self.text)
        #expect(deflated.initialMetadata["x-received-grpc-encoding"] == "deflate")
        let plain = try await channel.unary(path: "/plain.Service/Get", request: Self.text)
        #expect(plain.message == Self.text)
        #expect(plain.initialMetadata["x-received-grpc-encoding"] == nil)
        #expect(plain.initialMetadata["x-received-compressed"] == nil)

        // Per call, over all of it.
        let identity = try await channel.unary(
            path: "/echo.Echo/Get", request: Self.text, options: RequestOptions(compression: .identity))
        #expect(identity.initialMetadata["x-received-compressed"] == nil)
        let perCall = try await channel.unary(
            path: "/plain.Service/Get", request: [1, 2, 3], options: RequestOptions(compression: .deflate))
        #expect(perCall.message == [1, 2, 3])
        #expect(perCall.initialMetadata["x-received-grpc-encoding"] == "deflate")

        // The empty message compresses too.
        let empty = try await channel.unary(path: "/echo.Echo/Get", request: [], metadata: ["x-response-bytes": "0"])
        #expect(empty.initialMetadata["x-received-compressed"] == "1")
    }

    @Test("a retried call sends the same compressed request again")
    func retryReplaysCompressed() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.enableRetry = true
        configuration.retry.policy.initialBackoff = .milliseconds(1)
        let channel = try fixture.channel(configuration)
        let response = try await channel.unary(
            path: "/echo.Echo/Get", request: Self.text, metadata: ["x-fail-first": "2", "x-request-key": "gz"],
            options: RequestOptions(compression: .gzip))
        #expect(response.message == Self.text)
        #expect(response.initialMetadata["x-received-compressed"] == "1")
        #expect(fixture.server.requestCount(key: "gz") == 3)
    }

    @Test("streamed requests are compressed message by message")
    func streamedRequests() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel(Self.plain())
        let call = channel.clientStreaming(path: "/raw.Service/Collect", options: RequestOptions(compression: .gzip))
        for word in ["alpha", "beta", "gamma"] { try await call.write(Array(word.utf8)) }
        let response = try await call.finish().get()
        #expect(response.message == Array("alpha beta gamma".utf8))
        #expect(response.initialMetadata["x-received-compressed"] == "3")
        #expect(response.initialMetadata["x-received-grpc-encoding"] == "gzip")
    }

    @Test("compressed responses are inflated: unary and streamed, gzip and deflate", arguments: ["gzip", "deflate"])
    func compressedResponses(_ encoding: String) async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel(Self.plain())
        let counts = ByteCounts(channel)
        let unary = try await channel.unary(
            path: "/echo.Echo/Get", request: Self.text, metadata: ["x-compress-response": encoding])
        #expect(unary.message == Self.text)
        #expect(await eventually { (counts.last?.received ?? .max) < Self.text.count / 10 })

        let stream = channel.serverStreaming(
            path: "/raw.Service/Expand", request: [],
            metadata: ["x-compress-response": encoding, "x-response-count": "5", "x-response-bytes": "20000"])
        var messages = 0
        for try await message in stream.responses {
            #expect(message == [UInt8](repeating: 0x61, count: 20000))
            messages += 1
        }
        #expect(messages == 5)
        #expect(await stream.result().status == .ok)
    }

    @Test("responses in an encoding not offered are still inflated when implemented; unknown ones end INTERNAL")
    func notOffered() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.compression.acceptedEncodings = [.deflate]
        let channel = try fixture.channel(configuration)
        for encoding in ["gzip", "deflate"] {
            let response = try await channel.unary(
                path: "/echo.Echo/Get", request: [1, 2, 3],
                metadata: ["x-compress-response": encoding, "x-report-accept-encoding": "1"])
            #expect(response.message == [1, 2, 3])
            #expect(response.initialMetadata["x-received-grpc-accept-encoding"] == "deflate")
        }
        configuration.compression.acceptedEncodings = []
        let offersNothing = try fixture.channel(configuration)
        let identity = try await offersNothing.unary(
            path: "/echo.Echo/Get", request: [1], metadata: ["x-report-accept-encoding": "1"])
        #expect(identity.initialMetadata["x-received-grpc-accept-encoding"] == "identity")
        let peer = try ScriptedPeer("compressed", ["snappy"])
        defer { peer.stop() }
        let scripted = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: fixture.loop)
        let unknown = await scripted.unaryResult(path: "/echo.Echo/Get", request: [1, 2, 3])
        #expect(unknown.status.code == .internal)
        #expect(unknown.status.message.contains("\"snappy\""))
    }

    @Test("a small message that inflates past the receive limit ends RESOURCE_EXHAUSTED; the connection stays")
    func bomb() async throws {
        // 32 MiB of zeros, about 32 KiB on the wire.
        let peer = try ScriptedPeer("bomb", [String(32 << 20)])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.plain()
        configuration.maxMessageSize = 1 << 20
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        for _ in 0..<3 {
            let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1])
            #expect(response.status.code == .resourceExhausted)
            #expect(response.status.message.contains("receive limit of 1048576"))
        }
        // A larger per-call limit lets the same message through.
        let allowed = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1], options: RequestOptions(maxReceiveMessageSize: 40 << 20))
        #expect(allowed.status == .ok)
        #expect(allowed.message.count == 32 << 20)
        #expect(recorder.count { if case .connectAttemptSucceeded = $0 { true } else { false } } == 1)
    }

    @Test("a reader that falls behind on compressed messages holds the bytes sent, not what they inflate to")
    func compressedBacklogStaysCompressed() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.streamBufferSize = 64 << 10
        configuration.http2.initialStreamWindowSize = 256 << 10
        let channel = try fixture.channel(configuration)
        // 64 messages of 1 MiB of "a", about 1 KiB each gzipped: the whole stream fits the window the client
        // granted before it knew, so all of it arrives while nothing is read. Inflated on arrival it was 64 MiB.
        let count = 64
        let size = 1 << 20
        let metadata: CallMetadata = [
            "x-response-count": String(count), "x-response-bytes": String(size), "x-compress-response": "gzip",
        ]
        let rssBefore = residentBytes()
        let call = channel.serverStreaming(path: "/test.Stream/Expand", request: [], metadata: metadata)
        let result = await call.result()
        #expect(result.status == .ok, "\(result.status)")
        let held = call.buffers.bufferedInboundBytes
        #expect(held < 2 * size, "unread, the backlog holds \(held) bytes")
        if !runningUnderAddressSanitizer() {
            #expect(residentBytes() - rssBefore < 24 << 20)
        }
        var received = 0
        for try await message in call.responses {
            #expect(message.count == size && message.first == 0x61 && message.last == 0x61)
            received += 1
        }
        #expect(received == count)

        // Callbacks: one read brings dozens of these; past a mebibyte in a turn they wait compressed, and every
        // one arrives inflated, in order.
        let delivered = PThreadLock<[Int]>([])
        let ended = PThreadLock<CallStatus?>(nil)
        _ = channel.serverStreaming(
            path: "/test.Stream/Expand", request: [], metadata: metadata,
            callbacks: StreamingCallbacks(
                onMessage: { message in
                    let intact = message.count == size && message[0] == 0x61 && message[size / 2] == 0x61 && message[size - 1] == 0x61
                    delivered.withLock { $0.append(intact ? message.count : -1) }
                },
                onFinish: { result in ended.withLock { $0 = result.status } }))
        #expect(await eventually(timeout: 20) { ended.withLock { $0 } != nil })
        #expect(ended.withLock { $0 } == .ok)
        #expect(delivered.withLock { $0 } == [Int](repeating: size, count: count))
    }

    @Test("a message flagged gzip that is not gzip ends INTERNAL")
    func corrupt() async throws {
        let peer = try ScriptedPeer("compressed", ["gzip"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let response = await channel.unaryResult(path: "/echo.Echo/Get", request: [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(response.status.code == .internal)
        #expect(response.status.message.contains("could not decompress"))
    }

    @Test("grpcio inflates our gzip and deflate requests, and its compressed responses are inflated here")
    func interopWithGrpcio() async throws {
        let peer = try PythonPeer()
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.plain(), eventLoop: loop)
        let counts = ByteCounts(channel)
        for encoding in [CallCompression.gzip, .deflate] {
            let response = try await channel.unary(
                path: "/echo.Echo/Get", request: Self.text, options: RequestOptions(compression: encoding))
            #expect(response.message == Self.text, "\(encoding)")
            #expect(await eventually { (counts.last?.sent ?? .max) < Self.text.count / 10 }, "\(encoding)")
        }
        for encoding in ["gzip", "deflate"] {
            let response = try await channel.unary(
                path: "/echo.Echo/Get", request: Self.text, metadata: ["x-compress-response": encoding])
            #expect(response.message == Self.text, "\(encoding)")
            #expect(await eventually { (counts.last?.received ?? .max) < Self.text.count / 10 }, "\(encoding)")
        }
        // Streams both ways, compressed both ways.
        let call = channel.bidirectionalStreaming(
            path: "/raw.Service/Update", metadata: ["x-compress-response": "gzip"],
            options: RequestOptions(compression: .deflate))
        for _ in 0..<3 { try await call.write(Self.text) }
        try await call.closeSend()
        var echoed = 0
        for try await message in call.responses {
            #expect(message == Self.text)
            echoed += 1
        }
        #expect(echoed == 3)
    }

    @Test("against a grpcio server that compresses every response it may", arguments: [true, false])
    func grpcioCompressingEverything(_ offered: Bool) async throws {
        let peer = try PythonPeer(compression: "gzip")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Self.plain()
        if !offered { configuration.compression.acceptedEncodings = [] }
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let counts = ByteCounts(channel)
        for _ in 0..<3 {
            let response = try await channel.unary(path: "/echo.Echo/Get", request: Self.text)
            #expect(response.message == Self.text)
        }
        // grpc core compresses with its default whatever the client offers (grpc-accept-encoding: identity here when
        // nothing is): the client inflates it either way.
        #expect(await eventually { counts.values.withLock { $0.count } == 3 })
        #expect((counts.last?.received ?? .max) < Self.text.count / 10)
        let health = await channel.unaryResult(path: "/grpc.health.v1.Health/Check", request: [])
        #expect(health.status == .ok)
        #expect(health.message == [0x08, 0x01])
    }

    @Test("grpc-cm call sends compressed requests and decodes compressed responses (grpcio peer)")
    func cli() throws {
        let peer = try PythonPeer(compression: "gzip")
        defer { peer.stop() }
        let cli = grpcCMBinary()
        for encoding in ["gzip", "deflate", "identity"] {
            #expect(
                try runProgram(cli, ["call", "--plaintext", peer.target, "raw.Service/Get", "--data-hex", "0102ff", "--compression", encoding, "--hex"])
                    == (0, "0102ff\n"), "\(encoding)")
        }
        #expect(try runProgram(cli, ["call", "--plaintext", peer.target, "raw.Service/Get", "--data-hex", "01", "--compression", "zstd"]).status == 2, "bad arguments")
    }

    @Test("per-method compression keys are validated")
    func validation() throws {
        for key in ["", "/", "/a", "a/b", "/a/b/c", "//b"] {
            var configuration = Configuration()
            configuration.compression.requestEncodingPerMethod = [key: .gzip]
            #expect(throws: ConfigurationError.self, "\(key)") { try configuration.validate() }
        }
        var configuration = Configuration()
        configuration.compression.requestEncodingPerMethod = ["/a.B/C": .gzip, "a.B": .deflate, "/a.D/": .gzip]
        try configuration.validate()
    }
}
