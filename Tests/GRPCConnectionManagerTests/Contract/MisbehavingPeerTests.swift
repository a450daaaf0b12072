import Foundation
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMReactor
@testable import GRPCCMWire

/// A server that answers every stream with a random but well-framed sequence: headers where they don't belong, DATA
/// after trailers, huge header blocks, resets, window abuse, GOAWAY, silence. Every call still ends exactly once
/// with a status, nothing crashes, and the channel keeps working for the next call. Then one answer at a time that
/// breaks one of HTTP/2's rules for responses, each with the error it must give.
@Suite("Misbehaving HTTP/2 peers", .serialized)
struct MisbehavingPeerTests {
    @Test(
        "a server that drops each connection, or sends GOAWAY, as soon as it is READY is redialled with backoff",
        arguments: ["drop-after-settings", "goaway-after-settings"])
    func shortLivedConnectionsBackOff(_ mode: String) async throws {
        try await LimitsTests.withPeer(mode) { peer, loop in
            var configuration = Configuration()  // backoff 100 ms x 1.6 (±20 %) up to 3 s
            configuration.enableCircuitBreaker = false
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            channel.connect()  // eager: the pool redials by itself
            let accepted = { peer.events.filter { $0 == "accepted" }.count }
            #expect(await eventually { accepted() >= 2 })
            let before = accepted()
            try await Task.sleep(for: .milliseconds(1500))
            // The delays grow by 1.6 from 100 ms; even with jitter at its lowest (x0.8) the next ones are 205, 328,
            // 524 ms...: at most 4 more dials fit in 1.5 s. Redialled as soon as each was lost, hundreds would.
            let more = accepted() - before
            #expect(more >= 1 && more <= 6, "\(more) connections in 1.5 s")
            channel.close()
        }
    }

    @Test(
        "a server that sends GOAWAY to every new connection: a waiting fail-fast call fails UNAVAILABLE after the second, health checked or not",
        arguments: [false, true])
    func goAwayToEveryConnectionFailsWaitingCalls(_ healthChecked: Bool) async throws {
        // The first GOAWAY sends the call to a new connection at once; the second, with none established between,
        // is a failed attempt. With health checking the call never had a stream to be refused on: it waited, and
        // the pool redialled at round-trip speed until the call's deadline.
        try await LimitsTests.withPeer("goaway-after-settings") { peer, loop in
            var configuration = Configuration()
            configuration.enableCircuitBreaker = false
            configuration.enableRetry = false
            // Established only a second after READY: the GOAWAY (after our SETTINGS ACK) is early, loaded or not.
            configuration.reconnectBackoff.initial = .seconds(1)
            if healthChecked { configuration.healthCheckServiceName = "" }
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            let response = await channel.call([1], timeout: .seconds(5))
            #expect(response.status.code == .unavailable, "\(response.status)")
            // Health checked, the failed attempt fails it, saying why; otherwise its stream's second refusal does.
            let why = healthChecked ? "GOAWAY NO_ERROR to two new connections in a row" : "REFUSED_STREAM"
            #expect(response.status.message.contains(why), "\(response.status)")
            let accepted = peer.events.filter { $0 == "accepted" }.count
            #expect(accepted <= 3, "\(accepted) connections for one call")
            channel.close()
        }
    }

    @Test("a connection nghttp2 ends over the server's input says why, not \"closed by the server\"")
    func protocolErrorIsNamed() async throws {
        try await LimitsTests.withPeer("enable-push") { peer, loop in
            var configuration = Configuration()
            configuration.enableRetry = false
            let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
            let response = await channel.call([1], timeout: .seconds(5))
            #expect(response.status.code == .unavailable)
            #expect(response.status.message.contains("HTTP/2 protocol error from"), "\(response.status)")
            #expect(response.status.message.contains("server attempted to enable push"), "\(response.status)")
            #expect(await eventually { peer.events.contains("goaway") }, "nghttp2 told the server too")
        }
    }

    @Test("a GOAWAY's debug data reaches events and statuses cut to 256 bytes, on one line")
    func goAwayDebugDataIsBounded() async throws {
        let peer = try ScriptedPeer("goaway-after-settings", ["100000"])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.http2.maxFrameSize = 1 << 20  // room for the whole debug data in one frame
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        channel.connect()
        let debug = {
            recorder.all.compactMap { event -> String? in
                if case .goAwayReceived(_, _, _, let debugData, _) = event { return debugData }
                return nil
            }.first
        }
        #expect(await eventually { debug() != nil })
        let text = debug() ?? ""
        #expect(text.utf8.count == 256 && text.hasPrefix("no more??no more??"), "\(text.utf8.count) bytes: \(text.prefix(40))")
        channel.close()
    }

