import CCAres
import CReactor
import GRPCCMPool
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// DNS with c-ares on the pool's own loop: A and AAAA queries whose sockets are registered with the loop's epoll and
/// whose timeouts are loop timers, so a lookup costs no thread.
///
/// One c-ares channel per loop (a channel is not thread-safe; a loop is one thread), made on first use. A lookup
/// that no server answers fails UNAVAILABLE saying so, after `attempts` rounds of tries whose wait starts at `timeout`
/// and doubles each round (c-ares's rule; per name of the search list); an answer with no address fails like a
/// failed one (the pool keeps its last good addresses either way).
///
/// With the system's servers, a lookup first checks whether `/etc/resolv.conf` changed (a `stat`: lookups are rare)
/// and if so starts a new channel, which reads it again; the old one ends once its lookups have. c-ares 1.18 reads
/// the file only when a channel is made, and a long-lived process would ask a name server that left for ever.
package final class CAresResolver: AddressResolver {
    package struct Settings: Sendable, Hashable {
        /// Name servers as `ip` or `ip:port` (`[v6]:port`); nil: the system's (`resolvConf`, `/etc/hosts`).
        package var servers: [String]?
        /// How long one try waits for an answer.
        package var timeout: Duration
        /// Tries per server.
        package var attempts: Int
        /// The resolver configuration read when `servers` is nil, and the port its name servers listen on (tests
        /// give their own: resolv.conf has no port).
        package var resolvConf: String = "/etc/resolv.conf"
        package var resolvConfPort: UInt16 = 53

        package init(servers: [String]? = nil, timeout: Duration = .seconds(5), attempts: Int = 2) {
            self.servers = servers
            self.timeout = timeout
            self.attempts = attempts
        }
    }

    private let settings: Settings
    /// One channel per loop, made and used on that loop's thread.
    private let channels = PThreadLock<[ObjectIdentifier: CAresChannel]>([:])

    package init(settings: Settings = Settings()) {
        self.settings = settings
    }

    package func resolve(
        _ target: Target, on reactor: Reactor,
        completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
    ) {
        guard reactor.inReactorThread else {
            if !reactor.execute({ self.resolve(target, on: reactor, completion: completion) }) {
                completion(.failure(CallStatus(code: .unavailable, message: "the event loop has stopped")))
            }
            return
        }
        guard case .hostPort(let host, let port) = target.kind else {
            _ = reactor.execute { completion(.failure(CallStatus(code: .internal, message: "not a host name: \(target)"))) }
            return
        }
        let channel: CAresChannel
        do {
            // Only the system's configuration can change under us.
            let configuration = self.settings.servers == nil ? FileSignature(path: self.settings.resolvConf) : nil
            channel = try self.channels.withLock { channels in
                let existing = channels[ObjectIdentifier(reactor)]
                if let existing, existing.configuration == configuration { return existing }
                // The new channel first: if it cannot be made, the old one goes on serving.
                let made = try CAresChannel(reactor: reactor, settings: self.settings, configuration: configuration)
                existing?.retire()
                channels[ObjectIdentifier(reactor)] = made
                return made
            }
        } catch {
            let status = (error as? CallStatus) ?? CallStatus(code: .internal, message: "c-ares: \(error)")
            _ = reactor.execute { completion(.failure(status)) }
            return
        }
        channel.lookup(host: host, port: port, completion: completion)
    }

    deinit {
        // Each channel is torn down on its own loop (its fds and timer live there).
        for channel in self.channels.withLock({ Array($0.values) }) { channel.close() }
    }
}

/// Which version of a file is there: its identity, size and modification time (nil fields: it is missing).
struct FileSignature: Equatable {
    private var device: UInt64 = 0
    private var inode: UInt64 = 0
    private var size: Int64 = -1
    private var modified = timespec()

    init(path: String) {
        var info = stat()
        guard stat(path, &info) == 0 else { return }
        self.device = UInt64(info.st_dev)
        self.inode = UInt64(info.st_ino)
        self.size = Int64(info.st_size)
        self.modified = info.st_mtim
    }

    static func == (a: FileSignature, b: FileSignature) -> Bool {
        a.device == b.device && a.inode == b.inode && a.size == b.size
            && a.modified.tv_sec == b.modified.tv_sec && a.modified.tv_nsec == b.modified.tv_nsec
    }
}

/// One c-ares channel driven by one loop. `@unchecked Sendable` (through `ReactorHandler`): reactor thread only,
/// except `close()`, which hands the teardown to the loop.
final class CAresChannel: ReactorHandler, @unchecked Sendable {
    /// What one lookup waits with: the port to put on the addresses, and whom to tell.
    private final class Lookup {
        let host: String
        let port: Int
        let channel: CAresChannel
        let completion: @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
        init(
            host: String, port: Int, channel: CAresChannel,
            completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void
        ) {
            self.host = host
            self.port = port
            self.channel = channel
            self.completion = completion
        }
    }

