/// Something the reactor calls back: an fd owner, a timer owner, a submitted job, a connection that flushes its
/// coalesced output at the end of a loop turn, or an owner of deferred work (user callbacks).
///
/// Subclasses are reached from C through `Unmanaged<ReactorHandler>` and a class vtable call, which costs a few
/// nanoseconds per crossing (no existential, no retain on the hot path).
///
/// It is `open` (behind the `Reactor` SPI) only so that modules above the reactor can subclass it: Swift has no
/// "package open", and a `package` base class cannot be subclassed from another module.
///
/// `@unchecked Sendable`: every method below is called on the reactor thread only, and a subclass's state is touched
/// only there. Handing an instance to `Reactor.submit(_:)` from another thread transfers it to the reactor; the
/// submitter must not touch its mutable state afterwards.
@_spi(Reactor)
open class ReactorHandler: @unchecked Sendable {
    public init() {}

    /// An fd registered with this handler is ready. `events` is a mask of `Reactor.Events`.
    open func reactorFDReady(_ events: UInt32) {}
    /// A timer armed with this handler expired.
    open func reactorTimerFired(tag: UInt64) {}
    /// A timer armed with this handler will never fire: the loop stopped (or was let go of) with it armed.
    open func reactorTimerDropped() {}
    /// This handler was submitted with `Reactor.submit(_:)` and now runs on the reactor thread; or the reactor is
    /// stopping and this handler was registered with `Reactor.addShutdownHook(_:)`.
    open func reactorRunSubmitted() {}
    /// Queued with `Reactor.enqueueDeferred(_:)`: runs after the turn's I/O and timers, outside every nghttp2, TLS
    /// and socket callback. User code (completions, stream callbacks, bus handlers) runs only from here.
    open func reactorRunDeferred() {}
    /// End of a loop turn, after `Reactor.scheduleFlush(_:)`: write what was produced in this turn.
    open func reactorFlush() {}
}
