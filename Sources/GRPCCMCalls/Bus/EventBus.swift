@_spi(Reactor) import GRPCCMReactor
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The event bus: typed `ConnectionEvent`s, dispatched to every subscriber in subscription order, on the loop where
/// they happened (a manager or channel on a `ReactorGroup` has one loop per connection; on a single loop, all of
/// them run on it).
///
/// Dispatch is deferred to the reactor's deferred phase of the same turn: an event raised deep inside nghttp2's
/// processing (a GOAWAY, a stream that closed) reaches handlers only once that processing is over, so a handler may
/// use the whole public API (start a call, close a channel, unsubscribe). Events raised by a handler, or by anything
/// a handler starts, are dispatched in the next turn (or later in the same phase, once, when a call's completion had
/// the bus dispatch early). A call's events are dispatched before its completion runs.
///
/// Publishing with no subscriber costs one load and a branch: the event is built only when someone listens.
/// Publishing appends to a buffer that keeps its capacity, and dispatch walks a plain array: no allocation per event.
/// Handlers must be quick and must not block.
public final class EventBus: Sendable {
    /// Identifies a subscription; pass it to `unsubscribe(_:)`. Unique in the process: a token of another bus names
    /// no subscription of this one (and tokens of several buses can share a `Set`).
    public struct Token: Sendable, Hashable {
        let value: Int
    }

    /// One part per loop.
    private let locals: [LocalEventBus]
    /// One count for every bus: see `Token`.
    private static let nextToken = Atomic<Int>(1)

    package init(reactors: [Reactor]) {
        precondition(!reactors.isEmpty, "a bus needs a loop")
        self.locals = reactors.map { LocalEventBus(reactor: $0) }
    }

    package convenience init(reactor: Reactor) {
        self.init(reactors: [reactor])
    }

    /// The part of the bus that lives on `reactor`: what code on that loop publishes to.
    package func local(for reactor: Reactor) -> LocalEventBus {
        guard let local = self.locals.first(where: { $0.reactor === reactor }) else {
            preconditionFailure("the bus has no part on this loop")
        }
        return local
    }

    /// The only part, for a bus on one loop.
    package var single: LocalEventBus { self.locals[0] }

    /// Adds a handler. It receives every event published after this call returns, on the loop where it happened.
    /// Called on a loop's thread (from a handler or a completion, of this bus or any other), the promise holds for
    /// that loop at once and for the bus's other loops from their next turn: waiting for them there could deadlock
    /// two loops that subscribe at the same moment.
    /// - Parameter handler: Called on a loop's thread, outside the library's I/O processing; must not block. Any
    ///   thread may subscribe, handlers included.
    /// - Returns: The token for `unsubscribe(_:)`.
    @discardableResult
    public func subscribe(_ handler: @escaping @Sendable (ConnectionEvent) -> Void) -> Token {
        let token = Token(value: Self.nextToken.add(1, ordering: .relaxed).oldValue)
        for local in self.locals { local.add(token, callEvents: true, handler) }
        return token
    }

    /// Removes a subscription. No event reaches its handler after this returns (events already published, too);
    /// called on a loop's thread, that holds for that loop at once and for the bus's others from their next turn
    /// (see `subscribe`). Any thread may unsubscribe, handlers included. From another thread it waits for the loop,
    /// also while the loop shuts down on a thread of its own (a dispatch may still be under way there); for a driven
    /// loop that is stopping it does not wait (only its host's next turn would finish the stop), and the promise
    /// then holds once that turn has run.
    public func unsubscribe(_ token: Token) {
        for local in self.locals { local.remove(token) }
    }

    /// For the library's own handlers, one per loop: see `LocalEventBus.subscribe(callEvents:_:)`.
    package func makeToken() -> Token {
        Token(value: Self.nextToken.add(1, ordering: .relaxed).oldValue)
    }
}

