import Foundation
@testable import GRPCConnectionManagerTracing
import InMemoryTracing
import Synchronization
import Testing
import Tracing

@testable import GRPCConnectionManager

/// The in-memory tracer, propagating as W3C Trace Context does (`traceparent: 00-<trace>-<span>-01`), so tests see
/// the header a real tracer (swift-otel) writes.
struct W3CInMemoryTracer: Tracer {
    let base = InMemoryTracer()

    func startSpan<Instant: TracerInstant>(
        _ operationName: String, context: @autoclosure () -> ServiceContext, ofKind kind: SpanKind,
        at instant: @autoclosure () -> Instant, function: String, file fileID: String, line: UInt
    ) -> InMemorySpan {
        self.base.startSpan(
            operationName, context: context(), ofKind: kind, at: instant(), function: function, file: fileID, line: line)
    }

    func activeSpan(identifiedBy context: ServiceContext) -> InMemorySpan? { self.base.activeSpan(identifiedBy: context) }
    func forceFlush() {}
    func extract<Carrier, Extract: Extractor>(_ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract)
    where Extract.Carrier == Carrier {}

    func inject<Carrier, Inject: Injector>(_ context: ServiceContext, into carrier: inout Carrier, using injector: Inject)
    where Inject.Carrier == Carrier {
        guard let span = context.inMemorySpanContext else { return }
        func hex(_ id: String, _ width: Int) -> String {
            let digits = Array(id.utf8.map { String(format: "%02x", $0) }.joined().suffix(width))
            return String(repeating: "0", count: width - digits.count) + String(digits)
        }
        injector.inject("00-\(hex(span.traceID, 32))-\(hex(span.spanID, 16))-01", forKey: "traceparent", into: &carrier)
        self.base.inject(context, into: &carrier, using: injector)
    }
}

@Suite("Tracing", .serialized)
struct TracingTests {
    static func plain() -> Configuration {
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.enableRetry = false
        return configuration
    }

    static func span(_ tracer: W3CInMemoryTracer, _ name: String) -> FinishedInMemorySpan? {
        tracer.base.finishedSpans.first { $0.operationName == name }
    }

