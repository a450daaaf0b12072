import GRPCCMWire

/// Whether a call may go out, asked when it starts and told how it ended (the circuit breaker answers). Reactor
/// thread only.
package protocol CallAdmission: AnyObject {
    /// May a call to `path` of `service` go out now (`now`: `Reactor.clock()`, read once by the call for its own
    /// start time too)? nil: refused, and the call fails without touching the network.
    func admit(service: String, path: String, now: UInt64) -> CallPermit?
    /// The call admitted with `permit` ended at `now` with `status` after `duration`. `endedLocally`: this side ended it
    /// (the caller cancelled, or the channel closed), which says nothing about the server's health.
    func callEnded(
        _ permit: CallPermit, service: String, path: String, status: CallStatus, duration: Duration, now: UInt64,
        endedLocally: Bool)
}

/// What admission handed out: whether the call is a half-open probe, the state it was admitted under (an outcome
/// from an older state must not count in the current one), and where the admission keeps that state (`slot`: its
/// own index, so that the end of the call finds it without a lookup).
package struct CallPermit: Sendable, Hashable {
    package var isProbe: Bool
    package var epoch: UInt64
    package var slot: Int

    package init(isProbe: Bool, epoch: UInt64, slot: Int = 0) {
        self.isProbe = isProbe
        self.epoch = epoch
        self.slot = slot
    }
}

/// Whether a failed attempt is tried again, and when (the retry handler answers, gRFC A6). Reactor thread only.
package protocol RetryAdvisor: AnyObject {
    /// The deadline of each attempt of `path` (nil: only the call's own).
    func perAttemptTimeout(path: String) -> Duration?
    /// An attempt ended (the throttle learns from every one; the trailers may hold the server's pushback).
    func attemptEnded(service: String, path: String, status: CallStatus, trailers: CallMetadata)
    /// Whether the throttle lets another hedged attempt go out for `service` (gRFC A6: hedging shares the retry
    /// throttle).
    func hedgingAllowed(service: String) -> Bool
    /// A hedged attempt's answer, for the throttle: success, a failure (a non-fatal code of the hedging policy, or a
    /// server's "do not retry" pushback: gRFC A6), or neither (nil).
    func hedgedAttemptEnded(service: String, succeeded: Bool?)
    /// The wait before the next attempt, or nil when the call ends here.
    /// - Parameters:
    ///   - attempt: The attempt that just ended (1 = the first).
    ///   - backoffStep: Its place in the backoff sequence: as `attempt`, counted again from 1 after a retry the
    ///     server's pushback timed (gRFC A6 implementations start over at the initial backoff then).
    ///   - deadline: The call's deadline (0 = none); a retry that could not start before it is not made.
    func retryDelay(
        service: String, path: String, status: CallStatus, trailers: CallMetadata, attempt: Int, backoffStep: Int,
        deadline: UInt64, now: UInt64
    ) -> RetryDelay?
}

/// When the next attempt goes, and whether the server said so.
package struct RetryDelay: Equatable, Sendable {
    package var delay: Duration
    /// The server's `grpc-retry-pushback-ms` set it: the backoff sequence starts over after this retry.
    package var pushedBack: Bool

    package init(_ delay: Duration, pushedBack: Bool) {
        self.delay = delay
        self.pushedBack = pushedBack
    }
}

/// The policies every call of a channel consults; either may be off.
package struct CallPolicies {
    package var admission: (any CallAdmission)?
    package var retry: (any RetryAdvisor)?

    package init(admission: (any CallAdmission)?, retry: (any RetryAdvisor)?) {
        self.admission = admission
        self.retry = retry
    }
}