    @Test("every call ends once with a status, whatever the peer sends", arguments: [1, 2, 3, 4])
    func randomAnswers(_ seed: Int) async throws {
        let peer = try ScriptedPeer("random", [String(seed * 1000)])
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Configuration()
        configuration.maxReconnectDelay = .milliseconds(50)
        configuration.reconnectBackoff.initial = .milliseconds(10)
        configuration.enableCircuitBreaker = false
        configuration.minConnectTimeout = .seconds(1)
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        let ledger = CompletionLedger()
        let codes = PThreadLock<[StatusCode: Int]>([:])
        let calls = 150
        for id in 0..<calls {
            let options = RequestOptions(timeout: .milliseconds(800), waitForReady: id % 3 == 0)
            if id % 4 == 3 {
                let stream = channel.bidirectionalStreaming(
                    path: "/fuzz.Peer/Update", options: options,
                    callbacks: StreamingCallbacks(
                        onMessage: { _ in },
                        onFinish: { result in
                            ledger.record(id)
                            codes.withLock { $0[result.status.code, default: 0] += 1 }
                        }))
                _ = stream.send([UInt8(id & 0xFF)])
                stream.closeSend()
            } else {
                channel.unary(path: "/fuzz.Peer/Get", request: [UInt8(id & 0xFF)], options: options) { response in
                    ledger.record(id)
                    codes.withLock { $0[response.status.code, default: 0] += 1 }
                }
            }
            if id % 10 == 9 { try await Task.sleep(nanoseconds: 20_000_000) }
        }
        #expect(await eventually(timeout: 15) { ledger.completed == calls }, "\(ledger.completed) of \(calls) ended")
        #expect(ledger.duplicates == 0)
        let seen = codes.withLock { $0 }
        print("random peer \(seed): \(seen.map { "\($0.key.protoName)=\($0.value)" }.sorted())")
        #expect(seen.keys.count >= 3, "the peer's answers were varied: \(seen)")
        // The loop is still healthy: a call to a sane server on it works.
        let server = try EchoServer(eventLoop: loop)
        defer { server.close() }
        let sane = try GRPCChannel(target: server.address, eventLoop: loop)
        #expect(await sane.call([9], timeout: .seconds(2)).status == .ok)
    }

    @Test(
        "a response that breaks HTTP/2's rules ends its call INTERNAL, once, saying what was wrong; the next call works",
        arguments: [
            ("upper-case-name", "upper-case"), ("crlf-value", "value of"), ("pseudo-in-trailers", "in trailers"),
            ("no-status", "without :status"), ("connection-header", "connection-specific"),
            ("data-after-informational", "DATA before the response headers"),
            ("trailers-without-end-stream", "END_STREAM"),
        ])
    func malformedResponses(_ scriptCase: String, _ reason: String) async throws {
        let response = try await Self.firstAnswer(scriptCase)
        #expect(response.status.code == .internal, "\(response.status)")
        #expect(response.status.message.contains("malformed response from the server"), "\(response.status)")
        #expect(response.status.message.contains(reason), "\(response.status)")
    }

