import ArgumentParser
import GRPCConnectionManager

#if canImport(Glibc)
import Glibc
#endif

/// `grpc-cm`: calls, serves and probes gRPC with the connection manager. Flags follow grpcurl and
/// grpc_health_probe.
struct GRPCCM: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "grpc-cm",
        abstract: "Make gRPC calls through grpc-connection-manager, or serve the embedded echo server.",
        version: GRPCConnectionManagerVersion.string,
        subcommands: [Call.self, Health.self, Serve.self]
    )
}

/// Exit codes: ArgumentParser's own usage code (64) would collide with grpcurl's 64 + status code, so parse errors
/// are caught here and exit 2, like grpcurl's usage errors.
@main
enum Main {
    /// `health` reads its flags as grpc_health_probe does, with Go's `flag` package, which the argument parser does
    /// not: `--name` is `-name`; a boolean flag takes `=true` or `=false` (and Go's other spellings); and a probe
    /// writes `-service=` for the whole server, an empty value glued to its flag, which the parser would read as a
    /// flag without a value, so it is split into the flag and an empty argument. Only an empty value: the first `=`
    /// is the last character (`-rpc-header=authorization: Basic dXNlcjpwdw==` is a value ending in `=`).
    static func arguments(_ raw: [String]) -> [String] {
        if raw.first == "call" {
            // grpcurl's flags are Go flags too: `-plaintext`, `-max-time 2`, `-insecure` are ours with two dashes.
            return raw.map { argument in
                guard argument.hasPrefix("-"), !argument.hasPrefix("--"),
                    Call.longOptionNames.contains(String(argument.dropFirst().prefix { $0 != "=" }))
                else { return argument }
                return "-" + argument
            }
        }
        guard raw.first == "health" else { return raw }
        var result = [raw[0]]
        for argument in raw.dropFirst() {
            guard argument.hasPrefix("-"), argument.count > 2 else {
                result.append(argument)
                continue
            }
            let flag = argument.hasPrefix("--") && Health.probeFlags.contains(String(argument.dropFirst(2).prefix { $0 != "=" }))
                ? String(argument.dropFirst()) : argument
            let name = String(flag.dropFirst().prefix { $0 != "=" })
            if Health.probeBooleans.contains(name), let equals = flag.firstIndex(of: "=") {
                switch flag[flag.index(after: equals)...] {
                case "1", "t", "T", "TRUE", "true", "True": result.append("-" + name)
                case "0", "f", "F", "FALSE", "false", "False": break
                default: result.append(flag)  // the parser refuses it, naming the flag
                }
            } else if flag.firstIndex(of: "=") == flag.index(before: flag.endIndex) {
                result += [String(flag.dropLast()), ""]
            } else {
                result.append(flag)
            }
        }
        return result
    }

    static func main() async {
        let command: any ParsableCommand
        do {
            command = try GRPCCM.parseAsRoot(Self.arguments(Array(CommandLine.arguments.dropFirst())))
        } catch {
            let code = GRPCCM.exitCode(for: error)
            let message = GRPCCM.fullMessage(for: error)
            if code == .success {
                print(message)
                exit(0)
            }
            writeStderr(message + "\n")
            // grpc_health_probe exits 1 on bad arguments; grpcurl (and `call`) exit 2.
            exit(CommandLine.arguments.dropFirst().first == "health" ? 1 : 2)
        }
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                var syncCommand = command
                try syncCommand.run()
            }
            exit(0)
        } catch let exitCode as ExitCode {
            exit(exitCode.rawValue)
        } catch let error as ValidationError {
            writeStderr("error: \(error.message)\n")
            exit(CommandLine.arguments.dropFirst().first == "health" ? 1 : 2)
        } catch {
            // `--help`, `-h` and `help [command]` parse into the parser's own help command, whose run() throws the
            // help request: print the help, exit 0 (as ArgumentParser's own `main()` would).
            if GRPCCM.exitCode(for: error) == .success {
                print(GRPCCM.fullMessage(for: error))
                exit(0)
            }
            writeStderr("error: \(error)\n")
            exit(1)
        }
    }
}

func writeStderr(_ text: String) {
    var bytes = Array(text.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}

/// Writes all of `bytes` to standard output; throws `ExitCode(1)` after saying why when it cannot (a full disk, a
/// closed pipe: SIGPIPE is ignored), so that a lost response never exits 0.
func writeStdout(_ bytes: [UInt8]) throws {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(1, $0.baseAddress! + offset, $0.count - offset) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 {
            writeStderr("error: cannot write the output: \(String(cString: strerror(n < 0 ? errno : EIO)))\n")
            throw ExitCode(1)
        }
        offset += n
    }
}

import Synchronization

/// A Bool behind an atomic.
final class LockedBool: Sendable {
    private let atomic = Atomic<Bool>(false)
    func set() { self.atomic.store(true, ordering: .releasing) }
    func get() -> Bool { self.atomic.load(ordering: .acquiring) }
}
