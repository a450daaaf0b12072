@_spi(Reactor) import GRPCCMReactor
import GRPCCMCalls
import GRPCCMWire

/// Turns a target's host name into addresses for a pool.
///
/// The pool asks once before the first connection, again periodically, when a connection fails or goes away (at
/// most once per `minimumResolutionInterval`), and when a failed resolution leaves wait-for-ready calls waiting.
/// Numeric addresses and Unix paths are never resolved (`fixedAddresses(for:)`). The seam lets other resolvers
/// (c-ares on the loop, a registry) replace getaddrinfo.
package protocol AddressResolver: Sendable {
    /// The addresses `target` always has: installed once, never looked up again. nil: `target` is resolved. The
    /// default is a numeric address or a Unix path as it is.
    func fixedAddresses(for target: Target) -> [NetworkAddress]?

    /// Resolves `target` and calls `completion` once, on `reactor`'s thread (never inside this call).
    func resolve(
        _ target: Target, on reactor: Reactor,
        completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void)

    /// A resolver that learns of changes itself (an etcd watch) calls `changed` on `reactor`'s thread whenever the
    /// answer may differ; the pool resolves again then. Called once per pool, before its first resolution. The
    /// default learns nothing (DNS has no push).
    func watch(_ target: Target, on reactor: Reactor, changed: @escaping @Sendable () -> Void)

    /// The pool on `reactor` is closing: what `watch` started there ends (an etcd watch, its connection), and no
    /// change is reported any more. Called once, on `reactor`'s thread. The default has nothing to end.
    func stopWatching(_ target: Target, on reactor: Reactor)
}

extension AddressResolver {
    package func fixedAddresses(for target: Target) -> [NetworkAddress]? { target.numericAddresses }

    package func watch(_ target: Target, on reactor: Reactor, changed: @escaping @Sendable () -> Void) {}

    package func stopWatching(_ target: Target, on reactor: Reactor) {}
}

/// A resolver whose lookup blocks (getaddrinfo): it runs on a helper thread and reports back through the loop's
/// inbox.
package protocol BlockingAddressResolver: AddressResolver {
    func resolve(_ target: Target) -> Result<[NetworkAddress], CallStatus>
}

extension BlockingAddressResolver {
    package func resolve(
        _ target: Target, on reactor: Reactor,
        completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
    ) {
        spawnDetachedThread {
            let result = self.resolve(target)
            _ = reactor.execute { completion(result) }
        }
    }
}

/// getaddrinfo, as the C library is configured (`/etc/hosts`, `/etc/resolv.conf`): A and AAAA records, on a thread
/// of its own per lookup.
package struct SystemResolver: BlockingAddressResolver {
    package init() {}

    package func resolve(_ target: Target) -> Result<[NetworkAddress], CallStatus> {
        target.resolveBlocking()
    }
}
