import CReactor
import GRPCCMReactor
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// Where a channel connects: `host:port`, `[v6]:port`, `unix:/path`, or `etcd:///name` (the endpoints registered
/// in etcd under the key prefix `name/`, as grpc-go's etcd resolver reads them).
public struct Target: Sendable, Hashable, CustomStringConvertible {
    package enum Kind: Sendable, Hashable {
        case hostPort(host: String, port: Int)
        case unix(path: String)
        /// Endpoints under the etcd key prefix `name/`.
        case etcd(name: String)
    }

    package let kind: Kind

    /// Parses `host:port`, `[v6]:port`, `unix:/path` (also `unix:///path`) and `etcd:///name`; `dns:///host:port`
    /// (grpc-go's default form) and `dns:host:port` are `host:port`.
    /// - Throws: `ConfigurationError` naming `address` when the text is not one of those.
    public init(parsing text: String) throws(ConfigurationError) {
        var name = Substring(text)
        // `dns:` is the scheme when a target follows it (dns:///host:port, dns:host:port); "dns:53" is the host dns.
        if name.hasPrefix("dns:") && (name.hasPrefix("dns://") || name.dropFirst(4).contains(":")) {
            name = name.dropFirst(4)
            if name.hasPrefix("//") {
                // dns://authority/host:port names the DNS server to ask: not supported per target.
                guard name.hasPrefix("///") else {
                    throw ConfigurationError(
                        field: "address", message: "\"\(text)\": a DNS server in the target is not supported (set dns.servers)")
                }
                name = name.dropFirst(3)
            }
            guard !name.contains(":/"), !name.hasPrefix("unix:") else {
                throw ConfigurationError(field: "address", message: "\"\(text)\": expected dns:///host:port")
            }
        } else if !name.hasPrefix("etcd:///") && !name.hasPrefix("unix:") && name.contains("://") {
            throw ConfigurationError(
                field: "address", message: "\"\(text)\": expected host:port, dns:///host:port, unix:/path or etcd:///name")
        }
        self.kind = try Self.kind(parsing: String(name))
    }

    private static func kind(parsing text: String) throws(ConfigurationError) -> Kind {
        if text.hasPrefix("etcd:///") {
            let name = String(text.dropFirst(8))
            guard !name.isEmpty, !name.hasSuffix("/"), name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw ConfigurationError(field: "address", message: "\"\(text)\": expected etcd:///name (printable, no trailing /)")
            }
            return .etcd(name: name)
        }
        if text.hasPrefix("unix:") {
            var path = String(text.dropFirst(5))
            if path.hasPrefix("//") {
                path = String(path.dropFirst(2))
                // unix://authority/path is not gRPC's syntax (an authority is not allowed): it would read as a
                // relative path.
                guard path.hasPrefix("/") else {
                    throw ConfigurationError(field: "address", message: "\"\(text)\": expected unix:/path, unix:///path or unix:relative")
                }
            }
            guard !path.isEmpty else { throw ConfigurationError(field: "address", message: "empty unix socket path") }
            // sockaddr_un holds 107 bytes and a NUL: a longer path would fail every connect, for ever.
            guard path.utf8.count <= 107 else {
                throw ConfigurationError(
                    field: "address", message: "unix socket path of \(path.utf8.count) bytes: at most 107 fit a socket address")
            }
            return .unix(path: path)
        }
        let host: String
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw ConfigurationError(field: "address", message: "\"\(text)\": missing ']' after the IPv6 address")
            }
            host = try Self.zonedHost(String(text[text.index(after: text.startIndex)..<close]), in: text)
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else {
                throw ConfigurationError(field: "address", message: "\"\(text)\": expected [host]:port")
            }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else {
                throw ConfigurationError(
                    field: "address", message: "\"\(text)\": expected host:port, [v6]:port or unix:/path")
            }
            host = String(text[..<colon])
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty else { throw ConfigurationError(field: "address", message: "\"\(text)\": empty host") }
        // No host has a "/" (dns:/x:1 is not dns:///x:1).
        guard !host.contains("/") else {
            throw ConfigurationError(field: "address", message: "\"\(text)\": a host has no '/'; expected host:port or dns:///host:port")
        }
        // Digits only: Int("+80") is 80.
        guard portText.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }), let port = Int(portText),
            (1...65535).contains(port)
        else {
            throw ConfigurationError(field: "address", message: "\"\(text)\": port must be 1...65535")
        }
        return .hostPort(host: host, port: port)
    }

    /// An IPv6 host in brackets, its zone (`%eth0`, or RFC 6874's `%25eth0`) checked: a zone names an interface.
    private static func zonedHost(_ host: String, in text: String) throws(ConfigurationError) -> String {
        guard let percent = host.firstIndex(of: "%") else { return host }
        let address = String(host[..<percent])
        let zone = host[host.index(after: percent)...]
        // RFC 6874's escaped form first (`%25eth0`, `%251` for index 1), then the zone as written.
        var candidates: [Substring] = []
        if zone.hasPrefix("25") && zone.count > 2 { candidates.append(zone.dropFirst(2)) }
        candidates.append(zone)
        for candidate in candidates {
            let zoned = address + "%" + candidate
            if NetworkAddress(ip: zoned, port: 0) != nil { return zoned }
        }
        throw ConfigurationError(
            field: "address", message: "\"\(text)\": expected [v6%zone]:port, the zone an interface of this host")
    }

    public var description: String {
        switch self.kind {
        case .hostPort(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        case .etcd(let name): return "etcd:///\(name)"
        }
    }

    /// The `:authority` pseudo-header: host:port, or "localhost" for Unix sockets (as grpc-go does).
    package var authority: String {
        switch self.kind {
        // An IPv6 zone is written %25 in a URI's host (RFC 6874).
        case .hostPort(let host, _) where host.contains("%"): return self.description.split(separator: "%").joined(separator: "%25")
        case .hostPort: return self.description
        case .unix: return "localhost"
        case .etcd(let name): return name
        }
    }

    /// Addresses without a DNS lookup, when the host is numeric or a Unix path.
    package var numericAddresses: [NetworkAddress]? {
        switch self.kind {
        case .unix(let path): return [NetworkAddress(unixPath: path)]
        case .hostPort(let host, let port):
            if let address = NetworkAddress(ip: host, port: port) { return [address] }
            return nil
        case .etcd: return nil
        }
    }

    /// Resolves with getaddrinfo. Blocking: never call it on the reactor thread.
    package func resolveBlocking() -> Result<[NetworkAddress], CallStatus> {
        if let numeric = self.numericAddresses { return .success(numeric) }
        guard case .hostPort(let host, let port) = self.kind else {
            return .failure(CallStatus(code: .unavailable, message: "\(self) is not a host name (it needs its own resolver)"))
        }
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var result: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(host, String(port), &hints, &result)
        guard rc == 0, let first = result else {
            let reason = String(cString: gai_strerror(rc))
            return .failure(CallStatus(code: .unavailable, message: "name resolution failed for \(host): \(reason)"))
        }
        defer { freeaddrinfo(first) }
        let addresses = NetworkAddress.distinct(
            from: first, port: port, sockaddr: { UnsafePointer($0.pointee.ai_addr) }, next: { $0.pointee.ai_next })
        if addresses.isEmpty {
            return .failure(CallStatus(code: .unavailable, message: "name resolution found no address for \(host)"))
        }
        return .success(addresses)
    }
}
