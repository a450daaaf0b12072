@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

/// Brings a streaming call's buffered work to the reactor thread: one submission per batch of writes or reads,
/// not one per message (`wakePending` coalesces them).
///
/// `@unchecked Sendable` (through `ReactorHandler`): `call` and `reactor` are set once, before the call is submitted
/// (the submission orders them before any other thread's read), and never change; `call` is weak because the call
/// owns its buffers and so this waker.
package final class StreamWaker: ReactorHandler, @unchecked Sendable {
    weak var call: ClientCall?
    var reactor: Reactor?

    func wake() {
        guard let reactor = self.reactor else { return }
        if reactor.inReactorThread {
            self.reactorRunSubmitted()
        } else {
            reactor.submit(self)
        }
    }

    package override func reactorRunSubmitted() {
        self.call?.streamWake()
    }

    /// The send buffer drained below the limit (reactor thread).
    func writable() {
        self.call?.notifyWritable()
    }

    /// Something ends the call: a response that cannot be read (the server's doing), or, `byClient`, a write that
    /// broke a rule (a message over the send limit), which tells the circuit breaker nothing about the server.
    func fail(_ status: CallStatus, byClient: Bool = false) {
        self.call?.failFromAnyThread(status, byClient: byClient)
    }
}
