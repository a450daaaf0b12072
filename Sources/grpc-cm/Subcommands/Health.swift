import ArgumentParser
import CStopSignals
import GRPCConnectionManager
import Synchronization

/// `grpc-cm health`: a drop-in for grpc_health_probe in a Kubernetes exec probe. Its flags (single dash, Go
/// durations; grpc-cm's own double-dash spellings are accepted beside them), its defaults (plaintext unless `-tls`; 1 s to connect, then 1 s for the RPC), its messages and its
/// exit codes: 0 serving, 1 bad arguments, 2 connection failure, 3 RPC failure, 4 not serving.
struct Health: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a server's health (grpc.health.v1.Health/Check) with grpc_health_probe's flags and exit codes.",
        discussion: """
            grpc-cm health -addr=localhost:5000 [-service=NAME] [-connect-timeout=1s] [-rpc-timeout=1s] [-tls ...]

            Exit status: 0 SERVING, 1 bad flags or arguments, 2 connection failure (including the connect \
            timeout), 3 RPC failure (e.g. NOT_FOUND for an unknown service, UNIMPLEMENTED, DEADLINE_EXCEEDED), \
            4 not serving. An address without a host (":5000") means localhost, as in grpc_health_probe.
            """
    )

    @Option(name: [.customLong("addr", withSingleDash: true), .customLong("addr")], help: "Address of the server: host:port, [v6]:port, :port or unix:/path.")
    var addr: String?

    @Argument(help: .hidden)
    var positionalAddress: String?

    @Option(name: [.customLong("service", withSingleDash: true), .customLong("service")], help: "The service to ask about (default: the whole server).")
    var service: String = ""

    @Option(name: [.customLong("connect-timeout", withSingleDash: true), .customLong("connect-timeout")], help: "Time to connect, as a Go duration (1s, 250ms).")
    var connectTimeout: String = "1s"

    @Option(name: [.customLong("rpc-timeout", withSingleDash: true), .customLong("rpc-timeout"), .customLong("max-time")], help: "Time for the health RPC once connected (Go duration).")
    var rpcTimeout: String = "1s"

    @Option(name: [.customLong("user-agent", withSingleDash: true), .customLong("user-agent")], help: "User-Agent prefix of the request.")
    var userAgent: String = "grpc_health_probe"

    @Option(name: [.customLong("rpc-header", withSingleDash: true), .customLong("rpc-header")], help: "Extra request metadata 'name: value' (repeatable).")
    var rpcHeaders: [String] = []

    @Flag(name: [.customLong("tls", withSingleDash: true), .customLong("tls")], help: "Use TLS (default: plaintext h2c).")
    var tls = false

    @Option(name: [.customLong("tls-ca-cert", withSingleDash: true), .customLong("cacert")], help: "PEM file of CA certificates to trust instead of the system store.")
    var tlsCACert: String?

    @Option(name: [.customLong("tls-client-cert", withSingleDash: true), .customLong("cert")], help: "PEM file of the client certificate chain (mutual TLS).")
    var tlsClientCert: String?

    @Option(name: [.customLong("tls-client-key", withSingleDash: true), .customLong("key")], help: "PEM file of the client private key (mutual TLS).")
    var tlsClientKey: String?

    @Flag(name: [.customLong("tls-no-verify", withSingleDash: true), .customLong("insecure")], help: "Do not verify the server's certificate.")
    var tlsNoVerify = false

    @Option(name: [.customLong("tls-server-name", withSingleDash: true), .customLong("servername")], help: "Name for SNI and verification (default: the address's host).")
    var tlsServerName: String?

    @Flag(name: .customShort("v"), help: "Verbose: print the connection and RPC timings (on stderr).")
    var verbose = false

    @Flag(name: .customLong("gzip", withSingleDash: true), help: "Compress the request with gzip.")
    var gzip = false

    @Flag(name: .customLong("version", withSingleDash: true), help: "Print the version and exit.")
    var printVersion = false

    /// grpc_health_probe's flags, which Go's flag parser also takes with two dashes (`GRPCCM.arguments`).
    static let probeFlags: Set<String> = [
        "addr", "service", "connect-timeout", "rpc-timeout", "user-agent", "rpc-header", "tls", "tls-ca-cert",
        "tls-client-cert", "tls-client-key", "tls-no-verify", "tls-server-name", "v", "gzip", "version", "alts",
        "spiffe",
    ]
    /// The boolean ones, which Go lets take `=true` and `=false`.
    static let probeBooleans: Set<String> = ["tls", "tls-no-verify", "v", "gzip", "version", "alts", "spiffe"]

    /// A string flag given empty counts as not given, as grpc_health_probe compares its flags with "": templated
    /// probe arguments (`-tls-server-name=$(NAME)`) often expand to nothing.
    private static func given(_ value: String?) -> String? { value?.isEmpty == false ? value : nil }

    /// The TLS flags that name something, each nil when not given or given empty.
    private var tlsFiles: (caCert: String?, clientCert: String?, clientKey: String?, serverName: String?) {
        (Self.given(self.tlsCACert), Self.given(self.tlsClientCert), Self.given(self.tlsClientKey),
         Self.given(self.tlsServerName))
    }

    @Flag(help: "Plaintext h2c (the default; accepted for grpc-cm's earlier spelling).")
    var plaintext = false

    /// The address to dial: `-addr`, or the positional argument (grpc-cm's earlier form); `:port` means localhost.
    var target: String? {
        guard let address = Self.given(self.addr) ?? self.positionalAddress else { return nil }
        return address.hasPrefix(":") ? "localhost" + address : address
    }

    func validate() throws {
        if self.printVersion { return }
        let (tlsCACert, tlsClientCert, tlsClientKey, tlsServerName) = self.tlsFiles
        if self.target == nil { throw ValidationError("-addr not specified") }
        if self.addr != nil && self.positionalAddress != nil { throw ValidationError("give the address once, with -addr") }
        if self.plaintext && self.tls { throw ValidationError("--plaintext and -tls exclude each other") }
        for (flag, text) in [("-connect-timeout", self.connectTimeout), ("-rpc-timeout", self.rpcTimeout)]
        where (GoDuration.parse(text) ?? .zero) <= .zero {
            throw ValidationError("\(flag) must be a positive duration such as 1s or 250ms, not \"\(text)\"")
        }
        if !self.tls && (tlsCACert != nil || tlsClientCert != nil || tlsClientKey != nil || self.tlsNoVerify
            || tlsServerName != nil)
        {
            throw ValidationError("specified -tls-* flags without -tls")
        }
        if (tlsClientCert == nil) != (tlsClientKey == nil) {
            throw ValidationError("-tls-client-cert and -tls-client-key go together")
        }
        if self.tlsNoVerify && tlsCACert != nil {
            throw ValidationError("cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)")
        }
        if self.tlsNoVerify && tlsServerName != nil {
            throw ValidationError("cannot specify -tls-server-name with -tls-no-verify (server name would not be used)")
        }
        _ = try parseMetadataHeaders(self.rpcHeaders, flag: "-rpc-header", as: .grpcHealthProbe)
    }

    func run() async throws {
        if self.printVersion {
            print(GRPCConnectionManagerVersion.string)
            return
        }
        let target = self.target!
        let connectTimeout = GoDuration.parse(self.connectTimeout)!
        let rpcTimeout = GoDuration.parse(self.rpcTimeout)!
        var configuration = Configuration()
        configuration.minConnectTimeout = connectTimeout
        configuration.userAgentPrefix = self.userAgent
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        if self.gzip { configuration.compression.requestEncoding = .gzip }
        if self.tls {
            let (tlsCACert, tlsClientCert, tlsClientKey, tlsServerName) = self.tlsFiles
            configuration.tls = cliTLSSettings(
                caFile: tlsCACert, certificate: tlsClientCert, key: tlsClientKey,
                serverName: tlsServerName, verify: !self.tlsNoVerify)
        }
        let metadata = try parseMetadataHeaders(self.rpcHeaders, flag: "-rpc-header", as: .grpcHealthProbe)
        // As grpc_health_probe: SIGINT (or SIGTERM) cancels the probe, which then fails where it was (2 while
        // connecting, 3 during the RPC) rather than the process dying of the signal.
        css_install_stop_signals()
        let channel: GRPCChannel
        do {
            channel = try GRPCChannel(target: target, configuration: configuration)
        } catch {
            writeStderr("error: \(error)\n")
            throw ExitCode(1)
        }

        // First the connection, within -connect-timeout (grpc_health_probe dials with a blocking deadline).
        let started = ContinuousClock.now
        let outcome = ConnectOutcome()
        let token = channel.events.subscribe { event in
            switch event {
            case .connectAttemptSucceeded: outcome.set(nil)
            case .connectAttemptFailed(_, _, _, let error, _): outcome.set(error.message)
            default: break
            }
        }
        defer { channel.events.unsubscribe(token) }
        channel.connect()
        let deadline = started + connectTimeout
        while !outcome.connected && ContinuousClock.now < deadline && css_stop_signal_count() == 0 {
            try? await Task.sleep(for: .milliseconds(2))
        }
        guard outcome.connected else {
            if css_stop_signal_count() > 0 {
                writeStderr("cancellation received\n")
                writeStderr("error: failed to connect service at \"\(target)\": context canceled\n")
            } else if let reason = outcome.lastError {
                writeStderr("error: failed to connect service at \"\(target)\": \(reason)\n")
            } else {
                writeStderr("timeout: failed to connect service \"\(target)\" within \(self.connectTimeout)\n")
            }
            throw ExitCode(2)
        }
        let connectedAt = ContinuousClock.now
        if self.verbose { writeStderr("establishing connection took \(GoDuration.format(connectedAt - started))\n") }

        // Then the RPC, within -rpc-timeout.
        do {
            let service = self.service
            let status = try await cancellingOnStopSignal {
                try await channel.checkHealth(service, metadata: metadata, timeout: rpcTimeout)
            }
            if self.verbose {
                let connect = GoDuration.format(connectedAt - started)
                writeStderr("time elapsed: connect=\(connect) rpc=\(GoDuration.format(ContinuousClock.now - connectedAt))\n")
            }
            if status != .serving {
                writeStderr("service unhealthy (responded with \"\(status)\")\n")
                throw ExitCode(4)
            }
            // grpc_health_probe says it with Go's log package, on stderr: its stdout stays empty.
            writeStderr("status: \(status)\n")
        } catch let error as CallError {
            if css_stop_signal_count() > 0 { writeStderr("cancellation received\n") }
            switch error.code {
            case .unimplemented:
                writeStderr("error: this server does not implement the grpc health protocol (grpc.health.v1.Health): \(error.message)\n")
            case .deadlineExceeded:
                writeStderr("timeout: health rpc did not complete within \(self.rpcTimeout)\n")
            default:
                writeStderr("error: health rpc failed: rpc error: code = \(error.code.name) desc = \(error.message)\n")
            }
            throw ExitCode(3)
        }
    }
}