    @Test("a client span per call: the caller's context is its parent, rpc.* attributes, the context propagated")
    func clientSpan() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tracer = W3CInMemoryTracer()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [TracingInterceptor(tracer: tracer)],
            eventLoop: fixture.loop)
        let response = try await tracer.withSpan("checkout") { _ in
            try await channel.unary(path: "/echo.Echo/Get", request: [1])
        }
        let parent = try #require(Self.span(tracer, "checkout"))
        let span = try #require(Self.span(tracer, "echo.Echo/Get"))
        #expect(span.kind == .client)
        #expect(span.traceID == parent.traceID)
        #expect(span.parentSpanID == parent.spanID)
        #expect(span.attributes["rpc.system"]?.toSpanAttribute() == .string("grpc"))
        #expect(span.attributes["rpc.service"]?.toSpanAttribute() == .string("echo.Echo"))
        #expect(span.attributes["rpc.method"]?.toSpanAttribute() == .string("Get"))
        #expect(span.attributes["server.address"]?.toSpanAttribute() == .string("127.0.0.1"))
        #expect(span.attributes["server.port"] != nil)
        #expect(span.attributes["rpc.grpc.status_code"]?.toSpanAttribute() == .int64(0))
        #expect(span.status == nil)
        // The server received the client span's context (not the parent's): the echo server sends metadata back.
        #expect(response.initialMetadata[InMemoryTracer.spanIDKey] == span.spanID)
        #expect(response.initialMetadata[InMemoryTracer.traceIDKey] == span.traceID)
        let traceparent = try #require(response.initialMetadata["traceparent"])
        #expect(traceparent.hasPrefix("00-") && traceparent.hasSuffix("-01"))
        #expect(traceparent.split(separator: "-").map(\.count) == [2, 32, 16, 2])
    }

    @Test("what an instrument injects never fails the call: capitals lower-cased, -bin taken as base64, the unsendable left out")
    func injectedFieldsAlwaysValidate() throws {
        // Metadata that fails validation fails the call (INVALID_ARGUMENT): a B3 propagator's X-B3-TraceId did so
        // for every traced call.
        var metadata: CallMetadata = ["x-app": "1"]
        let injector = MetadataInjector()
        for (key, value) in [
            ("X-B3-TraceId", "463ac35c9f6413ad"), ("x-trace-bin", "AAEC"), ("x-bad-bin", "not base64!"),
            ("baggage", "user=é"), ("te", "gzip"), ("bad key", "v"), ("traceparent", "00-1-2-01"),
            ("traceparent", "00-3-4-01"),
        ] {
            injector.inject(value, forKey: key, into: &metadata)
        }
        #expect(throws: Never.self) { try metadata.validate() }
        #expect(metadata["x-b3-traceid"] == "463ac35c9f6413ad")
        #expect(metadata.values(for: "x-trace-bin") == [.binary([0, 1, 2])])
        #expect(metadata["traceparent"] == "00-3-4-01", "one value per key, the last")
        #expect(metadata.count == 4, "x-app, x-b3-traceid, x-trace-bin, traceparent: \(metadata)")
    }

    @Test("the context is the one at call start, even for a callback call that completes later on the loop")
    func contextCapturedAtStart() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let tracer = W3CInMemoryTracer()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: Self.plain(), interceptors: [TracingInterceptor(tracer: tracer)],
            eventLoop: fixture.loop)
        let done = Gate()
        tracer.withSpan("request") { _ in
            channel.unary(path: "/echo.Echo/Slow", request: [1], metadata: ["x-sleep-ms": "50"]) { _ in
                // Started from the loop thread, where no task-local context exists: a root span.
                channel.unary(path: "/echo.Echo/Next", request: [2]) { _ in done.open() }
            }
        }
        await done.wait()
        #expect(await eventually { tracer.base.finishedSpans.count == 3 })
        let parent = try #require(Self.span(tracer, "request"))
        #expect(Self.span(tracer, "echo.Echo/Slow")?.parentSpanID == parent.spanID)
        #expect(Self.span(tracer, "echo.Echo/Next")?.parentSpanID == nil)
    }

    @Test("retries are events on the span; a failed call sets the error status and the status code")
    func retriesAndFailures() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Self.plain()
        configuration.enableRetry = true
        configuration.retry.policy.initialBackoff = .milliseconds(1)
        let tracer = W3CInMemoryTracer()
        let channel = try GRPCChannel(
            target: fixture.target, configuration: configuration, interceptors: [TracingInterceptor(tracer: tracer)],
            eventLoop: fixture.loop)
        _ = try await channel.unary(
            path: "/echo.Echo/Retried", request: [1], metadata: ["x-fail-first": "2", "x-request-key": "traced"])
        let retried = try #require(Self.span(tracer, "echo.Echo/Retried"))
        #expect(retried.events.map(\.name) == ["grpc.retry", "grpc.retry"])
        #expect(retried.events.first?.attributes["grpc.attempt"]?.toSpanAttribute() == .int64(1))
        #expect(retried.events.first?.attributes["rpc.grpc.status_code"]?.toSpanAttribute() == .int64(14))
        #expect(retried.status == nil)

        let failed = await channel.unaryResult(path: "/echo.Echo/Failed", request: [1], metadata: ["x-fail-code": "5", "x-fail-message": "gone"])
        #expect(failed.status.code == .notFound)
        let span = try #require(Self.span(tracer, "echo.Echo/Failed"))
        #expect(span.attributes["rpc.grpc.status_code"]?.toSpanAttribute() == .int64(5))
        #expect(span.status?.code == .error)
        #expect(span.status?.message == "NOT_FOUND: gone")
    }

    @Test("with no tracing backend (NoOpTracer) there is no span to end: no observer joins the call")
    func noBackendNoObserver() async throws {
        var call = InterceptedCall(
            service: "echo", authority: "127.0.0.1:1", path: "/echo.Echo/Get", metadata: [:], options: RequestOptions())
        let decision = TracingInterceptor(tracer: NoOpTracer()).intercept(&call)
        #expect(decision.observer == nil)
        #expect(call.metadata.isEmpty, "a no-op tracer propagates nothing")
        let traced = TracingInterceptor(tracer: W3CInMemoryTracer()).intercept(&call)
        #expect(traced.observer != nil)
        #expect(call.metadata["traceparent"] != nil)
        traced.observer?.callFinished(UnaryResponse(status: .ok))  // ends the span (else it stays open, and leaks)
    }

    @Test("host and port of the authority, IPv6 included")
    func authority() {
        #expect(TracingInterceptor.hostAndPort("example.com:443") == ("example.com", 443))
        #expect(TracingInterceptor.hostAndPort("[::1]:50051") == ("::1", 50051))
        #expect(TracingInterceptor.hostAndPort("localhost") == ("localhost", nil))
    }
}
