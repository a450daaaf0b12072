import GRPCCMReactor
import GRPCCMWire

/// Where a call's attempts go: whoever owns the connections (the service pool). The call knows only this much of it.
/// Reactor thread only.
package protocol CallRouter: AnyObject {
    /// The call started: keep it until `release`, so that closing can end it wherever it waits (queued, on a stream,
    /// between attempts).
    func adopt(_ call: ClientCall)
    /// The call ended.
    func release(_ call: ClientCall)
    /// Send the call's current attempt: open a stream for it now (`ClientCall.open(on:)`), or keep it waiting until
    /// a connection can take it, or fail it (`ClientCall.routeFailed(_:)`).
    func route(_ call: ClientCall)
    /// The call stopped waiting for a stream (it ended, or its attempt timed out, while queued).
    func withdraw(_ call: ClientCall)
    /// Closing or closed: no attempt starts any more, none is retried. A stopping loop need not be included: the
    /// call checks its reactor itself.
    var isClosing: Bool { get }
    /// Why new attempts fail while closing.
    var closingStatus: CallStatus { get }
    /// A call made of attempts that are calls of their own (a hedged call's coordinator) started: until `release`,
    /// closing tells it (`CallCoordinator.channelClosing`), which ends it when no attempt of its is out to end it.
    func adopt(_ coordinator: any CallCoordinator)
    /// The coordinated call ended.
    func release(_ coordinator: any CallCoordinator)
}

/// What a call made of other calls (a hedged call's coordinator) hears from its router. Reactor thread only.
package protocol CallCoordinator: AnyObject {
    /// Closing began (`CallRouter.isClosing` is true from now on): no attempt starts any more; with none out, the call
    /// ends now with `reason`.
    func channelClosing(_ reason: CallStatus)
}

/// Everything a channel's calls share: the reactor, where they go, the bus they report to, the policies they ask.
/// Made once per channel and loop (and once per health watch). `@unchecked Sendable`: immutable after init; the
/// objects it refers to are used on the reactor thread only.
package final class CallEnvironment: @unchecked Sendable {
    package let reactor: Reactor
    package let service: String
    package let router: any CallRouter
    package let bus: LocalEventBus
    package let policies: CallPolicies
    /// SETTINGS_MAX_HEADER_LIST_SIZE we announce: the bound on each response header block.
    package let maxHeaderListSize: Int
    /// The metadata names the channel's responses carried before (reactor thread only, like the rest).
    package let metadataNames = MetadataNameCache()

    package static let loopStopping = CallStatus(code: .unavailable, message: "the event loop is shutting down")

    /// Why no call may begin now: the channel is closing, or the loop stopping. For the paths off the per-call one
    /// (a call whose interceptors still prepare it, a hedged call); `ClientCall.refusalOrAdmission` writes it out.
    package var closingRefusal: CallStatus? {
        if self.router.isClosing { return self.router.closingStatus }
        if self.reactor.isStopping { return Self.loopStopping }
        return nil
    }

    package init(
        reactor: Reactor, service: String, router: any CallRouter, bus: LocalEventBus, policies: CallPolicies,
        maxHeaderListSize: Int
    ) {
        self.reactor = reactor
        self.service = service
        self.router = router
        self.bus = bus
        self.policies = policies
        self.maxHeaderListSize = maxHeaderListSize
    }
}