/// The part of an `EventBus` on one loop: what that loop's calls and connections publish to, dispatched there.
/// `@unchecked Sendable`: immutable; its dispatcher is touched on the loop's thread only.
package final class LocalEventBus: @unchecked Sendable {
    package let reactor: Reactor
    private let state = BusDispatcher()
    private let tokens = Atomic<Int>(-1)
    /// Held by threads that change subscriptions inline because the loop has stopped (or no longer takes work): with
    /// no loop thread to run them one at a time, two such threads would change the lists together.
    private let stoppedLoopLock = PThreadLock<Bool>(false)  // not `Mutex` (ThreadSanitizer cannot see its futex), and not of Void (TSan then saw the value accessed outside the lock)

    package init(reactor: Reactor) {
        self.reactor = reactor
    }

    /// Publishes an event built only if someone listens. Loop thread only.
    @inline(__always)
    package func publish(_ event: @autoclosure () -> ConnectionEvent) {
        if self.state.subscriptions.isEmpty { return }
        self.state.pending.append(event())
        if !self.state.scheduled {
            self.state.scheduled = true
            self.reactor.enqueueDeferred(self.state)
        }
    }

    /// Publishes a per-call event, built only if a subscriber wants per-call events. Loop thread only.
    @inline(__always)
    package func publishCallEvent(_ event: @autoclosure () -> ConnectionEvent) {
        if self.state.callEventSubscribers == 0 { return }
        self.publish(event())
    }

    package var hasSubscribers: Bool { !self.state.subscriptions.isEmpty }

    /// Subscriptions, the library's own included. Loop thread only (or once the loop has stopped).
    package var subscriptionCount: Int { self.state.subscriptions.count }

    /// Dispatches now the events still waiting for this turn's deferred phase, unless a dispatch is under way. A call
    /// is queued for that phase when its messages arrive, which can be before its end publishes its events (headers,
    /// messages and trailers in one read): it calls this before its completion, so that its events still come first.
    @inline(__always)
    package func dispatchPendingEvents() {
        if self.state.scheduled && !self.state.running { self.state.reactorRunDeferred() }
    }

    /// Whether anyone wants per-call events (a call skips building them otherwise).
    package var wantsCallEvents: Bool { self.state.callEventSubscribers > 0 }

    /// Adds a handler on this loop only; one that may leave out the per-call events (`callStarted`,
    /// `attemptFinished`, `callFinished`): when no subscriber wants them, calls build and queue none, which is most
    /// of what the bus would cost a call. The library's own handlers use it (the logging handler wants them only at
    /// debug level).
    @discardableResult
    package func subscribe(callEvents: Bool, _ handler: @escaping @Sendable (ConnectionEvent) -> Void) -> EventBus.Token {
        let token = EventBus.Token(value: self.tokens.add(-1, ordering: .relaxed).oldValue)
        self.add(token, callEvents: callEvents, handler)
        return token
    }

    func add(_ token: EventBus.Token, callEvents: Bool, _ handler: @escaping @Sendable (ConnectionEvent) -> Void) {
        let state = self.state
        self.onLoop { state.add(token, handler, callEvents: callEvents) }
    }

    func remove(_ token: EventBus.Token) {
        let state = self.state
        self.onLoop { state.remove(token) }
    }

    /// Runs `body` on the loop's thread: inline when this is it, else through its inbox. Subscriptions change only
    /// there, so dispatch needs no lock. Waits for it when the loop is running, or stopping on a thread of its own (a
    /// dispatch may be under way in its shutdown), and this thread serves no loop:
    /// - a loop not started yet runs its inbox before anything that could publish (calls reach it the same way,
    ///   later), and it may be started by this very thread after this returns (a driven loop);
    /// - a loop's thread must not wait for another loop, which may be waiting for it (two loops creating channels
    ///   on each other from completions at the same moment): neither would turn again.
    private func onLoop(_ body: @escaping @Sendable () -> Void) {
        // Inline on the loop's own thread, and once it has stopped (no thread will ever dispatch again).
        if self.reactor.inReactorThread {
            body()
            return
        }
        let done = Atomic<Bool>(false)
        guard !self.reactor.isStopped, self.reactor.execute({ body(); done.store(true, ordering: .releasing) }) else {
            self.stoppedLoopLock.withLock { _ in body() }
            return
        }
        guard !Reactor.servesALoop else { return }
        while !done.load(ordering: .acquiring) && self.mayStillRun { usleep(50) }
    }

    /// Whether a body the loop's inbox took will still run, and can be waited for: the loop runs, or stops on a thread
    /// of its own (its shutdown runs the inbox, or ends with the loop stopped). Not a driven loop that stops: it
    /// finishes only when its host turns it again, which a host that stopped it may never do.
    private var mayStillRun: Bool {
        let reactor = self.reactor
        return reactor.isRunning || (reactor.isStopping && !reactor.isStopped && !reactor.isDriven)
    }
}