    /// The first call's response to a `malformed` peer answering it with `scriptCase`, after checking that the
    /// connection goes on (a second call is echoed) and that each call ended once: a second completion of the first
    /// would have come from its reset, turns of the loop before the second call could end.
    static func firstAnswer(_ scriptCase: String) async throws -> UnaryResponse {
        let peer = try ScriptedPeer("malformed", [scriptCase])
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: fixture.loop)
        let ledger = CompletionLedger()
        let response = await channel.call("/fuzz.Peer/Get", [1], timeout: .seconds(5), ledger: ledger, id: 1)
        let next = await channel.call("/fuzz.Peer/Get", [2], timeout: .seconds(5), ledger: ledger, id: 2)
        #expect(next.status == .ok, "\(scriptCase): the connection goes on: \(next.status)")
        #expect(next.message == [2])
        #expect(ledger.completed == 2 && ledger.duplicates == 0)
        return response
    }

    @Test(
        "an HTTP answer that is not gRPC, or a status outside the trailers, ends the call as gRPC maps it, once",
        arguments: [
            // A proxy's error page: the body is never read as gRPC messages.
            ("http-503-html", StatusCode.unavailable, "HTTP status 503 (content-type \"text/html\")"),
            ("http-404-plain", .unimplemented, "HTTP status 404"),
            ("http-502-html-end", .unavailable, "HTTP status 502 without grpc-status"),
            ("http-200-html", .unknown, "content-type \"text/html\""),
            ("http-200-grpcweb", .unknown, "application/grpc-web+proto"),
            // A grpc-status in the response headers is not the call's status: the trailers' is.
            ("status-in-headers-then-reset", .internal, "INTERNAL_ERROR"),
            ("status-in-headers-then-end", .internal, "without grpc-status"),
            // Trailers (or a trailers-only response) without a status: UNKNOWN, as grpc-go and grpc-java read it.
            ("trailers-without-status", .unknown, "trailers without grpc-status: quota exceeded"),
            ("trailers-only-without-status", .unknown, "trailers without grpc-status"),
        ])
    func notGRPCResponses(_ scriptCase: String, _ code: StatusCode, _ reason: String) async throws {
        let response = try await Self.firstAnswer(scriptCase)
        #expect(response.status.code == code, "\(response.status)")
        #expect(response.status.message.contains(reason), "\(response.status)")
        #expect(response.message.isEmpty, "no message from a failed call: \(response.status)")
    }

    @Test("a server that ends a bidirectional stream with DATA and no trailers, its requests still open: INTERNAL at once")
    func dataEndsOpenStream() async throws {
        let peer = try ScriptedPeer("data-end")
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: LimitsTests.plain(), eventLoop: loop)
        // The deadline only bounds a regression: the call used to wait for it (nghttp2 kept the half-closed stream).
        let call = channel.bidirectionalStreaming(
            path: "/test.Stream/Update", options: RequestOptions(timeout: .seconds(20)))
        try await call.write([1])
        var responses = call.responses.makeAsyncIterator()
        #expect(try await responses.next() == Array("x".utf8))
        do {
            let extra = try await responses.next()
            Issue.record("the stream went on: \(String(describing: extra))")
        } catch {
            #expect(error.code == .internal, "\(error.status)")
            #expect(error.status.message.contains("without grpc-status"), "\(error.status)")
        }
        let status = await call.result().status
        #expect(status.code == .internal, "\(status)")
        // This side's half was cancelled: the connection serves the next call.
        let next = channel.bidirectionalStreaming(path: "/test.Stream/Update", options: RequestOptions(timeout: .seconds(20)))
        try await next.write([2])
        var nextResponses = next.responses.makeAsyncIterator()
        #expect(try await nextResponses.next() == Array("x".utf8))
        next.cancel()
    }

    @Test("a trailers-only failure that comes before the request is all sent is retried by policy (it commits nothing)")
    func earlyTrailersOnlyIsRetried() async throws {
        let peer = try ScriptedPeer("early-status", ["14"])
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.retry.policy.initialBackoff = .milliseconds(10)
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: fixture.loop)
        // Larger than the 64 KiB stream window: the request is still being sent when the answer comes.
        let response = await channel.call("/fuzz.Peer/Get", [UInt8](repeating: 1, count: 200 << 10), timeout: .seconds(5))
        #expect(response.status.code == .unavailable, "\(response.status)")
        #expect(peer.headerBlocks() == configuration.retry.policy.maxAttempts, "every attempt the policy allows")
    }

    @Test("padding in DATA frames is given back to the peer once (nghttp2 counts it), not twice")
    func paddingIsConsumedOnce() async throws {
        // An async reader that reads nothing, its buffer full after the first message: only padding is given back
        // from then on. 1,000 frames of 256 bytes + 256 of padding: 577,541 bytes received, 321,541 consumed (the
        // first message and the padding), under half the 1 MiB stream window, so no WINDOW_UPDATE for the stream.
        // Padding counted twice made it 577,541: past half, window granted for 256,000 bytes nobody read.
        let peer = try ScriptedPeer("padded", ["1000"])
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.streamBufferSize = 64 << 10
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: fixture.loop)
        let call = channel.serverStreaming(path: "/fuzz.Peer/Expand", request: [1])
        #expect(await call.result().status == .ok)
        // The stream's last frames are in; anything the client sent for them is in by a round trip later.
        _ = await channel.call("/fuzz.Peer/Get", [2], timeout: .seconds(5))
        let streamUpdates = peer.events.filter { $0.hasPrefix("window 1 ") }
        #expect(streamUpdates.isEmpty, "stream 1 was granted window for bytes nobody read: \(streamUpdates)")
    }

    @Test("application/grpc with a format suffix or parameters is gRPC", arguments: ["http-200-grpcproto", "http-200-grpcparam"])
    func grpcContentTypeVariants(_ scriptCase: String) async throws {
        let peer = try ScriptedPeer("malformed", [scriptCase])
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try GRPCChannel(target: peer.target, eventLoop: fixture.loop)
        let response = await channel.call("/fuzz.Peer/Get", [4], timeout: .seconds(5))
        #expect(response.status == .ok, "\(response.status)")
        #expect(response.message == [4])
    }

    @Test("a status whose grpc-message ends with a space is the server's status, not a malformed response")
    func messageEndingWithASpace() async throws {
        // RFC 9113 forbids a space at either end of a value; gRPC leaves spaces unencoded and grpc-go sends such a
        // message ("invalid name: " for an empty name) as it is. Refused, the call ended INTERNAL and lost NOT_FOUND.
        let response = try await Self.firstAnswer("message-ends-with-space")
        #expect(response.status == CallStatus(code: .notFound, message: "invalid name: "), "\(response.status)")
        #expect(response.trailingMetadata["x-pad"] == " v ")
    }

    @Test("an informational (1xx) block before the response is skipped")
    func informationalThenResponse() async throws {
        let peer = try ScriptedPeer("malformed", ["informational-then-ok"])
        defer { peer.stop() }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try GRPCChannel(target: peer.target, eventLoop: fixture.loop)
        let response = await channel.call("/fuzz.Peer/Get", [3], timeout: .seconds(5))
        #expect(response.status == .ok, "\(response.status)")
        #expect(response.message == [3])
    }
}
