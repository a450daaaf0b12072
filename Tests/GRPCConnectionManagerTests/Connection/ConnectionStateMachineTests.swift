import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// Every state x every input, driven through the pure machine: no sockets, no clock.
@Suite("ConnectionStateMachine")
struct ConnectionStateMachineTests {
    static let backoff = Backoff.Configuration(
        base: .milliseconds(100), multiplier: 1.6, jitter: 0.2, maximum: .seconds(3))
    static let failure = CallStatus(code: .unavailable, message: "refused")
    /// When the table's inputs come: 10 s after a READY connection's SETTINGS (at 0), long established.
    static let later: UInt64 = 10_000_000_000

    enum Input: String, CaseIterable, CustomStringConvertible {
        case connectRequested, connectSucceeded, connectFailed, connectionLost, backoffElapsedWaiting,
            backoffElapsedNotWaiting, goAwayReceived, idleTimeoutElapsed, released, shutdownRequested
        var description: String { self.rawValue }
    }

    /// Reaches `target` through the machine's own inputs.
    static func makeStateMachine(in target: ConnectivityState) -> ConnectionStateMachine {
        var machine = ConnectionStateMachine(backoff: Self.backoff)
        switch target {
        case .idle: break
        case .connecting: _ = machine.connectRequested()
        case .ready:
            _ = machine.connectRequested()
            _ = machine.connectSucceeded(now: 0)
        case .transientFailure:
            _ = machine.connectRequested()
            _ = machine.connectFailed(Self.failure, randomUnit: 0.5)
        case .shutdown: _ = machine.shutdownRequested()
        }
        #expect(machine.state == target)
        return machine
    }