/// One handler and whether it still listens (an unsubscribe during dispatch stops it at once).
private final class Subscription: @unchecked Sendable {
    // `@unchecked`: `active` is touched on the loop's thread only.
    let token: Int
    let handler: @Sendable (ConnectionEvent) -> Void
    let callEvents: Bool
    @exclusivity(unchecked)
    var active = true

    init(token: Int, handler: @escaping @Sendable (ConnectionEvent) -> Void, callEvents: Bool) {
        self.token = token
        self.handler = handler
        self.callEvents = callEvents
    }
}

/// A bus part's loop-side state: subscriptions and the events waiting for the deferred phase.
///
/// `@unchecked Sendable` (through `ReactorHandler`): mutated and read on the loop's thread only (or before the loop
/// runs, when nothing else can).
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
private final class BusDispatcher: ReactorHandler, @unchecked Sendable {
    @exclusivity(unchecked)
    var subscriptions: [Subscription] = []
    /// Subscriptions that want per-call events.
    @exclusivity(unchecked)
    var callEventSubscribers = 0
    @exclusivity(unchecked)
    var pending: [ConnectionEvent] = []
    @exclusivity(unchecked)
    private var dispatching: [ConnectionEvent] = []
    @exclusivity(unchecked)
    var scheduled = false
    /// Handlers are being called: an early dispatch (`dispatchPendingEvents`) from one of them waits for its turn.
    @exclusivity(unchecked)
    var running = false

    func add(_ token: EventBus.Token, _ handler: @escaping @Sendable (ConnectionEvent) -> Void, callEvents: Bool) {
        self.subscriptions.append(Subscription(token: token.value, handler: handler, callEvents: callEvents))
        if callEvents { self.callEventSubscribers += 1 }
    }

    func remove(_ token: EventBus.Token) {
        for subscription in self.subscriptions where subscription.token == token.value && subscription.active {
            subscription.active = false
            if subscription.callEvents { self.callEventSubscribers -= 1 }
        }
        self.subscriptions.removeAll { $0.token == token.value }
        if self.subscriptions.isEmpty { self.pending.removeAll(keepingCapacity: true) }
    }

    override func reactorRunDeferred() {
        // Run early (`dispatchPendingEvents`), it is still queued for the phase: then there is nothing left to do,
        // unless a handler published since. Those events then go out later in this phase rather than the next turn's
        // (the early run's handlers queued this dispatcher a second time, which then finds nothing): once, so a
        // handler that publishes from every event still cannot keep a phase going.
        guard self.scheduled else { return }
        self.scheduled = false
        let nested = self.running
        self.running = true
        defer { self.running = nested }
        // What handlers publish now goes to `pending` and a later turn.
        swap(&self.pending, &self.dispatching)
        // A local copy (a retain, not an allocation) lets a handler subscribe or unsubscribe while we iterate.
        let subscriptions = self.subscriptions
        for event in self.dispatching {
            let perCall = event.isPerCall
            for subscription in subscriptions where subscription.active && (subscription.callEvents || !perCall) {
                subscription.handler(event)
            }
        }
        if self.callEventSubscribers == 0 {
            // Only connection events: they come in bursts when connections change state, seconds apart or more. The
            // storage is not kept between them (about half a kilobyte a channel, most of an idle channel's bus).
            self.dispatching = []
        } else {
            // Per-call events: kept, so that publishing allocates nothing per call.
            self.dispatching.removeAll(keepingCapacity: true)
        }
    }
}
