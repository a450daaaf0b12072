#if canImport(Glibc)
import Glibc
#endif

/// The event bus: typed `ConnectionEvent`s, published on the reactor thread and dispatched synchronously to every
/// subscriber in subscription order.
///
/// Publishing with no subscriber costs one load and a branch: the event is built only when someone listens.
/// Dispatch walks a plain array and calls each handler; it allocates nothing per event. Handlers run on the
/// reactor thread: they must be quick and must not block.
public final class EventBus: Sendable {
    /// Identifies a subscription; pass it to `unsubscribe(_:)`.
    public struct Token: Sendable, Hashable {
        let value: Int
    }

    let reactor: Reactor
    private let subscribers: Subscribers

    package init(reactor: Reactor) {
        self.reactor = reactor
        self.subscribers = Subscribers()
    }

    /// Adds a handler. It receives every event published after this call returns.
    /// - Parameter handler: Called on the reactor thread, synchronously; must not block.
    /// - Returns: The token for `unsubscribe(_:)`.
    @discardableResult
    public func subscribe(_ handler: @escaping @Sendable (ConnectionEvent) -> Void) -> Token {
        let subscribers = self.subscribers
        return self.onReactorAndWait { subscribers.add(handler) }
    }

    /// Removes a subscription. No event reaches its handler after this returns.
    public func unsubscribe(_ token: Token) {
        let subscribers = self.subscribers
        self.onReactorAndWait { subscribers.remove(token) }
    }

    /// Publishes an event built only if someone listens. Reactor thread only.
    @inline(__always)
    package func publish(_ event: @autoclosure () -> ConnectionEvent) {
        if self.subscribers.handlers.isEmpty { return }
        self.subscribers.dispatch(event())
    }

    var hasSubscribers: Bool { !self.subscribers.handlers.isEmpty }

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

    /// The handler list. `@unchecked Sendable`: mutated and read on the reactor thread only.
    final class Subscribers: @unchecked Sendable {
        var handlers: [(token: Int, handler: @Sendable (ConnectionEvent) -> Void)] = []
        private var nextToken = 1

        func add(_ handler: @escaping @Sendable (ConnectionEvent) -> Void) -> Token {
            let token = self.nextToken
            self.nextToken += 1
            self.handlers.append((token, handler))
            return Token(value: token)
        }

        func remove(_ token: Token) {
            self.handlers.removeAll { $0.token == token.value }
        }

        func dispatch(_ event: ConnectionEvent) {
            // A local copy (a retain, not an allocation) lets a handler unsubscribe while we iterate.
            let handlers = self.handlers
            for entry in handlers {
                entry.handler(event)
            }
        }
    }
}