    /// Applies an input and names the action.
    static func apply(_ input: Input, to machine: inout ConnectionStateMachine) -> String {
        switch input {
        case .connectRequested:
            return machine.connectRequested() == .connect ? "connect" : "none"
        case .connectSucceeded:
            return machine.connectSucceeded(now: Self.later) == .becameReady ? "becameReady" : "none"
        case .connectFailed:
            return Self.name(machine.connectFailed(Self.failure, randomUnit: 0.5))
        case .connectionLost:
            return Self.name(machine.connectionLost(Self.failure, randomUnit: 0.5, now: Self.later))
        case .backoffElapsedWaiting, .backoffElapsedNotWaiting:
            switch machine.backoffElapsed(callsWaiting: input == .backoffElapsedWaiting) {
            case .none: return "none"
            case .connect: return "connect"
            case .becameIdle: return "becameIdle"
            }
        case .goAwayReceived:
            return machine.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: Self.later) == .drain ? "drain" : "none"
        case .idleTimeoutElapsed:
            return machine.idleTimeoutElapsed() == .close ? "close" : "none"
        case .released:
            return machine.released() == .close ? "close" : "none"
        case .shutdownRequested:
            return machine.shutdownRequested() == .close ? "close" : "none"
        }
    }

    static func name(_ action: ConnectionStateMachine.OnFailure) -> String {
        switch action {
        case .none: return "none"
        case .backoff(let delay, let error):
            #expect(error == Self.failure)
            return delay == .zero ? "backoff(0)" : "backoff"
        }
    }

    typealias Row = (ConnectivityState, Input, ConnectivityState, String)

    static let table: [Row] = [
        (.idle, .connectRequested, .connecting, "connect"),
        (.idle, .connectSucceeded, .idle, "none"),
        (.idle, .connectFailed, .idle, "none"),
        (.idle, .connectionLost, .idle, "none"),
        (.idle, .backoffElapsedWaiting, .idle, "none"),
        (.idle, .backoffElapsedNotWaiting, .idle, "none"),
        (.idle, .goAwayReceived, .idle, "none"),
        (.idle, .idleTimeoutElapsed, .idle, "none"),
        (.idle, .released, .idle, "none"),
        (.idle, .shutdownRequested, .shutdown, "close"),

        (.connecting, .connectRequested, .connecting, "none"),
        (.connecting, .connectSucceeded, .ready, "becameReady"),
        (.connecting, .connectFailed, .transientFailure, "backoff"),
        (.connecting, .connectionLost, .transientFailure, "backoff"),
        (.connecting, .backoffElapsedWaiting, .connecting, "none"),
        (.connecting, .backoffElapsedNotWaiting, .connecting, "none"),
        (.connecting, .goAwayReceived, .idle, "drain"),
        (.connecting, .idleTimeoutElapsed, .connecting, "none"),
        (.connecting, .released, .idle, "close"),
        (.connecting, .shutdownRequested, .shutdown, "close"),

        (.ready, .connectRequested, .ready, "none"),
        (.ready, .connectSucceeded, .ready, "none"),
        (.ready, .connectFailed, .ready, "none"),
        (.ready, .connectionLost, .transientFailure, "backoff(0)"),
        (.ready, .backoffElapsedWaiting, .ready, "none"),
        (.ready, .backoffElapsedNotWaiting, .ready, "none"),
        (.ready, .goAwayReceived, .idle, "drain"),
        (.ready, .idleTimeoutElapsed, .idle, "close"),
        (.ready, .released, .idle, "close"),
        (.ready, .shutdownRequested, .shutdown, "close"),

        (.transientFailure, .connectRequested, .transientFailure, "none"),
        (.transientFailure, .connectSucceeded, .transientFailure, "none"),
        (.transientFailure, .connectFailed, .transientFailure, "none"),
        (.transientFailure, .connectionLost, .transientFailure, "none"),
        (.transientFailure, .backoffElapsedWaiting, .connecting, "connect"),
        (.transientFailure, .backoffElapsedNotWaiting, .idle, "becameIdle"),
        (.transientFailure, .goAwayReceived, .transientFailure, "none"),
        (.transientFailure, .idleTimeoutElapsed, .transientFailure, "none"),
        (.transientFailure, .released, .idle, "close"),
        (.transientFailure, .shutdownRequested, .shutdown, "close"),
    ] + Input.allCases.map { (.shutdown, $0, .shutdown, "none") }

    @Test("the table covers every state x every input")
    func tableIsComplete() {
        let covered = Set(Self.table.map { "\($0.0)/\($0.1)" })
        #expect(covered.count == ConnectivityState.allCases.count * Input.allCases.count)
    }

    @Test("every state x every input gives the expected state and action", arguments: Self.table.indices)
    func transition(row index: Int) {
        let (from, input, to, action) = Self.table[index]
        var machine = Self.makeStateMachine(in: from)
        let got = Self.apply(input, to: &machine)
        #expect(machine.state == to, "\(from) + \(input)")
        #expect(got == action, "\(from) + \(input)")
    }

    @Test("a released connection (pick_first chose another address) is no failure: the backoff goes on as it was")
    func releaseLeavesTheBackoff() {
        // The delays of two failures in a row, without and with releases between them.
        func delays(releasing: Bool) -> [ConnectionStateMachine.OnFailure] {
            var machine = ConnectionStateMachine(backoff: Self.backoff)
            var delays: [ConnectionStateMachine.OnFailure] = []
            for _ in 0..<2 {
                if releasing {
                    _ = machine.connectRequested()
                    #expect(machine.released() == .close)  // an attempt given up: CONNECTING to IDLE
                }
                _ = machine.connectRequested()
                delays.append(machine.connectFailed(Self.failure, randomUnit: 0.5))
                if releasing {
                    #expect(machine.lastAttemptFailed)
                    #expect(machine.released() == .close)  // a backoff given up: TRANSIENT_FAILURE to IDLE
                    #expect(machine.state == .idle && machine.lastError == Self.failure)
                    #expect(!machine.lastAttemptFailed, "its next attempt starts a new pass")
                } else {
                    _ = machine.backoffElapsed(callsWaiting: false)
                }
            }
            return delays
        }
        #expect(delays(releasing: true) == delays(releasing: false), "the second delay has grown in both")
    }

    @Test("backoff follows 100 ms x 1.6 up to 3 s, jittered within ±20 %")
    func backoffSequence() {
        var nominal = Backoff(Self.backoff)
        let expected = [100.0, 160, 256, 409.6, 655.36, 1048.576, 1677.7216, 2684.35456, 3000, 3000, 3000]
        for value in expected {
            #expect(abs(Double(nominal.next(unit: 0.5).nanoseconds) / 1e6 - value) < 0.001)
        }
        var low = Backoff(Self.backoff)
        var high = Backoff(Self.backoff)
        #expect(low.next(unit: 0) == .milliseconds(80))
        #expect(high.next(unit: 0.999_999_999).nanoseconds >= 119_999_000)
        var generator = SeededGenerator(seed: 42)
        var jittered = Backoff(Self.backoff)
        var delays: [Double] = []
        for value in expected {
            let delay = Double(jittered.next(unit: Double.random(in: 0..<1, using: &generator)).nanoseconds) / 1e6
            #expect(delay >= value * 0.8 - 0.001 && delay <= value * 1.2 + 0.001)
            delays.append(delay)
        }
        #expect(Set(delays).count == delays.count, "jitter spreads the attempts")
    }

    @Test("a multiplier of 1 keeps the base delay, attempt after attempt; reset starts the sequence over")
    func backoffConstantAndReset() {
        var constant = Backoff(Backoff.Configuration(base: .milliseconds(100), multiplier: 1, jitter: 0, maximum: .seconds(120)))
        // Each delay is one step from the last (it was a loop over every attempt so far: after a week of a dead
        // server, millions of steps per delay on the loop thread).
        var delays = Set<Duration>()
        for _ in 0..<100_000 { delays.insert(constant.next(unit: 0.5)) }
        #expect(delays == [.milliseconds(100)])
        var growing = Backoff(Self.backoff)
        for _ in 0..<20 { _ = growing.next(unit: 0.5) }
        #expect(growing.next(unit: 0.5) == .seconds(3))
        growing.reset()
        #expect(growing.next(unit: 0.5) == .milliseconds(100))
        #expect(growing.next(unit: 0.5) == .milliseconds(160))
    }

    @Test("a backoff set near Duration's end (\"never\") saturates instead of trapping, jitter and all")
    func backoffSaturates() {
        var backoff = Backoff(
            Backoff.Configuration(base: .seconds(Int64.max), multiplier: 2, jitter: 1, maximum: .seconds(Int64.max)))
        for unit in [0.999_999, 0.5, 0] {
            let delay = backoff.next(unit: unit)
            #expect(delay >= .zero && delay <= .nanoseconds(Int64.max))
        }
    }

    @Test("a connection lost before it lasted the base delay backs off, and a GOAWAY then delays unasked reconnects")
    func shortLivedConnectionsBackOff() {
        var machine = ConnectionStateMachine(backoff: Self.backoff)
        var delays: [Duration] = []
        var clock: UInt64 = 0
        // A server that takes each connection and drops it 10 ms after its SETTINGS, or sends GOAWAY at once.
        for round in 0..<4 {
            _ = machine.connectRequested()
            #expect(machine.automaticReconnectDelay == .zero)
            #expect(machine.connectSucceeded(now: clock) == .becameReady)
            clock += 10_000_000
            if round % 2 == 0 {
                guard case .backoff(let delay, _) = machine.connectionLost(Self.failure, randomUnit: 0.5, now: clock) else {
                    Issue.record("no backoff in round \(round)")
                    return
                }
                delays.append(delay)
                #expect(machine.state == .transientFailure)
                #expect(machine.backoffElapsed(callsWaiting: false) == .becameIdle)
                #expect(machine.automaticReconnectDelay == .zero, "the backoff was waited")
            } else {
                switch machine.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock) {
                case .drain:
                    // The first GOAWAY: IDLE at once (a waiting call may connect now); only an unasked reconnect waits.
                    #expect(round == 1)
                    #expect(machine.state == .idle)
                    delays.append(machine.automaticReconnectDelay)
                case .drainAndBackoff(let delay, _):
                    // The second, with no connection established since the first: a failed attempt.
                    #expect(round == 3)
                    #expect(machine.state == .transientFailure && machine.lastAttemptFailed)
                    delays.append(delay)
                    #expect(machine.backoffElapsed(callsWaiting: false) == .becameIdle)
                case .none:
                    Issue.record("GOAWAY ignored in round \(round)")
                }
            }
            clock += UInt64(delays.last!.nanoseconds)
        }
        #expect(delays == [.milliseconds(100), .milliseconds(160), .milliseconds(256), .nanoseconds(409_600_000)])
        // One that lasts the base delay (100 ms) is established: its loss redials at once and the backoff restarts;
        // so does a GOAWAY to it.
        _ = machine.connectRequested()
        _ = machine.connectSucceeded(now: clock)
        #expect(machine.connectionLost(Self.failure, randomUnit: 0.5, now: clock + 100_000_000) == .backoff(delay: .zero, error: Self.failure))
        #expect(machine.backoffElapsed(callsWaiting: true) == .connect)
        #expect(machine.connectSucceeded(now: clock) == .becameReady)
        #expect(machine.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock + 200_000_000) == .drain)
        #expect(machine.automaticReconnectDelay == .zero)
        _ = machine.connectRequested()
        #expect(machine.connectFailed(Self.failure, randomUnit: 0.5) == .backoff(delay: .milliseconds(100), error: Self.failure))
    }

    @Test("a GOAWAY before establishment, twice in a row, fails as a connect does, whoever waits; one established between starts over")
    func earlyGoAwaysInARowFail() {
        var machine = ConnectionStateMachine(backoff: Self.backoff)
        var clock: UInt64 = 0
        /// Connects (a call asks), READY, and a GOAWAY 10 ms later.
        func connectThenGoAway() -> ConnectionStateMachine.OnGoAway {
            _ = machine.connectRequested()
            _ = machine.connectSucceeded(now: clock)
            clock += 10_000_000
            return machine.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock)
        }
        // A waiting call reconnects at once after the first: nothing held it back from the second before, and a
        // server that sends GOAWAY to every connection was redialled at round-trip speed while calls waited.
        #expect(connectThenGoAway() == .drain)
        #expect(machine.state == .idle && !machine.lastAttemptFailed)
        #expect(connectThenGoAway() == .drainAndBackoff(delay: .milliseconds(160), error: Self.failure))
        #expect(machine.state == .transientFailure && machine.lastAttemptFailed && machine.lastError == Self.failure)
        #expect(machine.backoffElapsed(callsWaiting: true) == .connect)
        _ = machine.connectSucceeded(now: clock)
        clock += 10_000_000
        #expect(machine.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock) == .drainAndBackoff(delay: .milliseconds(256), error: Self.failure))
        _ = machine.backoffElapsed(callsWaiting: true)
        // Established (READY for the base delay) and then a GOAWAY: the server moving us on; the count starts over.
        _ = machine.connectSucceeded(now: clock)
        clock += 100_000_000
        #expect(machine.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock) == .drain)
        #expect(machine.automaticReconnectDelay == .zero)
        #expect(connectThenGoAway() == .drain)
        #expect(connectThenGoAway() == .drainAndBackoff(delay: .milliseconds(160), error: Self.failure))
        _ = machine.backoffElapsed(callsWaiting: true)

        // A GOAWAY after the server took streams is not a refusal, however soon: a proxy that ends each connection
        // after so many requests, at a high rate, is served, not refused.
        var served = ConnectionStateMachine(backoff: Self.backoff)
        for round in 0..<5 {
            _ = served.connectRequested()
            _ = served.connectSucceeded(now: clock)
            clock += 10_000_000
            #expect(served.goAwayReceived(Self.failure, refused: false, randomUnit: 0.5, now: clock) == .drain, "\(round)")
            #expect(served.automaticReconnectDelay == .zero, "it served: nothing to back off from")
        }
        _ = served.connectRequested()
        #expect(served.connectFailed(Self.failure, randomUnit: 0.5) == .backoff(delay: .milliseconds(100), error: Self.failure), "the backoff started over")
        // Two refusals further apart than twice the backoff's cap (3 s) are not in a row; nor are two with the
        // connection let go of between (pick_first chose another address).
        var apart = ConnectionStateMachine(backoff: Self.backoff)
        for round in 0..<2 {
            _ = apart.connectRequested()
            _ = apart.connectSucceeded(now: clock)
            clock += 10_000_000
            #expect(apart.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock) == .drain)
            if round == 0 { clock += 6_000_000_001 }
        }
        _ = apart.connectRequested()
        _ = apart.connectSucceeded(now: clock)
        #expect(apart.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock) == .drainAndBackoff(delay: .milliseconds(256), error: Self.failure), "the third, at once: in a row")
        _ = apart.backoffElapsed(callsWaiting: true)
        _ = apart.connectSucceeded(now: clock)
        #expect(apart.released() == .close)
        _ = apart.connectRequested()
        _ = apart.connectSucceeded(now: clock)
        #expect(apart.goAwayReceived(Self.failure, refused: true, randomUnit: 0.5, now: clock) == .drain)
    }

    @Test("the backoff resets once a connection is established, and a lost established connection reconnects at once")
    func backoffResetsOnReady() {
        var machine = ConnectionStateMachine(backoff: Self.backoff)
        var delays: [Duration] = []
        for _ in 0..<4 {
            _ = machine.connectRequested()
            if case .backoff(let delay, _) = machine.connectFailed(Self.failure, randomUnit: 0.5) { delays.append(delay) }
            #expect(machine.backoffElapsed(callsWaiting: false) == .becameIdle)
        }
        #expect(delays == [.milliseconds(100), .milliseconds(160), .milliseconds(256), .nanoseconds(409_600_000)])
        _ = machine.connectRequested()
        #expect(machine.connectSucceeded(now: 0) == .becameReady)
        #expect(machine.lastError == nil)
        #expect(machine.connectionLost(Self.failure, randomUnit: 0.5, now: Self.later) == .backoff(delay: .zero, error: Self.failure))
        #expect(machine.backoffElapsed(callsWaiting: true) == .connect)
        #expect(machine.connectFailed(Self.failure, randomUnit: 0.5) == .backoff(delay: .milliseconds(100), error: Self.failure))
        #expect(machine.lastError == Self.failure)
    }
}

/// A deterministic generator for jitter tests (SplitMix64).
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { self.state = seed }
    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