/// What the connection attempts said, from the bus (reactor thread) to the waiting command.
private final class ConnectOutcome: Sendable {
    private let state = Mutex<(connected: Bool, lastError: String?)>((false, nil))

    func set(_ error: String?) {
        self.state.withLock { state in
            if let error { state.lastError = error } else { state.connected = true }
        }
    }

    var connected: Bool { self.state.withLock { $0.connected } }
    var lastError: String? { self.state.withLock { $0.lastError } }
}

/// Go's `time.ParseDuration` for what probes write: a sequence of decimal numbers with units (ns, us, µs, ms, s, m,
/// h), e.g. "1s", "250ms", "1m30s", "1.5s"; a bare number is seconds (grpc-cm's earlier `--max-time 1`).
enum GoDuration {
    static func parse(_ text: String) -> Duration? {
        var rest = Substring(text)
        guard !rest.isEmpty else { return nil }
        if let seconds = Double(rest) { return nanoseconds(seconds * 1e9) }
        var total: Double = 0
        while !rest.isEmpty {
            let number = rest.prefix { $0.isNumber || $0 == "." }
            guard !number.isEmpty, let value = Double(number) else { return nil }
            rest = rest.dropFirst(number.count)
            let unit = rest.prefix { !($0.isNumber || $0 == ".") }
            rest = rest.dropFirst(unit.count)
            let scale: Double
            switch unit {
            case "ns": scale = 1
            case "us", "µs": scale = 1e3
            case "ms": scale = 1e6
            case "s": scale = 1e9
            case "m": scale = 60e9
            case "h": scale = 3600e9
            default: return nil
            }
            total += value * scale
        }
        return nanoseconds(total)
    }

