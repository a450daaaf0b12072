import GRPCCMCalls
import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire
import Logging

extension Configuration.Etcd {
    /// A plaintext channel to the cluster, for the resolver's Range and Watch calls and the registration's lease:
    /// every endpoint is an address of it, connected and used in turn (round_robin), as etcd's own client balances
    /// over its endpoints. A member that is down is passed over; one that answers but cannot serve is left behind by
    /// the retry of a unary call, which goes to the next member, and by a stream's reopening. Every call asks for a
    /// leader (`hasleader`, as etcd's own client asks for its watches and keepalives): a member cut off from its
    /// leader then refuses at once, UNAVAILABLE, where a read or a lease call would wait for its request timeout
    /// (7 s) and outlast the call's deadline. Staying on the first member that connects (pick_first, before) kept
    /// such a member in use for ever: the watch was refused each second, and a registration's lease lapsed on the
    /// healthy majority.
    /// - Parameter configuration: The client's own settings (the endpoints become its addresses).
    func clientChannel(configuration: Configuration, logger: Logger, loops: [Reactor]) throws -> GRPCChannel {
        var configuration = configuration
        configuration.loadBalancingPolicy = .roundRobin
        configuration.enableRetry = true
        // An attempt on every member and two more, with backoffs long enough for the other members' connections to
        // be up (the one that refuses may be the first ready: retries within milliseconds all went to it); no
        // throttle: a member that refuses everything would spend the tokens, and the retries passing it would stop.
        configuration.retry.policy.maxAttempts = min(max(self.endpoints.count + 2, 4), 10)
        configuration.retry.policy.initialBackoff = .milliseconds(250)
        configuration.retry.policy.maxBackoff = .seconds(2)
        configuration.retry.throttling = nil
        return try GRPCChannel(
            target: self.endpoints[0], configuration: configuration, logger: logger, metricsFactory: nil,
            interceptors: [RequireLeader()], loops: loops, resolver: EtcdEndpointsResolver(endpoints: self.endpoints))
    }
}

/// Adds etcd's `hasleader: true` to every call: a member that knows no leader refuses it (UNAVAILABLE) instead of
/// letting it wait.
struct RequireLeader: CallInterceptor {
    func intercept(_ call: inout InterceptedCall) -> CallInterceptorDecision {
        call.metadata.replaceOrAdd("hasleader", "true")
        return .proceed
    }
}

/// The addresses of every etcd endpoint, in order: fixed when all are numeric, else each looked up with getaddrinfo
/// (on a helper thread) every time the pool resolves.
struct EtcdEndpointsResolver: BlockingAddressResolver {
    let endpoints: [String]

    func fixedAddresses(for target: Target) -> [NetworkAddress]? {
        var addresses: [NetworkAddress] = []
        for endpoint in self.endpoints {
            guard let numeric = (try? Target(parsing: endpoint))?.numericAddresses else { return nil }
            addresses.append(contentsOf: numeric)
        }
        return addresses
    }

    /// Every endpoint's addresses; a failure only when none has one (the others still serve).
    func resolve(_ target: Target) -> Result<[NetworkAddress], CallStatus> {
        var addresses: [NetworkAddress] = []
        var problems: [String] = []
        for endpoint in self.endpoints {
            let result: Result<[NetworkAddress], CallStatus>
            do {
                result = try Target(parsing: endpoint).resolveBlocking()
            } catch {
                result = .failure(CallStatus(code: .unavailable, message: "\(error)"))
            }
            switch result {
            case .success(let found): addresses += found.filter { !addresses.contains($0) }
            case .failure(let status): problems.append("\(endpoint): \(status.message)")
            }
        }
        guard addresses.isEmpty else { return .success(addresses) }
        return .failure(CallStatus(code: .unavailable, message: "no etcd endpoint resolved (\(problems.joined(separator: "; ")))"))
    }
}
