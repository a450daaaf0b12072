import GRPCCMWire

/// The connectivity of one connection, as a pure state machine: inputs in, actions out. No I/O, no clock, no
/// randomness of its own (random numbers come in with the input that needs one), no locks, no bus. The owner,
/// `Subchannel`, performs every action and publishes the transitions.
///
/// ```
///                 connectRequested
///       ┌──────┐ ─────────────────▶ ┌────────────┐  connectSucceeded  ┌───────┐
///   ┌──▶│ IDLE │                    │ CONNECTING │ ─────────────────▶ │ READY │
///   │   └──────┘ ◀───────────┐      └────────────┘                    └───────┘
///   │      ▲                 │         │      ▲                        │  │  │
///   │      │ goAwayReceived, │         │      │ backoffElapsed         │  │  │ connectionLost
///   │      │ idleTimeout     │  connectFailed  │ (calls waiting)       │  │  │ (keepalive, EOF,
///   │      └─────────────────┼─────────┼──────┼────────────────────────┘  │  │  error)
///   │                        │         ▼      │                           │  ▼
///   │   backoffElapsed       │   ┌───────────────────┐ ◀──────────────────┘ (backoff reset: 0 s)
///   └─── (no call waiting) ──┴── │ TRANSIENT_FAILURE │
///                                └───────────────────┘
///   shutdownRequested: any state → SHUTDOWN (terminal; every later input is ignored)
/// ```
///
/// Rules (grpc `connectivity-semantics-and-api.md`, `connection-backoff.md`):
/// - every recoverable failure passes through TRANSIENT_FAILURE; a lost READY connection too, with the backoff
///   already reset, so its first reconnect waits no time (grpc-go#2636);
/// - "connected" means the server's SETTINGS arrived, not that TCP connected (grpc-go#1444): the backoff resets
///   only then;
/// - after the backoff, the connection reconnects only if calls wait for it, and otherwise rests in IDLE;
/// - a GOAWAY moves READY to IDLE at once (no new streams there; the old transport drains its streams);
/// - inputs that make no sense in a state are ignored and return `.none`: the network can cause them.
package struct ConnectionStateMachine {
    private enum State: Equatable {
        case idle
        case connecting
        case ready
        case transientFailure(CallStatus)
        case shutdown
    }

    private var internalState: State = .idle
    private var backoff: Backoff
    /// The last connect or connection error, for fail-fast messages and health reports.
    package private(set) var lastError: CallStatus?

    package init(backoff: Backoff.Configuration) {
        self.backoff = Backoff(backoff)
    }

    /// The public connectivity state.
    package var state: ConnectivityState {
        switch self.internalState {
        case .idle: return .idle
        case .connecting: return .connecting
        case .ready: return .ready
        case .transientFailure: return .transientFailure
        case .shutdown: return .shutdown
        }
    }

    // MARK: inputs

    package enum OnConnectRequested: Equatable {
        case none
        /// Start an attempt.
        case connect
    }

    /// A call needs the connection (or the application asked to connect).
    package mutating func connectRequested() -> OnConnectRequested {
        guard case .idle = self.internalState else { return .none }
        self.internalState = .connecting
        return .connect
    }

    package enum OnConnectSucceeded: Equatable {
        case none
        /// Now READY: start the waiting calls, keepalive and the idle timer.
        case becameReady
    }

    /// The server's SETTINGS arrived on the attempt.
    package mutating func connectSucceeded() -> OnConnectSucceeded {
        guard case .connecting = self.internalState else { return .none }
        self.internalState = .ready
        self.backoff.reset()
        self.lastError = nil
        return .becameReady
    }

    package enum OnFailure: Equatable {
        case none
        /// Now TRANSIENT_FAILURE: wait `delay`, then report `backoffElapsed`; fail the fail-fast calls that wait.
        case backoff(delay: Duration, error: CallStatus)
    }

    /// The attempt failed (refused, timed out, closed during the handshake). `randomUnit` is uniform in [0, 1).
    package mutating func connectFailed(_ error: CallStatus, randomUnit: Double) -> OnFailure {
        guard case .connecting = self.internalState else { return .none }
        self.internalState = .transientFailure(error)
        self.lastError = error
        return .backoff(delay: self.backoff.next(unit: randomUnit), error: error)
    }

    /// An established connection failed: keepalive timeout, EOF, a read or protocol error.
    package mutating func connectionLost(_ error: CallStatus, randomUnit: Double) -> OnFailure {
        switch self.internalState {
        case .connecting:
            return self.connectFailed(error, randomUnit: randomUnit)
        case .ready:
            self.internalState = .transientFailure(error)
            self.lastError = error
            // The backoff was reset when the connection became ready: the first reconnect waits no time.
            return .backoff(delay: .zero, error: error)
        case .idle, .transientFailure, .shutdown:
            return .none
        }
    }

    package enum OnBackoffElapsed: Equatable {
        case none
        /// Calls are waiting: start the next attempt (now CONNECTING).
        case connect
        /// Nothing waits: rest in IDLE until a call comes.
        case becameIdle
    }

    /// The backoff wait ended.
    package mutating func backoffElapsed(callsWaiting: Bool) -> OnBackoffElapsed {
        guard case .transientFailure = self.internalState else { return .none }
        if callsWaiting {
            self.internalState = .connecting
            return .connect
        }
        self.internalState = .idle
        return .becameIdle
    }

    package enum OnGoAway: Equatable {
        case none
        /// Now IDLE: take no new streams on the current transport and let it drain.
        case drain
    }

    /// The server sent GOAWAY.
    package mutating func goAwayReceived() -> OnGoAway {
        switch self.internalState {
        case .ready, .connecting:
            self.internalState = .idle
            return .drain
        case .idle, .transientFailure, .shutdown:
            return .none
        }
    }

    package enum OnIdleTimeout: Equatable {
        case none
        /// Now IDLE: close the transport gracefully.
        case close
    }

    /// No call for the whole idle timeout.
    package mutating func idleTimeoutElapsed() -> OnIdleTimeout {
        guard case .ready = self.internalState else { return .none }
        self.internalState = .idle
        return .close
    }

    package enum OnShutdown: Equatable {
        case none
        /// Now SHUTDOWN: close the transport, cancel timers, fail waiting calls.
        case close
    }

    /// The application closed the connection.
    package mutating func shutdownRequested() -> OnShutdown {
        if case .shutdown = self.internalState { return .none }
        self.internalState = .shutdown
        return .close
    }
}
