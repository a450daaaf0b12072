import GRPCCMWire
import GRPCConnectionManager
import Tracing

/// A client span for every call, through swift-distributed-tracing: give it to a channel or a manager
/// (`interceptors: [TracingInterceptor()]`) and bootstrap the tracer you use (swift-otel, say).
///
/// The span's parent is the caller's `ServiceContext`, captured when the call starts, on the caller's thread: the
/// call itself runs on the loop thread, where no task-local context exists. The span's context is injected into the
/// request metadata with the tracer's propagation (a W3C `traceparent` with swift-otel), so the server's span joins
/// the trace. Without a tracer of its own it injects through `InstrumentationSystem.instrument`, so every
/// instrument bootstrapped beside the tracer (a `MultiplexInstrument` of propagators) writes its fields too.
///
/// The span follows OpenTelemetry's RPC conventions: named `package.Service/Method`, kind client, attributes
/// `rpc.system` (`grpc`), `rpc.service`, `rpc.method`, `server.address`, `server.port` and, at the end,
/// `rpc.grpc.status_code`; a status other than OK sets the span's status to error with the status message. Each
/// attempt that is retried adds an event `grpc.retry` with its number and status code. Without interceptors a call
/// pays nothing for any of this; with this one and no tracing backend (`NoOpTracer`), it makes no span and adds no
/// observer, only the propagation fields of whatever instrument is bootstrapped.
public struct TracingInterceptor: CallInterceptor {
    private let tracer: (any Tracer)?

    /// - Parameter tracer: The tracer to use; nil (the default) asks `InstrumentationSystem.tracer` at each call, so
    ///   the interceptor can be made before the tracing backend is bootstrapped.
    public init(tracer: (any Tracer)? = nil) {
        self.tracer = tracer
    }

    public func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        let tracer = self.tracer ?? InstrumentationSystem.tracer
        let parent = ServiceContext.current ?? .topLevel
        if tracer is NoOpTracer {
            self.inject(parent, with: tracer, into: &call.metadata)
            return .proceed
        }
        let name = call.path.hasPrefix("/") ? String(call.path.dropFirst()) : call.path
        let span = tracer.startSpan(name, context: parent, ofKind: .client)
        if span.isRecording {
            let method = name.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
            span.attributes["rpc.system"] = "grpc"
            if method.count == 2 {
                span.attributes["rpc.service"] = String(method[0])
                span.attributes["rpc.method"] = String(method[1])
            }
            let (host, port) = Self.hostAndPort(call.authority)
            span.attributes["server.address"] = host
            if let port { span.attributes["server.port"] = port }
        }
        self.inject(span.context, with: tracer, into: &call.metadata)
        return .proceed(observer: SpanObserver(span: span))
    }

    /// The tracer given at init propagates by itself; otherwise the bootstrapped instrument does, which is the tracer
    /// or a `MultiplexInstrument` holding it beside other propagators (the tracer alone would skip those).
    private func inject(_ context: ServiceContext, with tracer: any Tracer, into metadata: inout CallMetadata) {
        if self.tracer != nil {
            tracer.inject(context, into: &metadata, using: MetadataInjector())
        } else {
            InstrumentationSystem.instrument.inject(context, into: &metadata, using: MetadataInjector())
        }
    }

    /// `host:port`, `[v6]:port` or a bare host.
    static func hostAndPort(_ authority: String) -> (String, Int?) {
        if authority.hasPrefix("["), let close = authority.firstIndex(of: "]") {
            let host = String(authority[authority.index(after: authority.startIndex)..<close])
            let rest = authority[authority.index(after: close)...]
            return (host, rest.hasPrefix(":") ? Int(rest.dropFirst()) : nil)
        }
        if let colon = authority.lastIndex(of: ":"), let port = Int(authority[authority.index(after: colon)...]) {
            return (String(authority[..<colon]), port)
        }
        return (authority, nil)
    }
}

/// Writes propagation fields into request metadata (one value per key, replacing what the caller set).
///
/// Metadata is checked before a call goes out, and a field that fails fails the call (INVALID_ARGUMENT). What an
/// instrument writes is not the application's doing: a key with capitals (B3's `X-B3-TraceId`; header names are
/// case-insensitive, and HTTP/2 sends them lower-case) is lower-cased, a `-bin` key takes its value as base64 (gRPC's
/// text form of binary metadata), and a field the call still could not send (a name with other bytes, a name gRPC
/// or HTTP/2 own, a value that is not printable ASCII) is left out rather than fail every traced call.
struct MetadataInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout CallMetadata) {
        let name = key.lowercased()
        guard (try? CallMetadata.validate(name: name)) != nil, !CallMetadata.reservedNames.contains(name) else { return }
        if name.hasSuffix("-bin") {
            guard let bytes = Base64.decode(value.utf8) else { return }
            carrier.removeAll(named: name)
            carrier.add(name, binary: bytes)
            return
        }
        guard value.utf8.allSatisfy({ $0 >= 0x20 && $0 <= 0x7E }) else { return }
        carrier.replaceOrAdd(name, value)
    }
}

/// Ends a call's span: retries as events, the status as attributes and span status.
struct SpanObserver: CallObserver {
    let span: any Span

    func attemptFinished(attempt: Int, status: CallStatus, willRetry: Bool) {
        guard willRetry else { return }
        self.span.addEvent(
            SpanEvent(
                name: "grpc.retry",
                attributes: [
                    "grpc.attempt": .int64(Int64(attempt)), "rpc.grpc.status_code": .int64(Int64(status.code.rawValue)),
                ]))
    }

    func callFinished(_ response: UnaryResponse) {
        let status = response.status
        self.span.attributes["rpc.grpc.status_code"] = status.code.rawValue
        if !status.isOK {
            self.span.setStatus(SpanStatus(code: .error, message: "\(status.code): \(status.message)"))
        }
        self.span.end()
    }
}
