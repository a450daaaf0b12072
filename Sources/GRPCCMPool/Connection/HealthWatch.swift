@_spi(Reactor) import GRPCCMReactor
import GRPCCMCalls
@_spi(Transport) import GRPCCMTransport
import GRPCCMWire

/// Client-side health checking of one connection (gRFC A17): a `grpc.health.v1.Health/Watch` stream on exactly that
/// connection, whose answers decide whether the subchannel takes calls.
///
/// The stream is an ordinary `ClientCall` whose router knows one transport: it never queues, never moves to another
/// connection and is never retried by policy (its owner restarts it after a backoff). Its callbacks run in the loop's
/// deferred phase, so the subchannel changes state outside nghttp2's processing.
///
/// `@unchecked Sendable`: reactor thread only.
final class HealthWatch: CallRouter, @unchecked Sendable {
    /// What the watch learnt: a health status, or the end of the stream.
    enum Report {
        case status(HealthStatus)
        case ended(CallStatus)
    }

    private let transport: any HTTP2Transport
    private var call: ClientCall?
    private var stopped = false

    /// Starts watching `serviceName` on `transport`; `report` hears each answer and the end (not after `stop()`).
    init(
        transport: any HTTP2Transport, serviceName: String, reactor: Reactor, service: String,
        maxHeaderListSize: Int, report: @escaping (Report) -> Void
    ) {
        self.transport = transport
        // Loop-thread only: the callbacks run in the deferred phase of this loop, where `report` may be called.
        nonisolated(unsafe) let report = report
        // A bus of its own, which nobody hears: the watch is the client's doing, not a call of the application's,
        // so metrics and logs must not count it (a CANCELLED each time a connection goes, an UNIMPLEMENTED for each
        // connection to a server without the service), as grpc-go keeps it out of its interceptors.
        let environment = CallEnvironment(
            reactor: reactor, service: service, router: self, bus: LocalEventBus(reactor: reactor),
            policies: CallPolicies(admission: nil, retry: nil),
            maxHeaderListSize: maxHeaderListSize)
        // The end comes through the completion (a call's `onFinish` is its channel's wrapping of it).
        let callbacks = StreamingCallbacks(
            onMessage: { [weak self] bytes in
                guard let self, !self.stopped else { return }
                report(.status(HealthProto.decodeResponse(bytes) ?? .unknown))
            },
            onFinish: { _ in })
        let call = ClientCall(
            environment: environment, path: HealthProto.watchPath, metadata: CallMetadata(),
            request: HealthProto.encodeRequest(service: serviceName), deadline: 0, maxReceiveMessageSize: 4096,
            waitForReady: false, delivery: .callbacks(callbacks),
            completion: { [weak self] response in
                guard let self, !self.stopped else { return }
                self.call = nil
                report(.ended(response.status))
            })
        call.isBackground = true  // its restarts do not keep the connection from going idle
        self.call = call
        call.start()
    }

    /// Ends the watch (the connection went away or the subchannel shut down); nothing is reported after this.
    func stop() {
        self.stopped = true
        self.call?.end(CallStatus(code: .cancelled, message: "health check stopped"))
        self.call = nil
    }

    // MARK: CallRouter (one transport, no queue)

    func adopt(_ call: ClientCall) {}
    func release(_ call: ClientCall) {}
    func withdraw(_ call: ClientCall) {}
    func adopt(_ coordinator: any CallCoordinator) {}
    func release(_ coordinator: any CallCoordinator) {}
    var isClosing: Bool { self.stopped }
    var closingStatus: CallStatus { CallStatus(code: .unavailable, message: "health check stopped") }

    func route(_ call: ClientCall) {
        if case .tryElsewhere = call.open(on: self.transport) {
            call.routeFailed(CallStatus(code: .unavailable, message: "no stream free for the health check"))
        }
    }
}
