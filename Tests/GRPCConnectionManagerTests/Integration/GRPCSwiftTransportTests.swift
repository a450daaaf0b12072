import EchoProto
import Foundation
@testable import GRPCConnectionManagerTransport
import GRPCCore
import GRPCEchoServer
import Logging
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// The generated grpc-swift-2 client (Examples/grpc-swift-2) over `ManagedClientTransport`, against the grpcio
/// server (the reference implementation) and the embedded one.
@Suite("grpc-swift-2 generated client over ManagedClientTransport", .serialized)
struct GRPCSwiftTransportTests {
    typealias Peer = StreamingTests.Peer

    /// Runs `body` with a generated client on a transport over a manager's channel to a fresh server.
    static func withEchoClient<R: Sendable>(
        _ peer: Peer, serviceConfig: ServiceConfig = ServiceConfig(),
        _ body: (Echo_Echo.Client<ManagedClientTransport>, ManagedClientTransport) async throws -> R
    ) async throws -> R {
        let python: PythonPeer?
        let fixture: LoopbackFixture?
        let target: String
        switch peer {
        case .grpcio:
            python = try PythonPeer()
            fixture = nil
            target = python!.target
        case .embedded:
            fixture = try LoopbackFixture()
            python = nil
            target = fixture!.target
        }
        defer {
            python?.stop()
            fixture?.shutdown()
        }
        let manager = try ConnectionManager(eventLoop: fixture?.loop)
        let transport = try ManagedClientTransport(
            manager: manager, service: "echo", address: target, serviceConfig: serviceConfig)
        let result = try await withGRPCClient(transport: transport) { client in
            try await body(Echo_Echo.Client(wrapping: client), transport)
        }
        await manager.close(gracePeriod: .seconds(1))
        return result
    }

    static func request(_ text: String) -> Echo_EchoRequest { .with { $0.text = text } }

    @Test("unary, server, client and bidirectional streaming", arguments: Peer.allCases)
    func allFourKinds(_ peer: Peer) async throws {
        try await Self.withEchoClient(peer) { echo, _ in
            #expect(try await echo.get(Self.request("hello")).text == "hello")

            let words = try await echo.expand(Self.request("alpha beta gamma")) { response in
                var texts: [String] = []
                for try await message in response.messages { texts.append(message.text) }
                return texts
            }
            #expect(words == ["alpha", "beta", "gamma"])

            let joined = try await echo.collect { writer in
                for word in ["x", "y", "z"] { try await writer.write(Self.request(word)) }
            }
            #expect(joined.text == "x y z")

            let echoed = try await echo.update { writer in
                for index in 0..<50 { try await writer.write(Self.request("m\(index)")) }
            } onResponse: { response in
                var texts: [String] = []
                for try await message in response.messages { texts.append(message.text) }
                return texts
            }
            #expect(echoed == (0..<50).map { "m\($0)" })
        }
    }

