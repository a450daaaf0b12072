import GRPCCMCalls
import GRPCCMWire

extension GRPCChannel {
    /// The shortest wait `watchHealth` keeps between checks or reopened watches.
    static let shortestPollInterval = Duration.milliseconds(10)

    /// Health changes of the server (or of `healthServiceName` on it), each new status once.
    ///
    /// Streams `grpc.health.v1.Health/Watch` (server streaming): the server sends the current status, then every
    /// change. If the server answers UNIMPLEMENTED, falls back to calling `Check` every `pollInterval` (a failed
    /// check yields `.unknown`). A Watch that ends or fails otherwise yields `.unknown` (nothing watches until it
    /// reopens) and is reopened after `pollInterval`, as gRFC A17 does. The stream ends when the consumer stops
    /// iterating, or once the channel is closed (or its loop stopped). A `pollInterval` under 10 ms is taken as 10 ms: zero
    /// would poll (or reopen) as fast as calls can fail; one over a day as a day. A consumer slower than the changes gets the latest status
    /// when it asks next (the ones in between are dropped): a server that flaps cannot fill memory with them, and a
    /// flap the consumer did not see (SERVING, NOT_SERVING, SERVING) is no change to it.
    public func watchHealth(_ healthServiceName: String = "", pollInterval: Duration = .seconds(5)) -> AsyncStream<HealthStatus> {
        Self.watchHealth(healthServiceName, pollInterval: pollInterval) { self }
    }

    /// `watchHealth` over the channel `current` gives each time the watch (re)opens or polls: a manager's service
    /// follows the channel that serves it now (a new one after an address change). nil ends the stream.
    static func watchHealth(
        _ healthServiceName: String, pollInterval: Duration, current: @escaping @Sendable () -> GRPCChannel?
    ) -> AsyncStream<HealthStatus> {
        // At most a day: a Duration past Int64's seconds (`.seconds(.max)`, "never poll") traps in the clock's sleep.
        let pollInterval = min(max(pollInterval, Self.shortestPollInterval), .seconds(86_400))
        return Self.changesAsDelivered(Self.healthUpdates(healthServiceName, pollInterval: pollInterval, current: current))
    }

    /// `source` without an element equal to the one the consumer took before it. Compared as the consumer takes
    /// it: `source` keeps only its newest element, so a change and its reversal, both unread, leave a repeat there.
    static func changesAsDelivered(_ source: AsyncStream<HealthStatus>) -> AsyncStream<HealthStatus> {
        let reader = HealthChangeReader(source)
        // Dropping the stream drops the reader and `source`'s iterator with it, which ends `source` (its
        // onTermination runs).
        return AsyncStream(unfolding: {
            while let next = await reader.iterator.next() {
                if next != reader.last {
                    reader.last = next
                    return next
                }
            }
            return nil
        })
    }

    /// Every status the Watch (or the polled Check) reports, repeats left out, the newest kept for the consumer.
    private static func healthUpdates(
        _ healthServiceName: String, pollInterval: Duration, current: @escaping @Sendable () -> GRPCChannel?
    ) -> AsyncStream<HealthStatus> {
        AsyncStream(bufferingPolicy: .bufferingNewest(1)) { continuation in
            let task = Task {
                var last: HealthStatus?
                func emit(_ status: HealthStatus) {
                    if status != last {
                        continuation.yield(status)
                        last = status
                    }
                }
                var watchSupported = true
                var watching: GRPCChannel?
                while !Task.isCancelled, let channel = current() {
                    // Another channel (the service moved): its server may have the Watch the last one had not.
                    if channel !== watching {
                        watching = channel
                        watchSupported = true
                    }
                    if watchSupported {
                        // Bounded too (this task reads it at once, unless the scheduler is slow): the last update
                        // yielded, the stream's end, is never the one dropped.
                        let (updates, feed) = AsyncStream<WatchUpdate>.makeStream(bufferingPolicy: .bufferingNewest(16))
                        // Ended by a graceful close as it begins: a watch never ends of itself, and the close would
                        // wait its whole grace period for it.
                        let handle = channel.start(
                            path: HealthProto.watchPath, request: HealthProto.encodeRequest(service: healthServiceName),
                            metadata: CallMetadata(), options: RequestOptions(),
                            delivery: .callbacks(
                                StreamingCallbacks(
                                    onMessage: { feed.yield(.status(HealthProto.decodeResponse($0) ?? .unknown)) },
                                    onFinish: { _ in })),
                            endsWhenClosing: true,
                            completion: { response in
                                feed.yield(.ended(response.status))
                                feed.finish()
                            })
                        var ended = CallStatus(code: .cancelled)
                        await withTaskCancellationHandler {
                            for await update in updates {
                                switch update {
                                case .status(let status): emit(status)
                                case .ended(let status): ended = status
                                }
                            }
                        } onCancel: {
                            handle.cancel()
                        }
                        if ended.code == .unimplemented {
                            watchSupported = false
                            continue
                        }
                        // Ended, even with OK: nothing watches until it reopens, so what was last said is no longer
                        // known (grpc-go's health client takes any end, EOF included, as a failure).
                        if !Task.isCancelled { emit(.unknown) }
                    } else {
                        emit(await Self.polledHealth(channel, healthServiceName, timeout: pollInterval))
                    }
                    // A closed channel (or a stopped loop) will not answer again: the stream ends, rather than say
                    // UNKNOWN once and then nothing for ever; unless `current` has another channel now, watched at once.
                    if await channel.connectivity().state == .shutdown {
                        guard let next = current(), next !== channel else { break }
                        continue
                    }
                    try? await Task.sleep(for: pollInterval)
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    private enum WatchUpdate: Sendable {
        case status(HealthStatus)
        case ended(CallStatus)
    }

    /// Calls `grpc.health.v1.Health/Check` for `healthServiceName` ("" = the whole server), with `metadata` (an
    /// authorization header, say).
    /// - Throws: `CallError` with the call's status when it is not OK, or INTERNAL for an unreadable answer.
    public func checkHealth(
        _ healthServiceName: String = "", metadata: CallMetadata = CallMetadata(), timeout: Duration = .seconds(5)
    ) async throws -> HealthStatus {
        let response = try await self.unary(
            path: HealthProto.checkPath, request: HealthProto.encodeRequest(service: healthServiceName),
            metadata: metadata, options: RequestOptions(timeout: timeout))
        guard let status = HealthProto.decodeResponse(response.message) else {
            throw CallError(status: CallStatus(code: .internal, message: "malformed HealthCheckResponse"))
        }
        return status
    }

    /// One poll of a watch on a server without Watch: Check's answer; a name it does not know (NOT_FOUND) is
    /// SERVICE_UNKNOWN, as Watch says it; any other failure UNKNOWN.
    fileprivate static func polledHealth(_ channel: GRPCChannel, _ healthServiceName: String, timeout: Duration) async
        -> HealthStatus
    {
        do {
            return try await channel.checkHealth(healthServiceName, timeout: timeout)
        } catch let error as CallError where error.status.code == .notFound {
            return .serviceUnknown
        } catch {
            return .unknown
        }
    }
}

/// `watchHealth`'s consumer side: the status last delivered. `@unchecked Sendable`: used only by the stream's one
/// consumer, one `next()` at a time (AsyncStream's rule).
private final class HealthChangeReader: @unchecked Sendable {
    var iterator: AsyncStream<HealthStatus>.Iterator
    var last: HealthStatus?

    init(_ source: AsyncStream<HealthStatus>) {
        self.iterator = source.makeAsyncIterator()
    }
}
