import GRPCCMReactor
import GRPCCMWire

/// Turns a target's host name into addresses for a pool.
///
/// The pool calls `resolve` on a helper thread (an implementation may block) and takes the answer back on its loop.
/// It asks once before the first connection, again when a connection fails (at most once a second), and again when
/// a failed resolution leaves wait-for-ready calls waiting. Numeric addresses and Unix paths are never resolved.
/// The seam exists so that other resolvers (c-ares on the loop, a registry) can replace getaddrinfo.
package protocol AddressResolver: Sendable {
    func resolve(_ target: Target) -> Result<[NetworkAddress], CallStatus>
}

/// getaddrinfo, as the C library is configured (`/etc/hosts`, `/etc/resolv.conf`): A and AAAA records.
package struct SystemResolver: AddressResolver {
    package init() {}

    package func resolve(_ target: Target) -> Result<[NetworkAddress], CallStatus> {
        target.resolveBlocking()
    }
}
