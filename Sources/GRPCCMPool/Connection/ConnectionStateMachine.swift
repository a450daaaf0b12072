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
///   │      │ idleTimeout,    │  connectFailed  │ (calls waiting)       │  │  │ (keepalive, EOF,
///   │      │ released        │         │      │                        │  │  │
///   │      └─────────────────┼─────────┼──────┼────────────────────────┘  │  │  error)
///   │                        │         ▼      │                           │  ▼
///   │   backoffElapsed       │   ┌───────────────────┐ ◀──────────────────┘ (0 s once it was established)
///   └─── (no call waiting) ──┴── │ TRANSIENT_FAILURE │
///                                └───────────────────┘
///   shutdownRequested: any state → SHUTDOWN (terminal; every later input is ignored)
/// ```
///
/// Rules (grpc `connectivity-semantics-and-api.md`, `connection-backoff.md`):
/// - every recoverable failure passes through TRANSIENT_FAILURE; a lost READY connection too, and once the
///   connection was established its first reconnect waits no time (grpc-go#2636);
/// - "connected" means the server's SETTINGS arrived, not that TCP connected (grpc-go#1444), and "established"
///   that it then stayed READY for the backoff's base delay: the backoff resets only then. A server that takes
///   connections and drops them at once (a connection limit, a crash on accept) would otherwise be redialled at
///   round-trip speed for ever; such a connection's loss backs off as a failed connect does;
/// - after the backoff, the connection reconnects only if calls wait for it, and otherwise rests in IDLE;
/// - a GOAWAY moves READY (or CONNECTING) to IDLE at once: no new streams there, the old transport drains its
///   streams, and a call that waits connects again at once (the server said "go elsewhere", not "fail"). One that
///   came before the connection was established sets `automaticReconnectDelay`, the wait of a reconnect nobody
///   asked for (an eager pool's); a second refusal (last stream id 0) in a row, with no connection established
///   between, is a failed attempt (TRANSIENT_FAILURE and its backoff): a server that sends GOAWAY to every new
///   connection is not redialled at round-trip speed, whoever waits;
/// - a connection the owner lets go of (`released`: pick_first chose another address), connecting, ready or
///   waiting out a backoff, goes back to IDLE and leaves the backoff as it was: nothing failed;
/// - inputs that make no sense in a state are ignored and return `.none`: the network can cause them.
package struct ConnectionStateMachine {
    private enum State: Equatable {
        case idle
        case connecting
        /// Since the monotonic time `since` (ns), when the server's SETTINGS came.
        case ready(since: UInt64)
        case transientFailure(CallStatus)
        case shutdown
    }

    private var internalState: State = .idle
    private var backoff: Backoff
    /// The last connect or connection error, for fail-fast messages and health reports.
    package private(set) var lastError: CallStatus?
    /// The last attempt failed: it never connected, or its connection was lost before it was established. Not after
    /// a success, nor after losing an established connection (whose reconnect is immediate): the owner counts a
    /// connection as failing (sticky TRANSIENT_FAILURE) only while this holds.
    package private(set) var lastAttemptFailed = false
    /// How long a reconnect from IDLE that no call asked for should wait: zero, or the backoff's delay after a
    /// GOAWAY that came before the connection was established.
    package private(set) var automaticReconnectDelay: Duration = .zero
    /// When (monotonic ns) the last connection was refused by a GOAWAY before it was established, none having been
    /// established since; nil otherwise.
    private var lastEarlyRefusalAt: UInt64?

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
        self.automaticReconnectDelay = .zero
        return .connect
    }

    package enum OnConnectSucceeded: Equatable {
        case none
        /// Now READY: start the waiting calls, keepalive and the idle timer.
        case becameReady
    }

    /// The server's SETTINGS arrived on the attempt, at `now` (monotonic ns). The backoff resets only once the
    /// connection has lasted (see `connectionLost`).
    package mutating func connectSucceeded(now: UInt64) -> OnConnectSucceeded {
        guard case .connecting = self.internalState else { return .none }
        self.internalState = .ready(since: now)
        self.lastError = nil
        self.lastAttemptFailed = false
        return .becameReady
    }

    /// Whether a connection READY since `since` was established by `now`: it lasted the backoff's base delay. Then
    /// the backoff starts over.
    private mutating func established(since: UInt64, now: UInt64) -> Bool {
        guard now &- since >= UInt64(max(self.backoff.configuration.base.nanoseconds, 0)) else { return false }
        self.backoff.reset()
        self.lastEarlyRefusalAt = nil
        return true
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
        self.lastAttemptFailed = true
        return .backoff(delay: self.backoff.next(unit: randomUnit), error: error)
    }

    /// A connection failed at `now`: keepalive timeout, EOF, a read or protocol error. Once established, it is
    /// redialled at once; before, it backs off as a failed connect does.
    package mutating func connectionLost(_ error: CallStatus, randomUnit: Double, now: UInt64) -> OnFailure {
        switch self.internalState {
        case .connecting:
            return self.connectFailed(error, randomUnit: randomUnit)
        case .ready(let since):
            self.internalState = .transientFailure(error)
            self.lastError = error
            let established = self.established(since: since, now: now)
            self.lastAttemptFailed = !established
            if established { return .backoff(delay: .zero, error: error) }
            return .backoff(delay: self.backoff.next(unit: randomUnit), error: error)
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
        self.automaticReconnectDelay = .zero  // the backoff has been waited
        return .becameIdle
    }

    package enum OnGoAway: Equatable {
        case none
        /// Now IDLE: take no new streams on the current transport and let it drain.
        case drain
        /// The second GOAWAY in a row before a connection was established: let the transport drain, and fail as a
        /// failed connect does (now TRANSIENT_FAILURE: wait `delay`, then report `backoffElapsed`).
        case drainAndBackoff(delay: Duration, error: CallStatus)
    }

    /// The server sent GOAWAY at `now`; `refused`: it processed none of the connection's streams (last stream id
    /// 0); `error` says so, for the calls a failure would fail.
    package mutating func goAwayReceived(_ error: CallStatus, refused: Bool, randomUnit: Double, now: UInt64) -> OnGoAway {
        switch self.internalState {
        case .ready(let since):
            if self.established(since: since, now: now) {
                self.internalState = .idle
                return .drain
            }
            return self.earlyGoAway(error, refused: refused, randomUnit: randomUnit, now: now)
        case .connecting:
            return self.earlyGoAway(error, refused: refused, randomUnit: randomUnit, now: now)
        case .idle, .transientFailure, .shutdown:
            return .none
        }
    }

    /// A GOAWAY before the connection was established. One after the server took streams is a connection that
    /// served (a proxy that ends each connection after so many requests may do that within the base delay, at a
    /// high rate): established, IDLE, the backoff starting over. A refusal (no stream taken) is the server saying
    /// "go elsewhere" the first time (IDLE, a waiting call reconnects at once); the next in a row (within twice the
    /// backoff's cap of the one before: a refusal hours ago says nothing now) is a server refusing connections.
    private mutating func earlyGoAway(_ error: CallStatus, refused: Bool, randomUnit: Double, now: UInt64) -> OnGoAway {
        guard refused else {
            self.backoff.reset()
            self.lastEarlyRefusalAt = nil
            self.internalState = .idle
            return .drain
        }
        let delay = self.backoff.next(unit: randomUnit)
        let window = UInt64(max(self.backoff.configuration.maximum.nanoseconds, 0)) &* 2
        let inARow = self.lastEarlyRefusalAt.map { now &- $0 <= window } == true
        self.lastEarlyRefusalAt = now
        guard inARow else {
            self.internalState = .idle
            self.automaticReconnectDelay = delay
            return .drain
        }
        self.internalState = .transientFailure(error)
        self.lastError = error
        self.lastAttemptFailed = true
        return .drainAndBackoff(delay: delay, error: error)
    }

    package enum OnReleased: Equatable {
        case none
        /// Now IDLE: close the transport (let a ready one finish its streams), cancel the backoff's timer.
        case close
    }

    /// The owner no longer wants this connection: pick_first chose another address. Not a failure: the backoff
    /// and the last error stay as they were; its last attempt no longer counts as failed.
    package mutating func released() -> OnReleased {
        switch self.internalState {
        case .connecting, .ready, .transientFailure:
            self.internalState = .idle
            // Its next attempt starts a new pass (gRFC A62: CONNECTING, not a failure carried over).
            self.lastAttemptFailed = false
            self.lastEarlyRefusalAt = nil
            return .close
        case .idle:
            // Nothing to close; a refusal before it no longer counts either (the connection was let go of).
            self.lastEarlyRefusalAt = nil
            return .none
        case .shutdown:
            return .none
        }
    }

    package enum OnIdleTimeout: Equatable {
        case none
        /// Now IDLE: close the transport gracefully.
        case close
    }

    /// No call for the whole idle timeout. The connection served (this side closes it), so the backoff starts
    /// over.
    package mutating func idleTimeoutElapsed() -> OnIdleTimeout {
        guard case .ready = self.internalState else { return .none }
        self.internalState = .idle
        self.backoff.reset()
        self.lastEarlyRefusalAt = nil
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
