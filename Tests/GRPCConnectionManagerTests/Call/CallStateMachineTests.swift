import Testing

@testable import GRPCCMCalls
@testable import GRPCCMWire

/// Every state x every input, driven through the pure machine: no reactor, no streams, no clock.
@Suite("CallStateMachine")
struct CallStateMachineTests {
    static let failure = CallStatus(code: .unavailable, message: "attempt failed")
    static let closing = CallStatus(code: .unavailable, message: "closing")
    static let ended = CallStatus(code: .cancelled, message: "cancelled")

    enum Input: String, CaseIterable, CustomStringConvertible {
        case startAdmitted, startRefused, streamOpened, headersReceived, attemptEndedFinal, attemptEndedRetry,
            attemptEndedUnprocessed, backoffElapsed, ended, closing
        var description: String { self.rawValue }
    }

    static let states = ["CREATED", "WAITING", "OPEN", "OPEN_COMMITTED", "BACKING_OFF", "FINISHED"]

    /// Reaches `target` through the machine's own inputs.
    static func makeStateMachine(in target: String, requestsStreamed: Bool = false) -> CallStateMachine {
        var machine = CallStateMachine(requestsStreamed: requestsStreamed)
        switch target {
        case "CREATED": break
        case "WAITING": _ = machine.start(refusal: nil)
        case "OPEN":
            _ = machine.start(refusal: nil)
            machine.streamOpened()
        case "OPEN_COMMITTED":
            _ = machine.start(refusal: nil)
            machine.streamOpened()
            machine.headersReceived()
        case "BACKING_OFF":
            _ = machine.start(refusal: nil)
            _ = machine.attemptEnded(status: Self.failure, unprocessed: false, retryDelay: .milliseconds(10))
        case "FINISHED":
            _ = machine.start(refusal: Self.failure)
        default:
            Issue.record("no state \(target)")
        }
        #expect(machine.stateName == target)
        return machine
    }

    /// Applies an input and names the action.
    static func apply(_ input: Input, to machine: inout CallStateMachine) -> String {
        switch input {
        case .startAdmitted:
            switch machine.start(refusal: nil) {
            case .none: return "none"
            case .route: return "route"
            case .finish: return "finish"
            }
        case .startRefused:
            switch machine.start(refusal: Self.failure) {
            case .none: return "none"
            case .route: return "route"
            case .finish: return "finish"
            }
        case .streamOpened:
            machine.streamOpened()
            return "none"
        case .headersReceived:
            machine.headersReceived()
            return "none"
        case .attemptEndedFinal:
            return Self.name(machine.attemptEnded(status: Self.failure, unprocessed: false, retryDelay: nil))
        case .attemptEndedRetry:
            // The policy said "again in 100 ms" (the driver asks it only when `mayRetryByPolicy`; the machine must
            // hold the line itself too).
            return Self.name(machine.attemptEnded(status: Self.failure, unprocessed: false, retryDelay: .milliseconds(100)))
        case .attemptEndedUnprocessed:
            return Self.name(machine.attemptEnded(status: Self.failure, unprocessed: true, retryDelay: nil))
        case .backoffElapsed:
            switch machine.backoffElapsed() {
            case .none: return "none"
            case .route: return "route"
            case .finish: return "finish"
            }
        case .ended:
            return Self.name(machine.ended(Self.ended))
        case .closing:
            return Self.name(machine.closing(Self.closing))
        }
    }

    static func name(_ action: CallStateMachine.OnAttemptEnded) -> String {
        switch action {
        case .none: return "none"
        case .retryTransparently: return "retryTransparently"
        case .retryAfter: return "retryAfter"
        case .finish: return "finish"
        }
    }

    static func name(_ action: CallStateMachine.OnEnded) -> String {
        switch action {
        case .none: return "none"
        case .finish(_, let abandon): return "finish(\(abandon))"
        }
    }

