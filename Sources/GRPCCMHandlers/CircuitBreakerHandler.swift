import GRPCCMCalls
import GRPCCMWire

/// Opens and closes a breaker per service and method; the calls' `CallAdmission`. Reactor thread only.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class CircuitBreakerHandler: CallAdmission, @unchecked Sendable {
    // `@unchecked`: the breaker table is touched on the reactor thread only (admission and call ends).
    private struct Key: Hashable {
        let service: String
        let path: String
    }

    /// Shared by every breaker of the table.
    private let limits: CircuitBreakerStateMachine.Limits
    /// Strong: the bus does not hold the breaker (it answers calls directly), so nothing cycles.
    private let bus: LocalEventBus
    @exclusivity(unchecked)
    private var breakers = HotKeyTable<Key, CircuitBreakerStateMachine>()

    /// Breakers of their own for this many methods (all services of the loop together); methods seen after that, and
    /// longer paths, share one breaker per service, `otherMethods` (`MethodPathLimits`, the metrics' rules too).
    package static let maxBreakers = MethodPathLimits.trackedMethods
    package static let otherMethods = MethodPathLimits.other

    package init(configuration: CircuitBreakerConfiguration, bus: LocalEventBus) {
        self.limits = CircuitBreakerStateMachine.Limits(configuration)
        self.bus = bus
    }

    /// May a call to `path` go out at `now`? While open: no, and it fails without touching the network.
    package func admit(service: String, path: String, now: UInt64) -> CallPermit? {
        let slot =
            self.breakers.lastSlot { $0.service == service && $0.path == path }
            ?? self.breakers.slot(
                for: Key(service: service, path: MethodPathLimits.tracked(path)), limit: Self.maxBreakers,
                overflow: Key(service: service, path: Self.otherMethods)
            ) {
                CircuitBreakerStateMachine(limits: self.limits)
            }
        let decision = self.breakers[slot].acquire(now: now)
        if let (from, to) = decision.changed { self.publishChange(of: slot, service: service, path: path, from: from, to: to) }
        return decision.permitted ? CallPermit(isProbe: decision.probe, epoch: decision.epoch, slot: slot) : nil
    }

    package func callEnded(
        _ permit: CallPermit, service: String, path: String, status: CallStatus, duration: Duration, now: UInt64,
        endedLocally: Bool
    ) {
        // Slots are never removed: the one the call was admitted with is still its breaker.
        let slot = permit.slot
        if endedLocally {
            // The caller gave up, or the channel closed: nothing learnt about the server. A probe's slot frees for the next one.
            self.breakers[slot].release(probe: permit.isProbe, epoch: permit.epoch)
            return
        }
        // One mutating access: a non-mutating method on the table's element would read it out first, a copy of the
        // whole machine (window included).
        let change = self.breakers[slot].callEnded(
            status.code, duration: duration, probe: permit.isProbe, epoch: permit.epoch, now: now)
        if let (from, to) = change { self.publishChange(of: slot, service: service, path: path, from: from, to: to) }
    }

    /// Publishes a change of the breaker in `slot`, under the call's path when the breaker is its method's own, and
    /// under `otherMethods` for the one the methods past the limits share (the call's path would name one of them, and
    /// the others' changes would show under other names).
    private func publishChange(
        of slot: Int, service: String, path: String, from: CircuitBreakerState, to: CircuitBreakerState
    ) {
        let own = self.breakers.existingSlot(for: Key(service: service, path: path)) == slot
        self.bus.publish(
            .circuitBreakerStateChanged(service: service, path: own ? path : Self.otherMethods, from: from, to: to))
    }

    package func state(service: String, path: String) -> CircuitBreakerState {
        guard let slot = self.breakers.existingSlot(for: Key(service: service, path: path)) else { return .closed }
        return self.breakers[slot].state
    }
}
