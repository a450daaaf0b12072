import GRPCCMReactor

/// How a service's calls are spread over its connections, chosen per service (`Configuration.loadBalancingPolicy`
/// and `loadBalancingPolicies`).
public enum LoadBalancingPolicy: Sendable, Hashable, CustomStringConvertible {
    /// The connection with the fewest open streams among those that can take one, ties spread by a rotating start.
    /// Every resolved address is connected. The default: it follows load, which round-robin does not.
    case leastLoaded
    /// gRPC's `round_robin`: every resolved address is connected, and calls go to the ready ones in turn, whatever
    /// their load.
    case roundRobin
    /// gRPC's `pick_first` (gRFC A62, with A61's Happy Eyeballs): addresses are tried in the order resolved, IPv6
    /// and IPv4 interleaved, until one is up; every call goes to it. The next address is tried when an attempt fails
    /// (the failed one rests in its backoff) or has gone `connectionAttemptDelay` (250 ms) without an answer while calls wait or the pool
    /// connects eagerly; the attempts
    /// under way go on, the first to be ready is kept and the others are let go of (attempts, health checks yet to
    /// answer, backoffs). An address's `connectionsPerTarget` connections are tried together; calls fill the first
    /// before the next.
    case pickFirst

    public var description: String {
        switch self {
        case .leastLoaded: "least_loaded"
        case .roundRobin: "round_robin"
        case .pickFirst: "pick_first"
        }
    }
}

/// Which connection a call goes to, by the service's `LoadBalancingPolicy`. A pure value: candidates are described
/// by a closure, so picking allocates nothing and is tested without connections.
package struct Picker: Sendable {
    package let policy: LoadBalancingPolicy
    private var cursor = 0

    package init(policy: LoadBalancingPolicy = .leastLoaded) {
        self.policy = policy
    }

    /// The index of the chosen candidate among `count`, or nil when none can take a stream.
    /// - Parameter candidate: For index i: whether it can take a stream now, and its load.
    package mutating func pick(count: Int, _ candidate: (Int) -> (usable: Bool, load: Int)) -> Int? {
        guard count > 0 else { return nil }
        if count == 1 { return candidate(0).usable ? 0 : nil }
        switch self.policy {
        case .pickFirst:
            for index in 0..<count where candidate(index).usable { return index }
            return nil
        case .roundRobin:
            // The turn passes from the last one chosen, not from a slot: a connection that cannot take the call must
            // not hand its turns to its neighbour (which would then get two in every round).
            for offset in 1...count {
                let index = (self.cursor + offset) % count
                if candidate(index).usable {
                    self.cursor = index
                    return index
                }
            }
            return nil
        case .leastLoaded:
            self.cursor = (self.cursor + 1) % count
            var best: Int?
            var bestLoad = Int.max
            for offset in 0..<count {
                let index = (self.cursor + offset) % count
                let (usable, load) = candidate(index)
                if usable && load < bestLoad {
                    best = index
                    bestLoad = load
                }
            }
            return best
        }
    }
}

extension LoadBalancingPolicy {
    /// The order in which pick_first tries `addresses` (RFC 8305 §4, as gRFC A61 has it): the two IP families
    /// alternate, starting with the first address's, each keeping its own order. Resolvers list every IPv6 answer
    /// first; on a host whose IPv6 route is broken, every one of them would otherwise be tried before any IPv4
    /// address. Unix paths count with IPv4 (they are never mixed with IP addresses).
    package static func pickFirstOrder(_ addresses: [NetworkAddress]) -> [NetworkAddress] {
        guard let first = addresses.first else { return addresses }
        let leadIsIPv6 = first.isIPv6
        var lead = addresses.lazy.filter { $0.isIPv6 == leadIsIPv6 }.makeIterator()
        var other = addresses.lazy.filter { $0.isIPv6 != leadIsIPv6 }.makeIterator()
        var ordered: [NetworkAddress] = []
        ordered.reserveCapacity(addresses.count)
        while ordered.count < addresses.count {
            if let address = lead.next() { ordered.append(address) }
            if let address = other.next() { ordered.append(address) }
        }
        return ordered
    }
}
