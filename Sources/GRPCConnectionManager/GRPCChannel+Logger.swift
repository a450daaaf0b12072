import GRPCCMReactor
import GRPCCMWire
import Logging

/// Calls that log through the caller's own `Logger`, as AsyncHTTPClient's requests do: the request ids and whatever
/// else the caller's logger carries end up in the call's records.
///
/// The work of a call runs on the reactor thread, where the caller's task-locals (a `Logger.MetadataProvider` reading
/// a `ServiceContext`, say) are gone, so the logger is resolved when the call starts, on the caller's thread: its
/// metadata plus what its provider returns then. "call started" is logged at once and "call finished" (code, message,
/// duration) when the call ends, both at debug. Calls without a `logger:` cost nothing of this.
extension GRPCChannel {
    /// Starts a unary call whose records go to `logger` (see the extension's note); otherwise as
    /// `unary(path:request:metadata:options:completion:)`.
    @discardableResult
    public func unary(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions(),
        logger: Logger, completion: @escaping @Sendable (UnaryResponse) -> Void
    ) -> CallHandle {
        // Above debug there is nothing to record: no logger copy, no provider call, no closure around the completion.
        guard logger.logLevel <= .debug else {
            return self.start(path: path, request: request, metadata: metadata, options: options, completion: completion)
        }
        let callLogger = Self.resolved(logger, service: self.service, path: path, target: self.target.description)
        callLogger.debug("call started")
        let started = Reactor.clock()
        return self.start(path: path, request: request, metadata: metadata, options: options) { response in
            let elapsed = Double(Reactor.clock() &- started) / 1e6
            callLogger.debug(
                "call finished",
                metadata: [
                    "grpc.code": "\(response.status.code)", "grpc.message": "\(response.status.message)",
                    "grpc.duration_ms": "\(elapsed)",
                ])
            completion(response)
        }
    }

    /// A unary call whose records go to `logger` (see the extension's note); otherwise as
    /// `unary(path:request:metadata:options:)`: returns the response, throws the call's `CallError`.
    public func unary(
        path: String, request: [UInt8], metadata: CallMetadata = CallMetadata(), options: RequestOptions = RequestOptions(),
        logger: Logger
    ) async throws(CallError) -> UnaryResponse {
        let response = await Self.awaitCall { completion in
            self.unary(path: path, request: request, metadata: metadata, options: options, logger: logger, completion: completion)
        }
        return try response.get()
    }

    /// `logger` with its provider's metadata taken now (on the caller's thread) and the call's own fields added.
    static func resolved(_ logger: Logger, service: String, path: String, target: String) -> Logger {
        var resolved = logger
        if let provider = logger.metadataProvider {
            for (key, value) in provider.get() where resolved[metadataKey: key] == nil {
                resolved[metadataKey: key] = value
            }
            // Taken now; the handler must not ask again on the reactor thread (where the answer would be wrong). A
            // handler that ignores this still gives the values set above precedence over its provider's.
            resolved.handler.metadataProvider = nil
        }
        resolved[metadataKey: "grpc.service"] = "\(service)"
        resolved[metadataKey: "grpc.method"] = "\(path)"
        resolved[metadataKey: "grpc.target"] = "\(target)"
        return resolved
    }
}
