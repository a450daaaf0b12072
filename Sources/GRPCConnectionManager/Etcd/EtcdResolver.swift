import GRPCCMCalls
import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire
import Logging

/// Endpoints registered in etcd, for `etcd:///name` targets: every key under the prefix `name/`, read with a Range and
/// watched with etcd's bidirectional Watch stream, through this package's own client (no etcd library).
///
/// Values are what grpc-go's endpoints manager writes (`{"Op":0,"Addr":"10.0.0.7:50051","Metadata":...}`), so Go
/// services registered with it are found; the address must be numeric (`ip:port`, `[v6]:port`). A value that is not
/// such an address is skipped; when none is left the resolution fails and the pool keeps its last good addresses. A
/// change under the prefix makes the pool resolve again at once (within `minimumResolutionInterval`); a watch that
/// breaks (etcd going away) is opened again every second, and periodic resolution goes on meanwhile.
final class EtcdResolver: AddressResolver {
    let settings: Configuration.Etcd
    /// One client channel to etcd per loop (the pool's calls back come on that loop).
    private let clients = PThreadLock<[ObjectIdentifier: GRPCChannel]>([:])
    private let watchers = PThreadLock<[EtcdWatcher]>([])

    init(settings: Configuration.Etcd) {
        self.settings = settings
    }

    deinit {
        for watcher in self.watchers.withLock({ $0 }) { watcher.stop() }
        for client in self.clients.withLock({ Array($0.values) }) { client.close() }
    }

    private func client(on reactor: Reactor) throws -> GRPCChannel {
        if let existing = self.clients.withLock({ $0[ObjectIdentifier(reactor)] }) { return existing }
        var configuration = Configuration()
        configuration.enableCircuitBreaker = false
        configuration.enableLogging = false
        configuration.dns.resolver = .system
        let client = try GRPCChannel(
            target: self.settings.endpoints[0], configuration: configuration,
            logger: Logger(label: "grpc-cm-etcd", factory: { _ in SwiftLogNoOpLogHandler() }), metricsFactory: nil,
            interceptors: [], loops: [reactor])
        return self.clients.withLock { clients in
            if let raced = clients[ObjectIdentifier(reactor)] { return raced }
            clients[ObjectIdentifier(reactor)] = client
            return client
        }
    }

    func resolve(
        _ target: Target, on reactor: Reactor,
        completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
    ) {
        guard case .etcd(let name) = target.kind else {
            _ = reactor.execute { completion(.failure(CallStatus(code: .internal, message: "\(target) is not an etcd target"))) }
            return
        }
        let client: GRPCChannel
        do {
            client = try self.client(on: reactor)
        } catch {
            _ = reactor.execute { completion(.failure(CallStatus(code: .unavailable, message: "etcd: \(error)"))) }
            return
        }
        let prefix = name + "/"
        client.unary(
            path: EtcdMessages.rangePath, request: EtcdMessages.rangeRequest(prefix: prefix),
            options: RequestOptions(timeout: self.settings.timeout)
        ) { response in
            completion(Self.addresses(response, prefix: prefix, endpoint: self.settings.endpoints[0]))
        }
    }

    /// The addresses a Range answer holds, or why there are none.
    static func addresses(_ response: UnaryResponse, prefix: String, endpoint: String) -> Result<[NetworkAddress], CallStatus> {
        guard response.status.isOK else {
            return .failure(
                CallStatus(
                    code: .unavailable,
                    message: "etcd at \(endpoint): Range of \(prefix) failed: \(response.status.code): \(response.status.message)"))
        }
        guard let (_, pairs) = EtcdMessages.rangeResponse(response.message) else {
            return .failure(CallStatus(code: .unavailable, message: "etcd at \(endpoint): malformed Range response"))
        }
        var addresses: [NetworkAddress] = []
        var unusable: [String] = []
        for (key, value) in pairs {
            guard let text = EtcdMessages.endpointAddress(value), let parsed = try? Target(parsing: text),
                let address = parsed.numericAddresses?.first, case .hostPort = parsed.kind
            else {
                unusable.append(key)
                continue
            }
            if !addresses.contains(address) { addresses.append(address) }
        }
        if addresses.isEmpty {
            let detail = unusable.isEmpty ? "no endpoint is registered" : "no value is an address (keys \(unusable))"
            return .failure(CallStatus(code: .unavailable, message: "etcd at \(endpoint): under \(prefix) \(detail)"))
        }
        return .success(addresses)
    }

    func watch(_ target: Target, on reactor: Reactor, changed: @escaping @Sendable () -> Void) {
        guard case .etcd(let name) = target.kind, let client = try? self.client(on: reactor) else { return }
        let watcher = EtcdWatcher(client: client, reactor: reactor, prefix: name + "/", changed: changed)
        self.watchers.withLock { $0.append(watcher) }
        watcher.start()
    }
}

/// One Watch stream over a key prefix; reopened a second after it ends, until stopped. Loop thread, except `stop()`.
/// `@unchecked Sendable`: `call` and `stopped` are behind the lock; the rest is immutable.
final class EtcdWatcher: @unchecked Sendable {
    private let client: GRPCChannel
    private let reactor: Reactor
    private let prefix: String
    private let changed: @Sendable () -> Void
    private let state = PThreadLock<(call: StreamingCall?, stopped: Bool)>((nil, false))

    init(client: GRPCChannel, reactor: Reactor, prefix: String, changed: @escaping @Sendable () -> Void) {
        self.client = client
        self.reactor = reactor
        self.prefix = prefix
        self.changed = changed
    }

    func start() {
        guard !self.state.withLock({ $0.stopped }) else { return }
        let callbacks = StreamingCallbacks(
            onMessage: { [weak self] message in
                guard let self else { return }
                let (events, canceled) = EtcdMessages.watchResponse(message)
                if events > 0 || canceled { self.changed() }
            },
            onFinish: { [weak self] _ in
                // etcd went away (or cancelled the watch): what changed meanwhile is unknown, so resolve again, and
                // watch again in a second.
                guard let self, !self.state.withLock({ $0.stopped }) else { return }
                self.changed()
                _ = self.reactor.schedule(afterNanoseconds: 1_000_000_000) { [weak self] in self?.start() }
            })
        let call = self.client.bidirectionalStreaming(path: EtcdMessages.watchPath, callbacks: callbacks)
        _ = call.send(EtcdMessages.watchCreateRequest(prefix: self.prefix, startRevision: 0))
        self.state.withLock { $0.call = call }
    }

    func stop() {
        let call = self.state.withLock { state -> StreamingCall? in
            state.stopped = true
            return state.call
        }
        call?.cancel()
    }
}