    @Test("status codes, messages and metadata both ways", arguments: Peer.allCases)
    func statusAndMetadata(_ peer: Peer) async throws {
        try await Self.withEchoClient(peer) { echo, _ in
            var metadata: GRPCCore.Metadata = ["x-fail-code": "7", "x-fail-message": "no%20entry"]
            do {
                _ = try await echo.get(Self.request("a"), metadata: metadata)
                Issue.record("expected PERMISSION_DENIED")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .permissionDenied)
                #expect(error.message == "no entry")
            }

            metadata = ["x-custom": "value"]
            metadata.addBinary([0, 1, 2, 255], forKey: "x-data-bin")
            let headers = try await echo.get(Self.request("m"), metadata: metadata) { response in
                try response.accepted.get().metadata
            }
            #expect(Array(headers[stringValues: "x-custom"]) == ["value"])
            #expect(Array(headers[binaryValues: "x-data-bin"]) == [[0, 1, 2, 255]])

            // A string under a -bin key is that value's base64, as grpc-swift's own transport sends it.
            let asText = try await echo.get(Self.request("t"), metadata: ["x-text-bin": "AAEC/w=="]) { response in
                try response.accepted.get().metadata
            }
            #expect(Array(asText[binaryValues: "x-text-bin"]) == [[0, 1, 2, 255]])

            // CallOptions.compression compresses the request; the configuration's encodings are offered.
            if peer == .embedded {
                var options = GRPCCore.CallOptions.defaults
                options.compression = .gzip
                let compressed = try await echo.get(
                    Self.request("zipped"), metadata: ["x-report-accept-encoding": "1"], options: options
                ) { response in try response.accepted.get().metadata }
                #expect(Array(compressed[stringValues: "x-received-grpc-encoding"]) == ["gzip"])
                #expect(Array(compressed[stringValues: "x-received-compressed"]) == ["1"])
                #expect(compressed[stringValues: "x-received-grpc-accept-encoding"].first { _ in true }?.contains("gzip") == true)
            }

            // A streaming call that the server ends with a status after two messages.
            let failing: GRPCCore.Metadata = ["x-fail-after": "2", "x-fail-code": "9"]
            let received = PThreadLock(0)
            do {
                try await echo.expand(Self.request("a b c d"), metadata: failing) { response in
                    for try await _ in response.messages { received.withLock { $0 += 1 } }
                }
                Issue.record("expected FAILED_PRECONDITION")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .failedPrecondition)
            }
            #expect(received.withLock { $0 } == 2)
        }
    }

    @Test("deadlines end the call with DEADLINE_EXCEEDED", arguments: Peer.allCases)
    func deadline(_ peer: Peer) async throws {
        try await Self.withEchoClient(peer) { echo, _ in
            var options = GRPCCore.CallOptions.defaults
            options.timeout = .milliseconds(200)
            let started = now()
            do {
                _ = try await echo.update(metadata: [:], options: options) { writer in
                    try await writer.write(Self.request("only one"))
                    // The requests stay open: only the deadline ends this.
                    try await Task.sleep(for: .seconds(30))
                } onResponse: { response in
                    for try await _ in response.messages {}
                }
                Issue.record("expected DEADLINE_EXCEEDED")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .deadlineExceeded)
            }
            #expect(now() - started < 5)
        }
    }

    @Test("cancelling the task resets the stream; the connection stays usable", arguments: Peer.allCases)
    func cancellation(_ peer: Peer) async throws {
        try await Self.withEchoClient(peer) { echo, transport in
            let firstMessage = AsyncStream<Void>.makeStream()
            let task = Task {
                try await echo.expand(
                    Self.request(""), metadata: ["x-response-count": "1000000", "x-response-bytes": "32"]
                ) { response in
                    for try await _ in response.messages { firstMessage.continuation.yield() }
                }
            }
            var iterator = firstMessage.stream.makeAsyncIterator()
            _ = await iterator.next()
            task.cancel()
            let outcome = await task.result
            if case .success = outcome { Issue.record("a cancelled million-message stream completed") }
            // The stream was reset, not left running: no call is open on the channel any more.
            let pool = transport.channel.pool
            #expect(await eventually { await transport.channel.openCalls(pool) == 0 })
            let after = try await echo.get(Self.request("still fine"))
            #expect(after.text == "still fine")
        }
    }

    @Test("a request producer that throws ends the RPC with its error, not as a cancel by the client")
    func producerErrorEndsTheRPC() async throws {
        struct Boom: Error, CustomStringConvertible {
            var description: String { "boom" }
        }
        let cases: [(thrown: any Error, code: GRPCCore.RPCError.Code, text: String)] = [
            (GRPCCore.RPCError(code: .dataLoss, message: "the source ran dry"), .dataLoss, "the source ran dry"),
            (Boom(), .unknown, "boom"),
            (CancellationError(), .cancelled, "cancelled"),
        ]
        try await Self.withEchoClient(.embedded) { echo, _ in
            for (thrown, code, text) in cases {
                do {
                    _ = try await echo.collect { writer in
                        try await writer.write(Self.request("x"))
                        throw thrown
                    }
                    Issue.record("the RPC succeeded")
                } catch let error as GRPCCore.RPCError {
                    #expect(error.code == code, "\(error)")
                    #expect(error.message.contains(text), "\(error)")
                }
            }
            // The connection is unharmed.
            #expect(try await echo.get(Self.request("after")).text == "after")
        }
    }

    @Test("interceptors see the compression GRPCCore's CallOptions ask for, as the requests are sent with it")
    func interceptorsSeeTheCompression() async throws {
        struct Recorder: CallInterceptor {
            let seen: PThreadLock<[CallCompression?]>
            func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
                self.seen.withLock { $0.append(call.options.compression) }
                return .proceed
            }
        }
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let seen = PThreadLock<[CallCompression?]>([])
        let channel = try GRPCChannel(target: fixture.target, interceptors: [Recorder(seen: seen)], eventLoop: fixture.loop)
        let transport = ManagedClientTransport(channel: channel)
        try await withGRPCClient(transport: transport) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            var options = GRPCCore.CallOptions.defaults
            options.compression = .gzip
            let metadata = try await echo.get(Self.request("zipped"), options: options) { response in
                try response.accepted.get().metadata
            }
            #expect(Array(metadata[stringValues: "x-received-grpc-encoding"]) == ["gzip"])
            #expect(try await echo.get(Self.request("plain")).text == "plain")
        }
        #expect(seen.withLock { $0 } == [.gzip, nil])
    }

    @Test("a transport made from a manager follows the service's channel when the manager replaces it")
    func managedTransportFollowsTheManager() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let transport = try ManagedClientTransport(manager: manager, service: "echo", address: fixture.target)
        try await withGRPCClient(transport: transport) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            let first = try await echo.get(Self.request("first"))
            #expect(first.text == "first")
            // The manager closes the service's channel and opens another. Before, the transport kept the closed one
            // and every RPC failed UNAVAILABLE.
            manager.closeConnection(service: "echo")
            _ = try manager.connection(service: "echo")
            let second = try await echo.get(Self.request("second"))
            #expect(second.text == "second")
            // Closed and not reopened by anyone: the next RPC dials the service again, as connection(service:) would.
            manager.closeConnection(service: "echo")
            #expect(try await echo.get(Self.request("third")).text == "third")
            // The channel closed by its own close(): the same.
            try manager.connection(service: "echo").close()
            #expect(try await echo.get(Self.request("fourth")).text == "fourth")
            // A closed manager dials nothing: the RPC fails UNAVAILABLE.
            await manager.close(gracePeriod: .seconds(1))
            let refused = await #expect(throws: GRPCCore.RPCError.self) { try await echo.get(Self.request("after")) }
            #expect(refused?.code == .unavailable, "\(String(describing: refused))")
        }
    }

    @Test("graceful shutdown lets open streams finish and refuses new ones", arguments: [Peer.grpcio])
    func gracefulShutdown(_ peer: Peer) async throws {
        let python = try PythonPeer()
        defer { python.stop() }
        let manager = try ConnectionManager()
        let transport = try ManagedClientTransport(manager: manager, service: "echo", address: python.target)
        try await withThrowingDiscardingTaskGroup { group in
            let client = GRPCClient(transport: transport)
            group.addTask { try await client.runConnections() }
            let echo = Echo_Echo.Client(wrapping: client)
            let (opened, opener) = AsyncStream<Void>.makeStream()
            let (proceed, proceeder) = AsyncStream<Void>.makeStream()
            group.addTask {
                let texts = try await echo.update { writer in
                    try await writer.write(Self.request("before"))
                    opener.yield()
                    var wait = proceed.makeAsyncIterator()
                    _ = await wait.next()
                    try await writer.write(Self.request("after"))
                } onResponse: { response in
                    var texts: [String] = []
                    for try await message in response.messages { texts.append(message.text) }
                    return texts
                }
                #expect(texts == ["before", "after"])
            }
            var openedIterator = opened.makeAsyncIterator()
            _ = await openedIterator.next()
            // GRPCClient shuts down only once runConnections() runs (it calls the transport's connect()).
            #expect(await eventually(timeout: 5) { transport.connectCalled })
            client.beginGracefulShutdown()
            // New streams are refused by the transport while the open one is still running.
            do {
                _ = try await transport.withStream(descriptor: Echo_Echo.Method.Get.descriptor, options: .defaults) { _, _ in 0 }
                Issue.record("a stream opened after beginGracefulShutdown")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .failedPrecondition)
            }
            // connect() runs once: a second call is refused at once instead of waiting for nothing.
            await #expect(throws: GRPCCore.RPCError.self) { try await transport.connect() }
            proceeder.yield()
            // The group ends only when runConnections returns: once the open stream has drained.
        }
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("cancelling the task that reads a stream ends the RPC with CANCELLED (GRPCCore abandons a hedge so)")
    func readerTaskCancellationEndsTheRPC() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let transport = ManagedClientTransport(channel: try fixture.channel())
        let started = ContinuousClock.now
        let status = try await transport.withStream(
            descriptor: MethodDescriptor(fullyQualifiedService: "echo.Echo", method: "Get"), options: .defaults
        ) { stream, _ -> GRPCCore.Status? in
            // A server that would answer in 10 s.
            try await stream.outbound.write(.metadata(["x-sleep-ms": "10000", "x-request-key": "abandoned"]))
            try await stream.outbound.write(.message([1]))
            await stream.outbound.finish()
            let reader = Task { () -> GRPCCore.Status? in
                for try await part in stream.inbound {
                    if case .status(let status, _) = part { return status }
                }
                return nil
            }
            #expect(await eventually { fixture.server.requestCount(key: "abandoned") == 1 })
            reader.cancel()
            return try await reader.value
        }
        #expect(status?.code == .cancelled, "\(String(describing: status))")
        #expect(ContinuousClock.now - started < .seconds(5), "the reader did not wait for the server")
    }

    @Test("a cancelled task that writes the requests cancels the RPC: its writes and finish() do not half-close it")
    func writerTaskCancellationEndsTheRPC() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let transport = ManagedClientTransport(channel: try fixture.channel())
        let status = try await transport.withStream(
            descriptor: MethodDescriptor(fullyQualifiedService: "echo.Echo", method: "Collect"), options: .defaults
        ) { stream, _ -> GRPCCore.Status? in
            try await stream.outbound.write(.metadata(["x-request-key": "cut-short"]))
            try await stream.outbound.write(.message(Array("part".utf8)))
            // The producer's task is cancelled; it writes once more, then finishes, as GRPCCore's request task does
            // when a producer that loops over an AsyncStream returns early for its cancellation.
            let writer = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                let refused = await #expect(throws: GRPCCore.RPCError.self) {
                    try await stream.outbound.write(.message(Array("more".utf8)))
                }
                #expect(refused?.code == .cancelled)
                await stream.outbound.finish()
            }
            await writer.value
            for try await part in stream.inbound {
                if case .status(let status, _) = part { return status }
            }
            return nil
        }
        // Not OK with "part" alone: the server never saw the requests end.
        #expect(status?.code == .cancelled, "\(String(describing: status))")
    }

    @Test("ClientContext's remote peer is written as GRPCCore describes one: ipv4:, ipv6:, unix:, or the name")
    func remotePeerDescriptions() throws {
        let cases = [
            ("127.0.0.1:50051", "ipv4:127.0.0.1:50051"), ("[::1]:443", "ipv6:[::1]:443"),
            ("unix:/tmp/s.sock", "unix:/tmp/s.sock"), ("api.example.com:443", "dns:api.example.com:443"),
            ("etcd:///users", "etcd:///users"),
        ]
        for (target, peer) in cases {
            #expect(ManagedClientTransport.peer(try Target(parsing: target)) == peer, "\(target)")
        }
    }

    /// An interceptor that holds the call until `release` (or 10 s), saying when it began.
    final class Holding: CallInterceptor {
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let left = Atomic<Bool>(false)
        func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
            self.entered.signal()
            _ = self.release.wait(timeout: .now() + 10)
            self.left.store(true, ordering: .releasing)
            return .proceed
        }
    }

    @Test("cancelling a stream whose interceptors are still at work does not wait for them; the call ends CANCELLED")
    func cancelDoesNotWaitForInterceptors() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let holding = Holding()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: .defaults,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), metricsFactory: nil,
            interceptors: [holding], loops: [fixture.loop.reactor])
        defer { channel.close() }
        let stream = TransportStream(channel: channel, path: "/echo.Echo/Get", options: .defaults)
        let starter = Thread { try? stream.start([:]) }
        starter.start()
        #expect(holding.entered.wait(timeout: .now() + 10) == .success)
        stream.cancel()
        // cancel() came back while the interceptor still held the call (before, it waited for it under the lock).
        let heldStill = !holding.left.load(ordering: .acquiring)
        holding.release.signal()
        #expect(heldStill)
        var parts: [ResponsePart] = []
        while true {
            let part = await stream.buffers.nextPart()
            parts.append(part)
            if case .end = part { break }
        }
        guard case .end(let result) = parts.last else { return }
        #expect(result.status.code == .cancelled, "\(result.status)")
    }

    @Test("CallOptions: message size limits both ways, and fail-fast vs wait-for-ready", arguments: [Peer.embedded])
    func callOptions(_ peer: Peer) async throws {
        try await Self.withEchoClient(peer) { echo, _ in
            var options = GRPCCore.CallOptions.defaults
            options.maxRequestMessageBytes = 100
            do {
                _ = try await echo.get(Self.request(String(repeating: "x", count: 200)), options: options)
                Issue.record("a request over maxRequestMessageBytes was sent")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .resourceExhausted)
            }
            options = .defaults
            options.maxResponseMessageBytes = 100
            do {
                _ = try await echo.get(Self.request(""), metadata: ["x-response-bytes": "500"], options: options)
                Issue.record("a response over maxResponseMessageBytes was accepted")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .resourceExhausted)
            }
        }
        // Nothing listens on this port: fail-fast fails at once with UNAVAILABLE; wait-for-ready waits until its
        // deadline.
        let manager = try ConnectionManager()
        let transport = try ManagedClientTransport(
            manager: manager, service: "nowhere", address: "127.0.0.1:\(freePort())")
        try await withGRPCClient(transport: transport) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            var options = GRPCCore.CallOptions.defaults
            options.timeout = .seconds(2)
            options.waitForReady = false
            let started = now()
            do {
                _ = try await echo.get(Self.request("a"), options: options)
                Issue.record("a call to a closed port succeeded")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .unavailable)
            }
            #expect(now() - started < 1.5)
            options.waitForReady = true
            options.timeout = .milliseconds(300)
            do {
                _ = try await echo.get(Self.request("a"), options: options)
                Issue.record("a call to a closed port succeeded")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .deadlineExceeded)
            }
        }
        await manager.close(gracePeriod: .seconds(1))
    }

    /// A manager on `fixture`'s loop whose breakers open after 3 failures in a row (and stay open a minute), with a
    /// recorder of its events.
    static func managerWithATightBreaker(_ fixture: LoopbackFixture) throws -> (ConnectionManager, EventRecorder) {
        var configuration = Configuration()
        configuration.circuitBreaker.failureThreshold = 3
        configuration.circuitBreaker.timeout = .seconds(60)
        let manager = try ConnectionManager(configuration: configuration, eventLoop: fixture.loop)
        let recorder = EventRecorder()
        manager.events.subscribe { recorder.record($0) }
        return (manager, recorder)
    }

    @Test("GRPCCore's deadline ends the call DEADLINE_EXCEEDED for the breaker and the bus, not as the caller's cancel")
    func grpcCoreDeadlineCountsAsAFailure() async throws {
        // GRPCCore's timer cancels the RPC's tasks before the call's own deadline fires (it starts a moment later):
        // taken for the caller's cancel, a server that never answered in time was never counted by the breaker.
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        /// A GRPCCore interceptor with async work before the RPC (a token fetch): it runs after GRPCCore wrote the
        /// timeout, before the request metadata reaches the transport.
        struct SlowToken: GRPCCore.ClientInterceptor {
            func intercept<Input: Sendable, Output: Sendable>(
                request: StreamingClientRequest<Input>, context: ClientContext,
                next: (StreamingClientRequest<Input>, ClientContext) async throws -> StreamingClientResponse<Output>
            ) async throws -> StreamingClientResponse<Output> {
                try await Task.sleep(for: .milliseconds(50))
                return try await next(request, context)
            }
        }
        let (manager, recorder) = try Self.managerWithATightBreaker(fixture)
        let transport = try ManagedClientTransport(manager: manager, service: "echo", address: fixture.target)
        try await withGRPCClient(transport: transport, interceptors: [SlowToken()]) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            var options = GRPCCore.CallOptions.defaults
            options.timeout = .milliseconds(200)
            for _ in 0..<3 {
                do {
                    _ = try await echo.get(Self.request("slow"), metadata: ["x-sleep-ms": "2000"], options: options)
                    Issue.record("expected DEADLINE_EXCEEDED")
                } catch let error as GRPCCore.RPCError {
                    #expect(error.code == .deadlineExceeded)
                }
            }
            do {
                _ = try await echo.get(Self.request("refused"))
                Issue.record("three timeouts did not open the breaker")
            } catch let error as GRPCCore.RPCError {
                #expect(error.message == "circuit breaker is open")
            }
        }
        #expect(await eventually { recorder.count { if case .callFinished = $0 { true } else { false } } == 4 })
        let codes = recorder.all.compactMap { event -> StatusCode? in
            if case .callFinished(_, _, let status, _, _, _, _) = event { return status.code }
            return nil
        }
        #expect(codes == [.deadlineExceeded, .deadlineExceeded, .deadlineExceeded, .unavailable])
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a stream asked for after the shutdown began fails without dialling the manager's closed service again")
    func streamAfterShutdownDialsNothing() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let manager = try ConnectionManager(eventLoop: fixture.loop)
        let transport = try ManagedClientTransport(manager: manager, service: "echo", address: fixture.target)
        manager.closeConnection(service: "echo")
        transport.beginGracefulShutdown()
        do {
            _ = try await transport.withStream(descriptor: Echo_Echo.Method.Get.descriptor, options: .defaults) { _, _ in 0 }
            Issue.record("a stream opened on a transport shutting down")
        } catch let error as GRPCCore.RPCError {
            #expect(error.code == .failedPrecondition)
        }
        #expect(manager.connectionCount == 0, "a late attempt (a GRPCCore retry, say) registered and dialled the service again")
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("the bus, and so metrics, logging and the circuit breaker, see every RPC of the transport")
    func handlersSeeTransportCalls() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, recorder) = try Self.managerWithATightBreaker(fixture)
        let transport = try ManagedClientTransport(manager: manager, service: "echo", address: fixture.target)
        try await withGRPCClient(transport: transport) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            _ = try await echo.get(Self.request("counted"))
            try await echo.expand(Self.request("a b")) { response in for try await _ in response.messages {} }
            // Three UNAVAILABLE answers open the breaker; the fourth RPC is refused without a network call.
            for _ in 0..<3 {
                await #expect(throws: GRPCCore.RPCError.self) {
                    _ = try await echo.get(Self.request("x"), metadata: ["x-fail-code": "14"])
                }
            }
            do {
                _ = try await echo.get(Self.request("refused"))
                Issue.record("the open breaker let a call through")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .unavailable)
                #expect(error.message == "circuit breaker is open")
            }
        }
        let finished = await eventually {
            recorder.all.filter { if case .callFinished = $0 { return true } else { return false } }.count == 6
        }
        #expect(finished)
        let paths = recorder.all.compactMap { event -> String? in
            if case .callFinished(_, let path, _, _, _, _, _) = event { return path }
            return nil
        }
        #expect(paths.prefix(2) == ["/echo.Echo/Get", "/echo.Echo/Expand"])
        #expect(recorder.story.contains("breaker:CLOSED>OPEN"))
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("an open breaker's refusal is not retried by GRPCCore (it says so in its trailers); server failures still are")
    func breakerRefusalIsNotRetriedByGRPCCore() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let (manager, recorder) = try Self.managerWithATightBreaker(fixture)
        var config = ServiceConfig()
        let policy = RetryPolicy(
            maxAttempts: 4, initialBackoff: .milliseconds(10), maxBackoff: .milliseconds(50), backoffMultiplier: 2,
            retryableStatusCodes: [.unavailable])
        config.methodConfig = [
            MethodConfig(names: [MethodConfig.Name(service: "echo.Echo")], executionPolicy: .retry(policy))
        ]
        let transport = try ManagedClientTransport(
            manager: manager, service: "echo", address: fixture.target, serviceConfig: config)
        let started = { recorder.count { if case .callStarted = $0 { true } else { false } } }
        try await withGRPCClient(transport: transport) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            // A server failure is retried by GRPCCore: two UNAVAILABLE answers, then the echo (three of our calls).
            let metadata: GRPCCore.Metadata = ["x-fail-first": "2", "x-request-key": "before-open"]
            _ = try await echo.get(Self.request("retried"), metadata: metadata)
            #expect(started() == 3)
            // Each of these is answered UNAVAILABLE four times (GRPCCore's attempts); the third answer opens the
            // breaker, which refuses the fourth attempt.
            await #expect(throws: GRPCCore.RPCError.self) {
                _ = try await echo.get(Self.request("x"), metadata: ["x-fail-code": "14"])
            }
            #expect(await eventually { recorder.story.contains("breaker:CLOSED>OPEN") })
            let before = started()
            do {
                _ = try await echo.get(Self.request("refused"))
                Issue.record("the open breaker let a call through")
            } catch let error as GRPCCore.RPCError {
                #expect(error.code == .unavailable && error.message == "circuit breaker is open")
                #expect(Array(error.metadata[stringValues: "grpc-retry-pushback-ms"]) == ["-1"])
            }
            // One of our calls: GRPCCore did not make three more attempts against the open breaker.
            #expect(started() == before + 1, "calls: \(started() - before)")
        }
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("CallOptions' message limits replace the configuration's both ways: larger ones too")
    func callOptionsRaiseLimits() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.maxMessageSize = 1000
        let transport = ManagedClientTransport(channel: try fixture.channel(configuration))
        try await withGRPCClient(transport: transport) { client in
            let echo = Echo_Echo.Client(wrapping: client)
            var options = GRPCCore.CallOptions.defaults
            options.maxRequestMessageBytes = 5000
            options.maxResponseMessageBytes = 5000
            let text = String(repeating: "x", count: 2000)
            let answer = try await echo.get(Self.request(text), options: options)
            #expect(answer.text == text)
        }
    }

    @Test("config(forMethod:) picks the method's entry, else the service's, else the default; the throttle follows the config")
    func methodConfigLookup() throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var config = ServiceConfig()
        config.methodConfig = [
            MethodConfig(names: [MethodConfig.Name(service: "")], timeout: .seconds(1)),
            MethodConfig(names: [MethodConfig.Name(service: "echo.Echo")], timeout: .seconds(2)),
            MethodConfig(names: [MethodConfig.Name(service: "echo.Echo", method: "Get")], timeout: .seconds(3)),
        ]
        config.retryThrottling = try ServiceConfig.RetryThrottling(maxTokens: 10, tokenRatio: 0.1)
        let transport = ManagedClientTransport(channel: try fixture.channel(), serviceConfig: config)
        #expect(transport.config(forMethod: Echo_Echo.Method.Get.descriptor)?.timeout == .seconds(3))
        #expect(transport.config(forMethod: Echo_Echo.Method.Expand.descriptor)?.timeout == .seconds(2))
        let other = MethodDescriptor(fullyQualifiedService: "other.Service", method: "Call")
        #expect(transport.config(forMethod: other)?.timeout == .seconds(1))
        #expect(transport.retryThrottle != nil)
        let plain = ManagedClientTransport(channel: try fixture.channel())
        #expect(plain.config(forMethod: Echo_Echo.Method.Get.descriptor) == nil)
        #expect(plain.retryThrottle == nil)
        // As GRPCCore reads a service config: a later entry for the same name wins.
        var repeated = ServiceConfig()
        repeated.methodConfig = [
            MethodConfig(names: [MethodConfig.Name(service: "echo.Echo")], timeout: .seconds(2)),
            MethodConfig(names: [MethodConfig.Name(service: "echo.Echo")], timeout: .seconds(4)),
        ]
        let later = ManagedClientTransport(channel: try fixture.channel(), serviceConfig: repeated)
        #expect(later.config(forMethod: Echo_Echo.Method.Get.descriptor)?.timeout == .seconds(4))
        #expect(later.config(forMethod: other) == nil)
    }

    @Test("bad request metadata fails the RPC with INVALID_ARGUMENT before anything is sent")
    func badMetadata() async throws {
        try await Self.withEchoClient(.embedded) { echo, _ in
            let notBase64: GRPCCore.Metadata = ["x-data-bin": "not base64!"]
            for metadata: GRPCCore.Metadata in [["bad key": "v"], ["x-text": "line\nbreak"], ["te": "gzip"], notBase64] {
                do {
                    _ = try await echo.get(Self.request("a"), metadata: metadata)
                    Issue.record("metadata \(metadata) was sent")
                } catch let error as GRPCCore.RPCError {
                    #expect(error.code == .invalidArgument)
                }
            }
            // The connection is unharmed.
            #expect(try await echo.get(Self.request("after")).text == "after")
        }
    }

    @Test("GRPCCore retries when its service config says so; our retry handler stays out", arguments: [Peer.embedded])
    func retriesBelongToGRPCCore(_ peer: Peer) async throws {
        var config = ServiceConfig()
        let policy = RetryPolicy(
            maxAttempts: 3, initialBackoff: .milliseconds(10), maxBackoff: .milliseconds(50), backoffMultiplier: 2,
            retryableStatusCodes: [.unavailable])
        config.methodConfig = [
            MethodConfig(names: [MethodConfig.Name(service: "echo.Echo")], executionPolicy: .retry(policy))
        ]
        try await Self.withEchoClient(peer, serviceConfig: config) { echo, _ in
            // The embedded server fails the first two attempts of this key with UNAVAILABLE.
            let metadata: GRPCCore.Metadata = ["x-fail-first": "2", "x-request-key": "core-retry"]
            let reply = try await echo.get(Self.request("third time"), metadata: metadata) { response in
                try response.accepted.get().metadata
            }
            // GRPCCore made the three attempts (it adds its count to the response metadata it hands back; 2.4 does
            // not send it to the server).
            #expect(Array(reply[stringValues: "grpc-previous-rpc-attempts"]) == ["2"])
        }
    }
}

extension GRPCChannel {
    /// Calls open or queued in the channel (reactor-side count, read on the reactor).
    func openCalls(_ pool: ServicePool) async -> Int {
        await withCheckedContinuation { continuation in
            self.reactor.execute { continuation.resume(returning: pool.openCallCount) }
        }
    }
}
