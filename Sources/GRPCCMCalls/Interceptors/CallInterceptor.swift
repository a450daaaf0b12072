import GRPCCMWire

/// A hook every call of a channel passes through before it starts: it may add or change request metadata (a bearer
/// token, a tenant header, a `traceparent`), fail the call with a status, finish preparing it asynchronously, and
/// observe its attempts and its end.
///
/// Interceptors run in the order they were given. `intercept(_:)` runs on the thread that starts the call (a loop
/// thread for a call started from a completion), before anything is sent, so it must not block: work that waits (a
/// token refresh) goes in `.proceedAfter`, which runs in a task off the loop while the call's deadline runs.
///
/// ```swift
/// struct BearerToken: CallInterceptor {
///     let tokens: TokenCache  // refreshed in the background
///     func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
///         if let token = tokens.current {
///             call.metadata.replaceOrAdd("authorization", "Bearer \(token)")
///             return .proceed
///         }
///         return .proceedAfter { ["authorization": "Bearer \(try await tokens.refresh())"] }
///     }
/// }
/// ```
public protocol CallInterceptor: Sendable {
    /// Decides what happens to `call` before it starts; may change its metadata.
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision
}

/// What an interceptor sees of a call before it starts.
public struct InterceptedCall: Sendable {
    /// The service name of the channel (for a standalone channel, its target).
    public let service: String
    /// Where the call goes: `host:port` of the target (`localhost` for a Unix socket). The `:authority` header is
    /// TLS's `serverName` instead when one is set (tracing reads the dialled host and port from this).
    public let authority: String
    /// `/package.Service/Method`.
    public let path: String
    /// The request metadata, as the caller and earlier interceptors left it. Validated after the last interceptor.
    public var metadata: CallMetadata
    /// The call's options (deadline, limits, compression).
    public let options: RequestOptions

    package init(service: String, authority: String, path: String, metadata: CallMetadata, options: RequestOptions) {
        self.service = service
        self.authority = authority
        self.path = path
        self.metadata = metadata
        self.options = options
    }
}

/// What an interceptor decided about a call.
public struct CallInterceptorDecision: Sendable {
    package enum Action: Sendable {
        case proceed
        case fail(CallStatus)
        case proceedAfter(@Sendable () async throws -> CallMetadata)
    }

    package let action: Action
    package let observer: (any CallObserver)?

    /// Go on to the next interceptor, then the call.
    public static var proceed: Self { Self(action: .proceed, observer: nil) }

    /// Go on, and have `observer` hear of the call's attempts and its end.
    public static func proceed(observer: any CallObserver) -> Self { Self(action: .proceed, observer: observer) }

    /// End the call with `status` before anything is sent (its completion still runs later, never inside the call
    /// that started it). Interceptors after this one do not run; observers of earlier ones hear of the end.
    public static func fail(_ status: CallStatus) -> Self { Self(action: .fail(status), observer: nil) }

    /// Finish preparing asynchronously: `work` runs in a task, off the loop; the metadata it returns is added to the
    /// call's, then the next interceptor runs and the call starts. The call's deadline runs meanwhile (it ends
    /// DEADLINE_EXCEEDED if `work` takes too long), and a cancel ends it at once. A thrown `CallError` fails the call
    /// with its status; any other error with UNAVAILABLE naming it.
    public static func proceedAfter(
        observer: (any CallObserver)? = nil, _ work: @escaping @Sendable () async throws -> CallMetadata
    ) -> Self {
        Self(action: .proceedAfter(work), observer: observer)
    }
}

/// Hears of one call's attempts and its end, on the loop thread, in the deferred phase (never inside socket, TLS or
/// HTTP/2 processing): each attempt as it ends, then the end just before the call's completion runs. Observers hear
/// the end in the reverse order of their interceptors (the first interceptor sees the call first and its end last).
/// Must not block.
public protocol CallObserver: Sendable {
    /// Attempt `attempt` (1 = the first) ended with `status`; `willRetry`: another attempt follows (after a backoff,
    /// or at once when the server never processed this one). Calls that fail before any attempt report none.
    func attemptFinished(attempt: Int, status: CallStatus, willRetry: Bool)
    /// The call ended: its status and metadata (`response.message` is the unary response; empty for streams).
    func callFinished(_ response: UnaryResponse)
}

extension CallObserver {
    public func attemptFinished(attempt: Int, status: CallStatus, willRetry: Bool) {}
}
