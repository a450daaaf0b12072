import ArgumentParser
import GRPCConnectionManager

/// `grpc-cm health`: grpc_health_probe's job and exit codes (0 serving, 1 bad arguments, 2 connection failure,
/// 3 RPC failure, 4 not serving).
struct Health: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a server's health (grpc.health.v1.Health/Check), with grpc_health_probe's exit codes.",
        discussion: """
            Exit status: 0 SERVING, 1 bad flags or arguments, 2 connection failure, 3 RPC failure \
            (e.g. NOT_FOUND for an unknown service, UNIMPLEMENTED, DEADLINE_EXCEEDED), 4 not serving.
            """
    )

    @Argument(help: "host:port, [v6]:port or unix:/path")
    var target: String

    @Option(help: "The service to ask about (default: the whole server).")
    var service: String = ""

    @Option(name: .customLong("max-time"), help: "Deadline of the check in seconds.")
    var maxTime: Double = 1

    @Option(name: .customLong("connect-timeout"), help: "Bound on the connection attempt in seconds.")
    var connectTimeout: Double = 1

    @OptionGroup(title: "Transport security")
    var security: TLSOptions

    func validate() throws {
        if !(self.maxTime > 0) { throw ValidationError("--max-time must be > 0") }
        if !(self.connectTimeout > 0) { throw ValidationError("--connect-timeout must be > 0") }
    }

    func run() async throws {
        var configuration = Configuration()
        configuration.minConnectTimeout = .nanoseconds(Int64(self.connectTimeout * 1e9))
        configuration.tls = self.security.configuration
        let channel: GRPCChannel
        do {
            channel = try GRPCChannel(target: self.target, configuration: configuration)
        } catch {
            writeStderr("error: \(error)\n")
            throw ExitCode(1)
        }
        // The bus tells whether the connection ever came up: a failure before that is a connection failure.
        let connected = LockedBool()
        let token = channel.events.subscribe { event in
            if case .connectAttemptSucceeded = event { connected.set() }
        }
        defer { channel.events.unsubscribe(token) }
        do {
            let status = try await channel.checkHealth(self.service, timeout: .nanoseconds(Int64(self.maxTime * 1e9)))
            print("status: \(status)")
            if status != .serving { throw ExitCode(4) }
        } catch let error as RPCError {
            if !connected.get() {
                writeStderr("error: failed to connect to \(self.target): \(error.message)\n")
                throw ExitCode(2)
            }
            if error.code == .unimplemented {
                writeStderr("error: this server does not implement the grpc health protocol (grpc.health.v1.Health): \(error.message)\n")
            } else {
                writeStderr("error: health rpc failed: \(error.code.name): \(error.message)\n")
            }
            throw ExitCode(3)
        }
    }
}

