import ArgumentParser
import GRPCConnectionManager
import GRPCEchoServer
import CReactor

#if canImport(Glibc)
import Glibc
#endif

/// `grpc-cm serve`: the embedded echo server until SIGINT or SIGTERM.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the embedded echo server until SIGINT/SIGTERM.",
        discussion: """
            Any method echoes the request; grpc.health.v1.Health/Check answers SERVING. Test metadata: \
            x-fail-code/x-fail-message (answer with that status), x-sleep-ms (answer later), \
            x-response-bytes (answer N bytes).
            """
    )

    @Option(help: "Port to listen on (0 picks a free one).")
    var port: Int = 50051

    @Option(help: "Numeric address to bind, or unix:/path.")
    var host: String = "127.0.0.1"

    @Option(help: "SETTINGS_MAX_CONCURRENT_STREAMS announced to clients.")
    var maxConcurrentStreams: Int = 100

    func validate() throws {
        guard (0...65535).contains(self.port) else { throw ValidationError("--port must be 0...65535") }
        guard self.maxConcurrentStreams > 0 else { throw ValidationError("--max-concurrent-streams must be > 0") }
    }

    func run() async throws {
        cr_install_stop_signals()

        var options = EchoServer.Options()
        options.maxConcurrentStreams = self.maxConcurrentStreams
        let server: EchoServer
        do {
            server = try EchoServer(host: self.host, port: self.port, options: options)
        } catch {
            writeStderr("error: cannot serve on \(self.host):\(self.port): \(error)\n")
            throw ExitCode(1)
        }
        writeStderr("grpc-cm echo server listening on \(server.address)\n")
        while cr_stop_signal_received() == 0 {
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
        writeStderr("grpc-cm: signal \(cr_stop_signal_received()), shutting down\n")
        server.close()
    }
}