    /// (state, input) → (next state, action), for a call whose request is one message.
    static let table: [String: [Input: (String, String)]] = [
        "CREATED": [
            .startAdmitted: ("WAITING", "route"), .startRefused: ("FINISHED", "finish"),
            .streamOpened: ("CREATED", "none"), .headersReceived: ("CREATED", "none"),
            .attemptEndedFinal: ("CREATED", "none"), .attemptEndedRetry: ("CREATED", "none"),
            .attemptEndedUnprocessed: ("CREATED", "none"), .backoffElapsed: ("CREATED", "none"),
            .ended: ("FINISHED", "finish(nothing)"), .closing: ("CREATED", "none"),
        ],
        "WAITING": [
            .startAdmitted: ("WAITING", "none"), .startRefused: ("WAITING", "none"),
            .streamOpened: ("OPEN", "none"), .headersReceived: ("WAITING", "none"),
            .attemptEndedFinal: ("FINISHED", "finish"), .attemptEndedRetry: ("BACKING_OFF", "retryAfter"),
            .attemptEndedUnprocessed: ("WAITING", "retryTransparently"), .backoffElapsed: ("WAITING", "none"),
            .ended: ("FINISHED", "finish(queue)"), .closing: ("FINISHED", "finish(queue)"),
        ],
        "OPEN": [
            .startAdmitted: ("OPEN", "none"), .startRefused: ("OPEN", "none"),
            .streamOpened: ("OPEN", "none"), .headersReceived: ("OPEN_COMMITTED", "none"),
            .attemptEndedFinal: ("FINISHED", "finish"), .attemptEndedRetry: ("BACKING_OFF", "retryAfter"),
            .attemptEndedUnprocessed: ("WAITING", "retryTransparently"), .backoffElapsed: ("OPEN", "none"),
            .ended: ("FINISHED", "finish(stream)"), .closing: ("OPEN", "none"),
        ],
        "OPEN_COMMITTED": [
            .startAdmitted: ("OPEN_COMMITTED", "none"), .startRefused: ("OPEN_COMMITTED", "none"),
            .streamOpened: ("OPEN_COMMITTED", "none"), .headersReceived: ("OPEN_COMMITTED", "none"),
            .attemptEndedFinal: ("FINISHED", "finish"),
            // gRFC A6: response headers commit the call; no retry by policy after them.
            .attemptEndedRetry: ("FINISHED", "finish"),
            .attemptEndedUnprocessed: ("WAITING", "retryTransparently"), .backoffElapsed: ("OPEN_COMMITTED", "none"),
            .ended: ("FINISHED", "finish(stream)"), .closing: ("OPEN_COMMITTED", "none"),
        ],
        "BACKING_OFF": [
            .startAdmitted: ("BACKING_OFF", "none"), .startRefused: ("BACKING_OFF", "none"),
            .streamOpened: ("BACKING_OFF", "none"), .headersReceived: ("BACKING_OFF", "none"),
            .attemptEndedFinal: ("BACKING_OFF", "none"), .attemptEndedRetry: ("BACKING_OFF", "none"),
            .attemptEndedUnprocessed: ("BACKING_OFF", "none"), .backoffElapsed: ("WAITING", "route"),
            .ended: ("FINISHED", "finish(backoff)"), .closing: ("FINISHED", "finish(backoff)"),
        ],
        "FINISHED": Dictionary(uniqueKeysWithValues: Input.allCases.map { ($0, ("FINISHED", "none")) }),
    ]

    @Test("the table covers every state x every input")
    func tableIsComplete() {
        for state in Self.states {
            #expect(Set(Self.table[state]?.keys.map(\.rawValue) ?? []) == Set(Input.allCases.map(\.rawValue)), "\(state)")
        }
    }

    @Test("every state x every input gives the expected state and action", arguments: Self.states, Input.allCases)
    func transition(_ state: String, _ input: Input) {
        var machine = Self.makeStateMachine(in: state)
        let action = Self.apply(input, to: &machine)
        let (expectedState, expectedAction) = Self.table[state]![input]!
        #expect(machine.stateName == expectedState, "\(state) + \(input)")
        #expect(action == expectedAction, "\(state) + \(input)")
    }

    @Test("a request stream is never retried by policy, only transparently")
    func streamedRequestsAreNotRetriedByPolicy() {
        var machine = Self.makeStateMachine(in: "OPEN", requestsStreamed: true)
        #expect(!machine.mayRetryByPolicy)
        #expect(Self.apply(.attemptEndedRetry, to: &machine) == "finish")
        machine = Self.makeStateMachine(in: "OPEN", requestsStreamed: true)
        #expect(Self.apply(.attemptEndedUnprocessed, to: &machine) == "retryTransparently")
    }

    @Test("a transparent retry happens once per attempt; a policy retry brings a fresh one")
    func transparentRetryOnce() {
        var machine = Self.makeStateMachine(in: "OPEN")
        #expect(Self.apply(.attemptEndedUnprocessed, to: &machine) == "retryTransparently")
        #expect(machine.attempt == 1, "a transparent retry is not an attempt")
        machine.streamOpened()
        #expect(Self.apply(.attemptEndedUnprocessed, to: &machine) == "finish")
        machine = Self.makeStateMachine(in: "OPEN")
        _ = Self.apply(.attemptEndedUnprocessed, to: &machine)
        machine.streamOpened()
        #expect(Self.apply(.attemptEndedRetry, to: &machine) == "retryAfter")
        #expect(Self.apply(.backoffElapsed, to: &machine) == "route")
        #expect(machine.attempt == 2)
        machine.streamOpened()
        #expect(Self.apply(.attemptEndedUnprocessed, to: &machine) == "retryTransparently", "attempt 2 has its own")
    }

    @Test("once closing, an open attempt runs to its end and nothing is retried, transparently or by policy")
    func nothingRetriedWhileClosing() {
        var machine = Self.makeStateMachine(in: "OPEN")
        #expect(Self.apply(.closing, to: &machine) == "none")
        #expect(!machine.mayRetryByPolicy)
        #expect(Self.apply(.attemptEndedUnprocessed, to: &machine) == "finish")
        machine = Self.makeStateMachine(in: "OPEN")
        _ = Self.apply(.closing, to: &machine)
        #expect(Self.apply(.attemptEndedRetry, to: &machine) == "finish")
    }

    @Test("closing during a backoff ends with the closing status, the last attempt's in its message")
    func closingDuringBackoffSaysBoth() {
        var machine = Self.makeStateMachine(in: "BACKING_OFF")
        let ended = CallStatus(code: .unavailable, message: "closing, while waiting to retry after UNAVAILABLE: attempt failed")
        #expect(machine.closing(Self.closing) == .finish(ended, abandoning: .backoff))
    }
}
