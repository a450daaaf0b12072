import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire
import Logging

extension Configuration.Etcd {
    /// A plaintext channel to the cluster, for the resolver's Range and Watch calls and the registration's lease:
    /// every endpoint is an address of it, tried in the order given (pick_first), so a member that is down, gone or
    /// silent (after 250 ms) is passed over, as etcd's own client fails over between its endpoints.
    /// - Parameter configuration: The client's own settings (the endpoints become its addresses).
    func clientChannel(configuration: Configuration, logger: Logger, loops: [Reactor]) throws -> GRPCChannel {
        var configuration = configuration
        configuration.loadBalancingPolicy = .pickFirst
        return try GRPCChannel(
            target: self.endpoints[0], configuration: configuration, logger: logger, metricsFactory: nil,
            interceptors: [], loops: loops, resolver: EtcdEndpointsResolver(endpoints: self.endpoints))
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
