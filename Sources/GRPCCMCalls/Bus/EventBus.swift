@_spi(Reactor) import GRPCCMReactor

#if canImport(Glibc)
import Glibc
#endif

/// The event bus: typed `ConnectionEvent`s, published on the reactor thread and dispatched to every subscriber in
/// subscription order.
///
/// Dispatch is deferred to the reactor's deferred phase of the same turn: an event raised deep inside nghttp2's
/// processing (a GOAWAY, a stream that closed) reaches handlers only once that processing is over, so a handler may
/// use the whole public API (start a call, close a channel, unsubscribe). Events raised by a handler, or by anything
/// a handler starts, are dispatched in the next turn. A call's events are dispatched before its completion runs.
///
/// Publishing with no subscriber costs one load and a branch: the event is built only when someone listens.
/// Publishing appends to a buffer that keeps its capacity, and dispatch walks a plain array: no allocation per event.
/// Handlers run on the reactor thread: they must be quick and must not block.
public final class EventBus: Sendable {
    /// Identifies a subscription; pass it to `unsubscribe(_:)`.
    public struct Token: Sendable, Hashable {
        let value: Int
    }

    package let reactor: Reactor
    private let state: BusDispatcher

    package init(reactor: Reactor) {
        self.reactor = reactor
        self.state = BusDispatcher()
    }

    /// Adds a handler. It receives every event published after this call returns.
    /// - Parameter handler: Called on the reactor thread, outside the library's I/O processing; must not block.
    ///   Any thread may subscribe, handlers included.
    /// - Returns: The token for `unsubscribe(_:)`.
    @discardableResult
    public func subscribe(_ handler: @escaping @Sendable (ConnectionEvent) -> Void) -> Token {
        let state = self.state
        return self.onReactorAndWait { state.add(handler, callEvents: true) }
    }

    /// Adds a handler that may leave out the per-call events (`callStarted`, `attemptFinished`, `callFinished`):
    /// when no subscriber wants them, calls build and queue none, which is most of what the bus would cost a call.
    /// The library's own handlers use it (the logging handler wants them only at debug level).
    @discardableResult
    package func subscribe(callEvents: Bool, _ handler: @escaping @Sendable (ConnectionEvent) -> Void) -> Token {
        let state = self.state
        return self.onReactorAndWait { state.add(handler, callEvents: callEvents) }
    }

    /// Removes a subscription. No event reaches its handler after this returns (events already published, too).
    /// Any thread may unsubscribe, handlers included.
    public func unsubscribe(_ token: Token) {
        let state = self.state
        self.onReactorAndWait { state.remove(token) }
    }

    /// Publishes an event built only if someone listens. Reactor thread only.
    @inline(__always)
    package func publish(_ event: @autoclosure () -> ConnectionEvent) {
        if self.state.subscriptions.isEmpty { return }
        self.state.pending.append(event())
        if !self.state.scheduled {
            self.state.scheduled = true
            self.reactor.enqueueDeferred(self.state)
        }
    }

    package var hasSubscribers: Bool { !self.state.subscriptions.isEmpty }

    /// Publishes a per-call event, built only if a subscriber wants per-call events. Reactor thread only.
    @inline(__always)
    package func publishCallEvent(_ event: @autoclosure () -> ConnectionEvent) {
        if self.state.callEventSubscribers == 0 { return }
        self.publish(event())
    }

    /// Whether anyone wants per-call events (a call skips building them otherwise).
    package var wantsCallEvents: Bool { self.state.callEventSubscribers > 0 }

    /// Runs `body` on the reactor thread and waits for it (or runs it inline on the reactor thread). Subscriptions
    /// change only there, so dispatch needs no lock.
    @discardableResult
    private func onReactorAndWait<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        // Inline on the reactor thread, and when the loop is not running (nothing can race with us then).
        if self.reactor.inReactorThread || !self.reactor.isRunning { return body() }
        let result = PThreadLock<T?>(nil)
        guard self.reactor.execute({ let value = body(); result.withLock { $0 = value } }) else { return body() }
        while true {
            if let value = result.withLock({ $0 }) { return value }
            usleep(50)
        }
    }
}

/// One handler and whether it still listens (an unsubscribe during dispatch stops it at once).
private final class Subscription: @unchecked Sendable {
    // `@unchecked`: `active` is touched on the reactor thread only.
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

/// The bus's reactor-side state: subscriptions and the events waiting for the deferred phase.
///
/// `@unchecked Sendable` (through `ReactorHandler`): mutated and read on the reactor thread only (or before the loop
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
    @exclusivity(unchecked)
    private var nextToken = 1

    func add(_ handler: @escaping @Sendable (ConnectionEvent) -> Void, callEvents: Bool) -> EventBus.Token {
        let token = self.nextToken
        self.nextToken += 1
        self.subscriptions.append(Subscription(token: token, handler: handler, callEvents: callEvents))
        if callEvents { self.callEventSubscribers += 1 }
        return EventBus.Token(value: token)
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
        self.scheduled = false
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
        self.dispatching.removeAll(keepingCapacity: true)
    }
}