    /// A socket of c-ares registered with the loop.
    private final class Socket: ReactorHandler, @unchecked Sendable {
        unowned(unsafe) let channel: CAresChannel
        let fd: Int32
        var registration: Reactor.Registration?
        init(channel: CAresChannel, fd: Int32) {
            self.channel = channel
            self.fd = fd
        }
        override func reactorFDReady(_ events: UInt32) {
            let readable = events & (UInt32(CR_READ) | UInt32(CR_HUP) | UInt32(CR_ERROR)) != 0
            let writable = events & UInt32(CR_WRITE) != 0
            self.channel.process(read: readable ? self.fd : ARES_SOCKET_BAD, write: writable ? self.fd : ARES_SOCKET_BAD)
        }
    }

    private static let libraryReady: Bool = ares_library_init(ARES_LIB_INIT_ALL) == ARES_SUCCESS

    private let reactor: Reactor
    /// The system configuration this channel read (nil: servers were given).
    let configuration: FileSignature?
    private var channel: ares_channel?
    private var sockets: [Int32: Socket] = [:]
    private var timer: Reactor.TimerID = 0
    /// Lookups started and not yet called back. Each holds the channel (`Lookup`), so a retired one lives until
    /// its last lookup ends.
    private var pending = 0
    /// Replaced by a channel that read a newer configuration: destroyed once no lookup is pending.
    private var retired = false

    init(reactor: Reactor, settings: CAresResolver.Settings, configuration: FileSignature?) throws(CallStatus) {
        self.reactor = reactor
        self.configuration = configuration
        super.init()
        guard Self.libraryReady else { throw CallStatus(code: .internal, message: "c-ares could not initialise") }
        var options = ares_options()
        var mask = ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES
        options.sock_state_cb = { data, fd, readable, writable in
            Unmanaged<CAresChannel>.fromOpaque(data!).takeUnretainedValue().socketChanged(fd, read: readable != 0, write: writable != 0)
        }
        options.sock_state_cb_data = Unmanaged.passUnretained(self).toOpaque()
        options.timeout = Int32(clamping: max(settings.timeout.nanoseconds / 1_000_000, 1))
        options.tries = Int32(clamping: max(settings.attempts, 1))
        // Servers given: DNS only, no search domains (a test's or an operator's server answers for the name as is).
        let lookups = strdup("b")
        defer { free(lookups) }
        let resolvConf = strdup(settings.resolvConf)
        defer { free(resolvConf) }
        if settings.servers != nil {
            mask |= ARES_OPT_LOOKUPS | ARES_OPT_DOMAINS
            options.lookups = lookups
            options.domains = nil
            options.ndomains = 0
        } else if settings.resolvConf != "/etc/resolv.conf" {
            mask |= ARES_OPT_RESOLVCONF | ARES_OPT_UDP_PORT | ARES_OPT_TCP_PORT
            options.resolvconf_path = resolvConf
            options.udp_port = settings.resolvConfPort
            options.tcp_port = settings.resolvConfPort
        }
        var channel: ares_channel?
        let rc = ares_init_options(&channel, &options, mask)
        guard rc == ARES_SUCCESS, let channel else {
            throw CallStatus(code: .internal, message: "c-ares: \(String(cString: ares_strerror(rc)))")
        }
        self.channel = channel
        ccares_send_without_sigpipe(channel)
        // The loop stopping tears the channel down with it (its sockets and timer are the loop's): otherwise a
        // lookup in flight then would keep its socket open until the resolver itself went.
        reactor.addShutdownHook(self)
        if let servers = settings.servers {
            let rc = ares_set_servers_ports_csv(channel, servers.joined(separator: ","))
            guard rc == ARES_SUCCESS else {
                ares_destroy(channel)
                self.channel = nil
                reactor.removeShutdownHook(self)
                throw CallStatus(code: .internal, message: "c-ares servers \(servers): \(String(cString: ares_strerror(rc)))")
            }
        }
    }

