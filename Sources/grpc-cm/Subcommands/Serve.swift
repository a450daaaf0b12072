import ArgumentParser
import GRPCConnectionManager
import GRPCEchoServer
import CStopSignals

#if canImport(Glibc)
import Glibc
#endif

/// `grpc-cm serve`: the embedded echo server until SIGINT or SIGTERM.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the embedded echo server until SIGINT/SIGTERM (then a graceful stop: GOAWAY, calls finish).",
        discussion: """
            Any method echoes the request (methods named Expand, Collect and Update stream: a response per \
            space-separated word of each request, one for all the requests joined, one per request as it comes); grpc.health.v1.Health/Check answers \
            SERVING. Test metadata: x-fail-code (a number or a name such as UNAVAILABLE) and x-fail-message \
            (answer with that status), x-sleep-ms (answer later), x-response-bytes (answer N bytes).
            """
    )

    @Option(help: "Port to listen on (0 picks a free one).")
    var port: Int = 50051

    @Option(help: "Numeric address to bind, or unix:/path.")
    var host: String = "127.0.0.1"

    @Option(help: "SETTINGS_MAX_CONCURRENT_STREAMS announced to clients.")
    var maxConcurrentStreams: Int = 100

    @Option(name: .customLong("tls-cert"), help: "Serve TLS with this PEM certificate chain.")
    var tlsCert: String?

    @Option(name: .customLong("tls-key"), help: "The PEM private key for --tls-cert.")
    var tlsKey: String?

    @Option(name: .customLong("client-ca"), help: "Require client certificates signed by this PEM CA (mutual TLS).")
    var clientCA: String?

    @Option(
        name: .customLong("grace-period"),
        help: "On SIGINT/SIGTERM, seconds for the calls under way to finish after GOAWAY (a second signal: at once).")
    var gracePeriod: Double = 5

    func validate() throws {
        guard (0...65535).contains(self.port) else { throw ValidationError("--port must be 0...65535") }
        guard (0...86_400).contains(self.gracePeriod) else { throw ValidationError("--grace-period must be 0...86400 seconds") }
        guard (1...Int(UInt32.max)).contains(self.maxConcurrentStreams) else {
            throw ValidationError("--max-concurrent-streams must be 1...4294967295")
        }
        if (self.tlsCert == nil) != (self.tlsKey == nil) { throw ValidationError("--tls-cert and --tls-key go together") }
        if self.clientCA != nil && self.tlsCert == nil { throw ValidationError("--client-ca needs --tls-cert and --tls-key") }
    }

    func run() async throws {
        css_install_stop_signals()

        var options = EchoServer.Options()
        options.maxConcurrentStreams = self.maxConcurrentStreams
        options.tlsCertificateChain = self.tlsCert
        options.tlsPrivateKey = self.tlsKey
        options.tlsClientCA = self.clientCA
        let server: EchoServer
        do {
            server = try EchoServer(host: self.host, port: self.port, options: options)
        } catch {
            let place = self.host.hasPrefix("unix:") ? self.host : "\(self.host):\(self.port)"
            writeStderr("error: cannot serve on \(place): \(error)\n")
            throw ExitCode(1)
        }
        writeStderr("grpc-cm echo server listening on \(server.address)\(self.tlsCert == nil ? "" : " (TLS)")\n")
        // A plain sleep, not Task.sleep: that puts the concurrency runtime's dispatch threads to work, and
        // libdispatch's thread-pool monitor traps the whole process when it cannot open a /proc file, which is what
        // happens while the server has run out of fds (its accept loop rides that out; the monitor does not).
        while css_stop_signal_received() == 0 {
            usleep(50_000)
        }
        writeStderr("grpc-cm: signal \(css_stop_signal_received()), shutting down\n")
        // As a real server in a rolling restart: no new connection, GOAWAY, the calls under way finish.
        server.close(gracePeriod: .nanoseconds(Int64(self.gracePeriod * 1e9))) { css_stop_signal_count() > 1 }
    }
}
