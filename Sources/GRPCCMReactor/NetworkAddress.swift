import CReactor

#if canImport(Glibc)
import Glibc
#endif

/// A resolved address to connect to or listen on: IPv4, IPv6 or a Unix-domain path.
public struct NetworkAddress: Sendable, Hashable, CustomStringConvertible {
    package enum Storage: Sendable, Hashable {
        case ipv4(host: String, port: Int)
        case ipv6(host: String, port: Int)
        case unix(path: String)
    }

    package let storage: Storage

    /// A numeric IPv4 or IPv6 address and a port; nil if `host` is not numeric. An IPv6 address may carry its zone
    /// (`fe80::1%eth0`, or the interface's index, `fe80::1%2`): a link-local address means nothing without one. nil
    /// too for a zone that names no interface of this host.
    public init?(ip host: String, port: Int) {
        guard (0...65535).contains(port) else { return nil }
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            self.storage = .ipv4(host: host, port: port)
        } else if let v6 = Self.ipv6(host), v6.scope != nil {
            self.storage = .ipv6(host: host, port: port)
        } else {
            return nil
        }
    }

    /// An IPv6 host's address and zone (`fe80::1%eth0`); nil when the address is not IPv6. `scope` is 0 without a
    /// zone, nil for a zone that names no interface of this host.
    private static func ipv6(_ host: String) -> (address: in6_addr, scope: UInt32?)? {
        var address = in6_addr()
        guard let percent = host.utf8.firstIndex(of: UInt8(ascii: "%")) else {
            return inet_pton(AF_INET6, host, &address) == 1 ? (address, 0) : nil
        }
        guard inet_pton(AF_INET6, String(host[..<percent]), &address) == 1 else { return nil }
        return (address, Self.scopeID(zone: host[host.index(after: percent)...]))
    }

    /// The interface index an IPv6 zone names: its number, or the interface of that name. nil when it names none.
    private static func scopeID(zone: Substring) -> UInt32? {
        guard !zone.isEmpty else { return nil }
        if let index = UInt32(zone) {
            var name = [CChar](repeating: 0, count: Int(IF_NAMESIZE))
            return if_indextoname(index, &name) == nil ? nil : index
        }
        let index = if_nametoindex(String(zone))
        return index == 0 ? nil : index
    }

    /// The address in an IPv4 or IPv6 `sockaddr` (from getaddrinfo or c-ares) with `port`; nil for another family.
    package init?(_ sockaddr: UnsafePointer<sockaddr>, port: Int) {
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        switch Int32(sockaddr.pointee.sa_family) {
        case AF_INET:
            var address = sockaddr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
            guard inet_ntop(AF_INET, &address, &text, socklen_t(text.count)) != nil else { return nil }
        case AF_INET6:
            let v6 = sockaddr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee }
            var address = v6.sin6_addr
            guard inet_ntop(AF_INET6, &address, &text, socklen_t(text.count)) != nil else { return nil }
            // A link-local answer is usable only on its interface: keep the index the resolver gave.
            if v6.sin6_scope_id != 0 {
                let host = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                self.init(ip: host + "%\(v6.sin6_scope_id)", port: port)
                return
            }
        default:
            return nil
        }
        self.init(ip: String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), port: port)
    }

    /// The distinct addresses of a resolver's linked result list (getaddrinfo's `addrinfo`, c-ares's
    /// `ares_addrinfo_node`), in order, each with `port`; entries of another family are skipped.
    package static func distinct<Node>(
        from first: Node?, port: Int, sockaddr: (Node) -> UnsafePointer<sockaddr>?, next: (Node) -> Node?
    ) -> [NetworkAddress] {
        var addresses: [NetworkAddress] = []
        var node = first
        while let current = node {
            if let raw = sockaddr(current), let address = NetworkAddress(raw, port: port), !addresses.contains(address) {
                addresses.append(address)
            }
            node = next(current)
        }
        return addresses
    }

    /// A Unix-domain socket path: at most 107 bytes (`sun_path` holds 108 with the terminating NUL).
    public init(unixPath: String) {
        self.storage = .unix(path: unixPath)
    }

    public var description: String {
        switch self.storage {
        case .ipv4(let host, let port): return "\(host):\(port)"
        case .ipv6(let host, let port): return "[\(host)]:\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }

    package var isIPv6: Bool {
        if case .ipv6 = self.storage { return true }
        return false
    }

    package var isTCP: Bool {
        if case .unix = self.storage { return false }
        return true
    }

    /// `0.0.0.0` or `::`: a server's "every interface" when it binds, nowhere to dial (Linux takes it as this host).
    package var isUnspecified: Bool {
        switch self.storage {
        case .ipv4(let host, _):
            var v4 = in_addr()
            return inet_pton(AF_INET, host, &v4) == 1 && v4.s_addr == 0
        case .ipv6(let host, _):
            guard let v6 = Self.ipv6(host)?.address else { return false }
            return withUnsafeBytes(of: v6) { $0.allSatisfy { $0 == 0 } }
        case .unix:
            return false
        }
    }

    /// Calls `body` with the C sockaddr for this address.
    package func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) throws -> R {
        switch self.storage {
        case .ipv4(let host, let port):
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            _ = inet_pton(AF_INET, host, &address.sin_addr)
            return try withUnsafePointer(to: &address) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        case .ipv6(let host, let port):
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = in_port_t(UInt16(port).bigEndian)
            if let v6 = Self.ipv6(host) {
                address.sin6_addr = v6.address
                // The interface may have gone since the address was parsed: then the connect fails (EINVAL), as
                // without a zone.
                address.sin6_scope_id = v6.scope ?? 0
            }
            return try withUnsafePointer(to: &address) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        case .unix(let path):
            var address = sockaddr_un()
            let length = cr_make_unix_address(path, &address)
            if length < 0 { throw ReactorError(operation: "unix socket path", errno: -length) }
            return try withUnsafePointer(to: &address) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, socklen_t(length)) }
            }
        }
    }
}