    /// Starts an A and AAAA lookup of `host`; `completion` runs later on the loop.
    func lookup(host: String, port: Int, completion: @escaping @Sendable (Result<[NetworkAddress], CallStatus>) -> Void) {
        guard let channel = self.channel else {
            _ = self.reactor.execute { completion(.failure(CallStatus(code: .unavailable, message: "the resolver is closed"))) }
            return
        }
        var hints = ares_addrinfo_hints()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        let box = Unmanaged.passRetained(Lookup(host: host, port: port, channel: self, completion: completion))
        self.pending += 1
        ares_getaddrinfo(channel, host, nil, &hints, { arg, status, _, result in
            let lookup = Unmanaged<Lookup>.fromOpaque(arg!).takeRetainedValue()
            let outcome = CAresChannel.outcome(status: status, result: result, host: lookup.host, port: lookup.port)
            if let result { ares_freeaddrinfo(result) }
            let completion = lookup.completion
            let channel = lookup.channel
            // Never inside c-ares's processing (or inside `lookup` for an answer from /etc/hosts).
            if !channel.reactor.execute({
                completion(outcome)
                channel.lookupEnded()
            }) {
                completion(outcome)
            }
        }, box.toOpaque())
        self.armTimer()
    }

    /// A newer channel takes the lookups from now on: this one ends once its own have.
    func retire() {
        self.retired = true
        if self.pending == 0 { self.close() }
    }

    private func lookupEnded() {
        self.pending -= 1
        if self.retired && self.pending == 0 { self.destroy() }
    }

    private static func outcome(
        status: Int32, result: UnsafeMutablePointer<ares_addrinfo>?, host: String, port: Int
    ) -> Result<[NetworkAddress], CallStatus> {
        guard status == ARES_SUCCESS else {
            let reason = String(cString: ares_strerror(status))
            if status == ARES_ETIMEOUT {
                return .failure(CallStatus(code: .unavailable, message: "DNS lookup of \(host) timed out"))
            }
            return .failure(CallStatus(code: .unavailable, message: "DNS lookup of \(host) failed: \(reason)"))
        }
        let addresses = NetworkAddress.distinct(
            from: result?.pointee.nodes, port: port, sockaddr: { UnsafePointer($0.pointee.ai_addr) },
            next: { $0.pointee.ai_next })
        if addresses.isEmpty {
            return .failure(CallStatus(code: .unavailable, message: "DNS lookup of \(host) returned no addresses"))
        }
        return .success(addresses)
    }

    /// c-ares opened, changed or closed a socket: mirror it in the loop's epoll.
    private func socketChanged(_ fd: Int32, read: Bool, write: Bool) {
        let interest = (read ? UInt32(CR_READ) : 0) | (write ? UInt32(CR_WRITE) : 0)
        if interest == 0 {
            if let socket = self.sockets.removeValue(forKey: fd), let registration = socket.registration {
                self.reactor.deregister(registration, handler: socket)
            }
            return
        }
        if let socket = self.sockets[fd], let registration = socket.registration {
            self.reactor.setInterest(registration, interest)
            return
        }
        let socket = Socket(channel: self, fd: fd)
        socket.registration = try? self.reactor.register(fd: fd, interest: interest, handler: socket)
        self.sockets[fd] = socket
    }

    fileprivate func process(read: Int32, write: Int32) {
        guard let channel = self.channel else { return }
        ares_process_fd(channel, read, write)
        self.armTimer()
    }

    /// The next c-ares timeout as a loop timer (none while nothing is pending).
    private func armTimer() {
        if self.timer != 0 {
            self.reactor.cancelTimer(self.timer)
            self.timer = 0
        }
        guard let channel = self.channel else { return }
        var wait = timeval()
        guard ares_timeout(channel, nil, &wait) != nil else { return }
        let nanos = UInt64(max(wait.tv_sec, 0)) * 1_000_000_000 + UInt64(max(wait.tv_usec, 0)) * 1000
        self.timer = self.reactor.scheduleTimer(at: Reactor.clock() &+ nanos, handler: self, tag: 0)
    }

    override func reactorTimerFired(tag: UInt64) {
        self.timer = 0
        self.process(read: ARES_SOCKET_BAD, write: ARES_SOCKET_BAD)
    }

    /// Tears the channel down on its loop (pending lookups end UNAVAILABLE), or here once the loop has stopped.
    func close() {
        if self.reactor.inReactorThread || self.reactor.isStopped {
            self.destroy()
        } else if !self.reactor.execute({ self.destroy() }) {
            self.destroy()
        }
    }

    /// The loop is stopping (a shutdown hook).
    override func reactorRunSubmitted() {
        self.destroy()
    }

    private func destroy() {
        guard let channel = self.channel else { return }
        self.channel = nil
        if !self.reactor.isStopped { self.reactor.removeShutdownHook(self) }
        if self.timer != 0 {
            self.reactor.cancelTimer(self.timer)
            self.timer = 0
        }
        // Calls every pending lookup back (ARES_EDESTRUCTION) and closes its sockets through socketChanged.
        ares_destroy(channel)
        for socket in self.sockets.values {
            if let registration = socket.registration { self.reactor.deregister(registration, handler: socket) }
        }
        self.sockets.removeAll()
    }
}
