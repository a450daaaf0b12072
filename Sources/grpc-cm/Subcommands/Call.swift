import ArgumentParser
import GRPCConnectionManager
import CStopSignals
import GRPCConnectionManagerPrometheus
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `grpc-cm call`: unary calls with raw bytes, grpcurl-style flags and exit codes (64 + status code).
struct Call: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a unary call with raw request bytes.",
        discussion: """
            Exit status: 0 on OK, 64 + the status code otherwise (grpcurl's convention), 2 for bad arguments,
            1 when no connection could be set up or established (an unreadable PEM file, a target nobody answers).
            With --repeat: 0 if every call was OK, else 64 + the last failure's code.
            """
    )

    @Argument(help: "host:port, [v6]:port or unix:/path")
    var target: String

    @Argument(help: ArgumentHelp("package.Service/Method (grpcurl's form) or /package.Service/Method", valueName: "method"))
    var methodArgument: String

    /// The HTTP/2 path: grpcurl's `pkg.Service/Method` (or `pkg.Service.Method`) gets its leading slash.
    var method: String {
        if self.methodArgument.hasPrefix("/") { return self.methodArgument }
        if self.methodArgument.contains("/") { return "/" + self.methodArgument }
        guard let dot = self.methodArgument.lastIndex(of: ".") else { return "/" + self.methodArgument }
        return "/" + self.methodArgument[..<dot] + "/" + self.methodArgument[self.methodArgument.index(after: dot)...]
    }

    @Option(name: .customLong("data-file"), help: "Read the request bytes from this file ('-' = stdin).")
    var dataFile: String?

    @Option(name: .customLong("data-hex"), help: "The request bytes as hex.")
    var dataHex: String?

    @Option(help: "Write the response bytes to this file instead of stdout.")
    var out: String?

    @Flag(help: "Print the response as lowercase hex and a newline.")
    var hex = false

    @Option(name: .customShort("H"), help: "Request metadata 'name: value' (repeatable; -bin values in base64).")
    var headers: [String] = []

    @Option(name: .customLong("user-agent"), help: "Put this in front of the client's User-Agent (so does -H 'user-agent: ...').")
    var userAgent: String?

    @Option(name: .customLong("max-time"), help: "Deadline of each call in seconds (fractional).")
    var maxTime: Double?

    @Option(name: .customLong("connect-timeout"), help: "Bound on one connection attempt, in seconds.")
    var connectTimeout: Double = 10

    @OptionGroup(title: "Transport security")
    var security: TLSOptions

    @Flag(name: .customLong("wait-for-ready"), help: "Wait for a ready connection instead of failing fast.")
    var waitForReady = false

    @Option(name: .customLong("keepalive-time"), help: "Seconds between keepalive PINGs (default 30).")
    var keepaliveTime: Double?

    @Option(name: .customLong("keepalive-timeout"), help: "Seconds a PING may go unanswered (default 5).")
    var keepaliveTimeout: Double?

    @Option(name: .customLong("max-reconnect-delay"), help: "Largest wait between reconnect attempts (default 3).")
    var maxReconnectDelay: Double?

    @Flag(name: .customLong("no-retry"), help: "Do not retry failed calls.")
    var noRetry = false

    @Flag(name: .customLong("no-breaker"), help: "Do not use the circuit breaker.")
    var noBreaker = false

    @Option(name: .customLong("retry-max-attempts"), help: "Attempts per call, the first included (default 3).")
    var retryMaxAttempts: Int?

    @Option(name: .customLong("breaker-failure-threshold"), help: "Consecutive failures that open the breaker (default 5).")
    var breakerFailureThreshold: Int?

    @Option(name: .customLong("breaker-timeout"), help: "Seconds the breaker stays open before probing (default 30).")
    var breakerTimeout: Double?

    @Option(name: .customLong("metrics-out"), help: "Write the metrics in Prometheus text format to PATH at exit.")
    var metricsOut: String?

    @Option(
        help: ArgumentHelp(
            "Compress the request with gzip or deflate (default: identity). Compressed responses are always decoded.",
            valueName: "ENCODING"))
    var compression: String?

    @Flag(name: .customShort("v"), help: "Print response headers and trailers to stderr.")
    var verbose = false

    @Option(help: "Make N calls through one client, printing one line per call.")
    var `repeat`: Int?

    @Option(help: "Seconds between the starts of repeated calls.")
    var interval: Double = 0

    @Option(name: .customLong("max-msg-sz"), help: "Largest message in bytes, sent or received (default 4194304).")
    var maxMessageSize: Int?

    /// The long options, which `GRPCCM.arguments` also takes with one dash, as grpcurl (a Go program) does.
    static let longOptionNames: Set<String> = [
        "data-file", "data-hex", "out", "hex", "max-time", "connect-timeout", "wait-for-ready", "keepalive-time",
        "keepalive-timeout", "max-reconnect-delay", "no-retry", "no-breaker", "retry-max-attempts",
        "breaker-failure-threshold", "breaker-timeout", "metrics-out", "compression", "repeat", "interval", "plaintext",
        "insecure", "cacert", "cert", "key", "servername", "max-msg-sz", "user-agent",
    ]

    /// The boolean flags, which take Go's `=true`/`=false` spellings too (`-plaintext=true`), as grpcurl's do.
    static let booleanFlagNames: Set<String> = ["hex", "wait-for-ready", "no-retry", "no-breaker", "plaintext", "insecure"]

    func validate() throws {
        if self.dataFile != nil && self.dataHex != nil {
            throw ValidationError("use either --data-file or --data-hex, not both")
        }
        if let maxTime = self.maxTime, !(maxTime > 0) { throw ValidationError("--max-time must be > 0") }
        if !(self.connectTimeout > 0) { throw ValidationError("--connect-timeout must be > 0") }
        if let count = self.repeat, count < 1 { throw ValidationError("--repeat must be at least 1") }
        if self.repeat != nil && (self.out != nil || self.hex || self.verbose) {
            throw ValidationError("--out, --hex and -v are for a single call: --repeat prints one line per call")
        }
        for (name, value) in [
            ("--keepalive-time", self.keepaliveTime), ("--keepalive-timeout", self.keepaliveTimeout),
            ("--max-reconnect-delay", self.maxReconnectDelay),
        ] {
            if let value, !(value > 0) { throw ValidationError("\(name) must be > 0") }
        }
        if let size = self.maxMessageSize, !(1...Int(Int32.max)).contains(size) {
            throw ValidationError("--max-msg-sz must be 1...\(Int32.max) bytes")
        }
        if !(0...31_536_000).contains(self.interval) { throw ValidationError("--interval must be 0...31536000 seconds") }
        if let name = self.compression, CallCompression(name: name) == nil {
            throw ValidationError("--compression must be gzip, deflate or identity")
        }
        if let attempts = self.retryMaxAttempts, !(1...10).contains(attempts) {
            throw ValidationError("--retry-max-attempts must be 1...10")
        }
        if let threshold = self.breakerFailureThreshold, threshold < 1 {
            throw ValidationError("--breaker-failure-threshold must be at least 1")
        }
        if let timeout = self.breakerTimeout, !(timeout > 0) { throw ValidationError("--breaker-timeout must be > 0") }
        // Options that would change nothing are refused rather than ignored: the user meant something by them.
        if self.interval != 0 && self.repeat == nil { throw ValidationError("--interval needs --repeat") }
        if self.noRetry && self.retryMaxAttempts != nil {
            throw ValidationError("--retry-max-attempts and --no-retry contradict each other")
        }
        if self.noBreaker && (self.breakerFailureThreshold != nil || self.breakerTimeout != nil) {
            throw ValidationError("--breaker-failure-threshold and --breaker-timeout contradict --no-breaker")
        }
        // Without a deadline, a server that never comes would be waited for until Ctrl-C.
        if self.waitForReady && self.maxTime == nil {
            throw ValidationError("--wait-for-ready needs --max-time (the longest to wait, the call included)")
        }
        let parts = self.method.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
        if parts.count != 2 || parts.contains(where: \.isEmpty) {
            throw ValidationError("METHOD must look like package.Service/Method (or /package.Service/Method)")
        }
    }

    func run() async throws {
        // The request first, with the signals' default action: Ctrl-C while stdin is read ends the program there
        // (the read runs on a thread the signal does not interrupt, so a handler would leave it waiting).
        let request = try self.readRequest()
        // Then Ctrl-C (or SIGTERM) cancels the call under way and starts no other; the metrics are still written, and
        // the exit status says which signal it was (128 + its number, as a shell reports one that killed a program).
        css_install_stop_signals()
        // grpcurl skips an empty -H (an unset "$AUTH" in a script), and puts a user-agent header in front of the
        // client's own: so does this, through userAgentPrefix (sent as a second field, servers would read ours).
        var userAgent = self.userAgent
        var headers: [String] = []
        for header in self.headers where !header[...].trimmingSpaces().isEmpty {
            let name = header.prefix { $0 != ":" }.trimmingSpaces().lowercased()
            if name == "user-agent", let colon = header.firstIndex(of: ":") {
                userAgent = header[header.index(after: colon)...].trimmingSpaces()
            } else {
                headers.append(header)
            }
        }
        let metadata = try parseMetadataHeaders(headers, flag: "-H")
        var configuration = Configuration()
        if let userAgent { configuration.userAgentPrefix = userAgent }
        configuration.minConnectTimeout = seconds(self.connectTimeout)
        configuration.tls = self.security.configuration
        if let size = self.maxMessageSize { configuration.maxMessageSize = size }
        if let value = self.keepaliveTime { configuration.keepAliveTime = seconds(value) }
        if let value = self.keepaliveTimeout { configuration.keepAliveTimeout = seconds(value) }
        if let value = self.maxReconnectDelay { configuration.maxReconnectDelay = seconds(value) }
        configuration.enableRetry = !self.noRetry
        configuration.enableCircuitBreaker = !self.noBreaker
        if let value = self.retryMaxAttempts { configuration.retry.policy.maxAttempts = value }
        if let value = self.breakerFailureThreshold { configuration.circuitBreaker.failureThreshold = value }
        if let value = self.breakerTimeout { configuration.circuitBreaker.timeout = seconds(value) }
        let metrics = PrometheusMetrics()
        configuration.enableMetrics = self.metricsOut != nil
        // One manager for the whole run: with --repeat, reconnection shows in the output.
        let manager: ConnectionManager
        let channel: GRPCChannel
        // grpcurl dials before it calls, and a dial that fails exits 1, not with the call's code: so does a call here
        // that failed without a connection ever being established. Listened for before the service is registered:
        // registering starts connecting, and a connection made before the subscription took effect went unheard.
        let connected = Mutex(false)
        do {
            // A factory passed turns the metrics handler on whatever enableMetrics says: only with --metrics-out.
            manager = try ConnectionManager(configuration: configuration, metricsFactory: self.metricsOut == nil ? nil : metrics)
            manager.events.subscribe { event in
                if case .connectAttemptSucceeded = event { connected.withLock { $0 = true } }
            }
            channel = try manager.connection(service: "grpc-cm", address: self.target)
        } catch let error as ConfigurationError where error.field == "tls" || error.field.hasPrefix("tls.") {
            // grpcurl exits 1 when it cannot set up the connection: an unreadable PEM file, a target it cannot dial.
            writeStderr("Failed to create TLS config: \(error.message)\n")
            throw ExitCode(1)
        } catch {
            writeStderr("Failed to dial target host \"\(self.target)\": \(error)\n")
            throw ExitCode(1)
        }
        // The metrics are written whatever the calls did; a failure to write them exits 1 unless a call failed.
        let outcome: Result<Void, any Error>
        do {
            try await self.makeCalls(on: channel, request: request, metadata: metadata, connected: connected)
            outcome = .success(())
        } catch {
            outcome = .failure(error)
        }
        let metricsWritten = self.writeMetrics(manager)
        let signal = css_stop_signal_received()
        if signal != 0 { throw ExitCode(128 + signal) }
        try outcome.get()
        if !metricsWritten { throw ExitCode(1) }
    }

    /// The call, or with `--repeat` the calls, with their output; throws the exit code of a failure.
    private func makeCalls(
        on channel: GRPCChannel, request: [UInt8], metadata: CallMetadata, connected: borrowing Mutex<Bool>
    ) async throws {
        var options = RequestOptions()
        options.waitForReady = self.waitForReady
        options.compression = self.compression.flatMap { CallCompression(name: $0) }
        if let maxTime = self.maxTime { options.timeout = seconds(maxTime) }

        guard let count = self.repeat else {
            let signal = css_stop_signal_received()
            if signal != 0 { throw ExitCode(128 + signal) }  // asked to stop before the call went out
            let response = await Self.callUntilSignal(channel, self.method, request, metadata, options)
            if self.verbose { Self.printVerbose(response) }
            if response.status.isOK {
                try self.writeResponse(response.message)
                return
            }
            // Blamed on the dial only when it can be the dial's failure: a request refused before it went out (too
            // large, a bad method name) is the call's, with its code.
            let dialCodes: Set<StatusCode> = [.unavailable, .deadlineExceeded]
            if !connected.withLock({ $0 }) && dialCodes.contains(response.status.code) {
                writeStderr("Failed to dial target host \"\(self.target)\": \(response.status.code.name): \(response.status.message)\n")
                throw ExitCode(1)
            }
            Self.printError(response.status)
            throw ExitCode(Int32(64 + response.status.code.rawValue))
        }

        var lastFailure: StatusCode?
        let start = monotonicNanos()
        for index in 1...count {
            let scheduled = start &+ UInt64(min(Double(index - 1) * self.interval * 1e9, 1e18))
            let now = monotonicNanos()
            if scheduled > now { await sleepUntilStopSignal(nanoseconds: scheduled - now) }
            if css_stop_signal_count() > 0 { break }
            let began = monotonicNanos()
            let response = await Self.callUntilSignal(channel, self.method, request, metadata, options)
            let latency = Double(monotonicNanos() - began) / 1e6
            let latencyText = formatMilliseconds(latency)
            // Written straight to fd 1 so that each line is visible at once, even through a pipe.
            if response.status.isOK {
                try writeStdout(Array("\(index) OK \(latencyText)\n".utf8))
            } else {
                lastFailure = response.status.code
                // One line per call, whatever the message holds.
                let message = escapingControls(response.status.message)
                try writeStdout(Array("\(index) \(response.status.code.name) \(latencyText) \(message)\n".utf8))
            }
        }
        if let code = lastFailure { throw ExitCode(Int32(64 + code.rawValue)) }
    }

    /// One call to its end, or until SIGINT/SIGTERM cancels it (it then ends CANCELLED).
    private static func callUntilSignal(
        _ channel: GRPCChannel, _ path: String, _ request: [UInt8], _ metadata: CallMetadata, _ options: RequestOptions
    ) async -> UnaryResponse {
        let response = try? await cancellingOnStopSignal {
            await channel.unaryResult(path: path, request: request, metadata: metadata, options: options)
        }
        return response ?? UnaryResponse(status: CallStatus(code: .cancelled, message: "interrupted"))
    }

    /// Writes the exposition for --metrics-out (at exit, whatever the outcome). False when it could not be written.
    private func writeMetrics(_ manager: ConnectionManager) -> Bool {
        guard let path = self.metricsOut, let text = manager.metricsText() else { return true }
        if let problem = writeFile(path, Array(text.utf8)) {
            writeStderr("error: cannot write --metrics-out \(path): \(problem)\n")
            return false
        }
        return true
    }

    private func readRequest() throws -> [UInt8] {
        if let hexText = self.dataHex {
            guard let bytes = decodeHex(hexText) else { throw ValidationError("--data-hex is not valid hex") }
            return bytes
        }
        guard let path = self.dataFile else { return [] }
        let fd = path == "-" ? 0 : open(path, O_RDONLY)
        guard fd >= 0 else { throw ValidationError("cannot read --data-file \(path): \(String(cString: strerror(errno)))") }
        defer { if fd != 0 { close(fd) } }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        // Bounded: a request over the message limit could not be sent anyway, and `/dev/zero` never ends.
        let limit = self.maxMessageSize ?? Configuration.defaults.maxMessageSize
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw ValidationError("cannot read --data-file \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
            if bytes.count > limit {
                throw ValidationError("--data-file \(path) is larger than the \(limit)-byte message limit (--max-msg-sz)")
            }
        }
        return bytes
    }

    private func writeResponse(_ bytes: [UInt8]) throws {
        let output = self.hex ? Array((encodeHex(bytes) + "\n").utf8) : bytes
        if let path = self.out {
            if let problem = writeFile(path, output) {
                writeStderr("error: cannot write \(path): \(problem)\n")
                throw ExitCode(1)
            }
        } else {
            try writeStdout(output)
        }
    }

    /// grpcurl's `-v` layout (to stderr: stdout holds the response bytes): names sorted, a name's values in the order
    /// they came, `-bin` values as padded standard base64, `(empty)` for none.
    static func printVerbose(_ response: UnaryResponse) {
        func lines(_ metadata: CallMetadata) -> String {
            if metadata.isEmpty { return "(empty)\n" }
            let sorted = metadata.enumerated().sorted { ($0.element.name, $0.offset) < ($1.element.name, $1.offset) }
            return sorted.map { _, entry in
                switch entry.value {
                case .string(let text): return "\(entry.name): \(text)\n"
                case .binary(let bytes): return "\(entry.name): \(paddedBase64(bytes))\n"
                }
            }.joined()
        }
        writeStderr(
            "\nResponse headers received:\n" + lines(response.initialMetadata)
                + "\nResponse trailers received:\n" + lines(response.trailingMetadata))
    }

    static func printError(_ status: CallStatus) {
        writeStderr("ERROR:\n  Code: \(status.code.name)\n  Message: \(status.message)\n")
    }
}