    /// `duration` as Go's `time.Duration` prints it, which grpc_health_probe's `-v` shows: "812ns", "2.5µs",
    /// "2.812345ms", "1.5s", "1m30s" (the fraction without trailing zeros).
    static func format(_ duration: Duration) -> String {
        let nanos = max(duration.nanoseconds, 0)
        if nanos == 0 { return "0s" }
        if nanos < 1_000 { return "\(nanos)ns" }
        func decimal(_ value: Int64, _ unit: Int64) -> String {
            let whole = value / unit
            var fraction = String(value % unit)
            fraction = String(repeating: "0", count: String(unit).count - 1 - fraction.count) + fraction
            while fraction.hasSuffix("0") { fraction.removeLast() }
            return fraction.isEmpty ? "\(whole)" : "\(whole).\(fraction)"
        }
        if nanos < 1_000_000 { return decimal(nanos, 1_000) + "µs" }
        if nanos < 1_000_000_000 { return decimal(nanos, 1_000_000) + "ms" }
        let seconds = decimal(nanos % 60_000_000_000, 1_000_000_000) + "s"
        let minutes = nanos / 60_000_000_000
        if minutes == 0 { return seconds }
        return (minutes >= 60 ? "\(minutes / 60)h\(minutes % 60)m" : "\(minutes)m") + seconds
    }

    /// nil for what no `Duration` of nanoseconds holds (negative, NaN, infinite, past Int64), instead of a trap.
    private static func nanoseconds(_ value: Double) -> Duration? {
        guard value >= 0, value < 9.2e18 else { return nil }
        return .nanoseconds(Int64(value))
    }
}