extension Substring {
    func trimmingSpaces() -> String {
        String(self.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}

/// Whose reading of `name: value` header flags to follow, for the tool each subcommand stands in for.
enum HeaderSyntax {
    /// grpcurl's `-H`: a header without a colon has an empty value; a `-bin` value is base64-decoded when it is
    /// base64, and sent as its bytes otherwise.
    case grpcurl
    /// grpc_health_probe's `-rpc-header`: the colon is required, and a `-bin` value is sent as its bytes (grpc-go
    /// base64-encodes them on the wire).
    case grpcHealthProbe
}

/// Request metadata from `name: value` flags (`call -H`, `health -rpc-header`), read as `tool` reads them: names
/// lower-cased, every entry validated. Throws a `ValidationError` naming the flag and the entry, so that a bad header
/// is a usage error, never a failed call.
func parseMetadataHeaders(_ headers: [String], flag: String, as tool: HeaderSyntax = .grpcurl) throws -> CallMetadata {
    var metadata = CallMetadata()
    for header in headers {
        let colon = header.firstIndex(of: ":")
        if colon == nil && tool == .grpcHealthProbe {
            throw ValidationError("\(flag) '\(header)': expected 'name: value'")
        }
        let name = header[..<(colon ?? header.endIndex)].trimmingSpaces().lowercased()
        guard !name.isEmpty else { throw ValidationError("\(flag) '\(header)': expected 'name: value'") }
        let value = colon.map { header[header.index(after: $0)...].trimmingSpaces() } ?? ""
        if name.hasSuffix("-bin") {
            switch tool {
            case .grpcurl: metadata.add(name, binary: decodeBase64(value) ?? Array(value.utf8))
            case .grpcHealthProbe: metadata.add(name, binary: Array(value.utf8))
            }
        } else {
            metadata.add(name, value)
        }
    }
    do {
        try metadata.validate()
    } catch {
        throw ValidationError("\(flag): \(error)")
    }
    return metadata
}

/// Writes `bytes` to `path` (created or truncated). Returns the reason when it fails.
func writeFile(_ path: String, _ bytes: [UInt8]) -> String? {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { return String(cString: strerror(errno)) }
    defer { close(fd) }
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if n <= 0 { return String(cString: strerror(errno)) }
        offset += n
    }
    return nil
}

/// Seconds as a flag gives them (validated positive), rounded up to whole nanoseconds and saturating: `inf` or `1e12`
/// means no limit in practice, not a trap, and a positive value never becomes zero (which the configuration would
/// refuse under the field's name, not the flag's).
func seconds(_ value: Double) -> Duration {
    let nanoseconds = (value * 1e9).rounded(.up)
    return nanoseconds < 9.2e18 ? .nanoseconds(Int64(nanoseconds)) : .nanoseconds(Int64.max)
}

func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func formatMilliseconds(_ value: Double) -> String {
    let thousandths = Int((value * 1000).rounded())
    let whole = thousandths / 1000
    let fraction = thousandths % 1000
    let padded = String(fraction)
    return "\(whole).\(String(repeating: "0", count: 3 - padded.count))\(padded)"
}

func decodeHex(_ text: String) -> [UInt8]? {
    let digits = Array(text.utf8.filter { $0 != UInt8(ascii: " ") })
    guard digits.count % 2 == 0 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(digits.count / 2)
    var index = 0
    while index < digits.count {
        guard let high = hexValue(digits[index]), let low = hexValue(digits[index + 1]) else { return nil }
        out.append(high << 4 | low)
        index += 2
    }
    return out
}

private func hexValue(_ byte: UInt8) -> UInt8? {
    switch byte {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
    default: return nil
    }
}

func encodeHex(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count * 2)
    for byte in bytes {
        out.append(digits[Int(byte >> 4)])
        out.append(digits[Int(byte & 0xF)])
    }
    return String(decoding: out, as: UTF8.self)
}

/// `text` with its control characters and line breaks escaped (`\n`, `\r`, `\t`, else `\u{XX}`), so that it stays on
/// one line whatever a server put in it.
func escapingControls(_ text: String) -> String {
    var out = ""
    for scalar in text.unicodeScalars {
        switch scalar.value {
        case 0x0A: out += "\\n"
        case 0x0D: out += "\\r"
        case 0x09: out += "\\t"
        case 0..<0x20, 0x7F, 0x85, 0x2028, 0x2029: out += "\\u{" + String(scalar.value, radix: 16) + "}"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

/// Standard base64 with `=` padding, as grpcurl prints `-bin` values (the wire form is unpadded).
func paddedBase64(_ bytes: [UInt8]) -> String {
    let text = Base64.encode(bytes)
    return text + String(repeating: "=", count: (4 - text.utf8.count % 4) % 4)
}

func decodeBase64(_ text: String) -> [UInt8]? {
    Base64.decode(Array(text.utf8))
}
