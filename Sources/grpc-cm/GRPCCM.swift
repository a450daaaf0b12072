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
    /// grpcurl and grpc_health_probe are Go programs, whose flags follow Go's `flag` package; the argument parser's
    /// do not. Their spellings are rewritten here into the parser's, before parsing.
    static func arguments(_ raw: [String]) -> [String] {
        switch raw.first {
        case "call": return [raw[0]] + raw.dropFirst().compactMap(Self.callArgument)
        case "health": return [raw[0]] + Self.healthArguments(Array(raw.dropFirst()))
        default: return raw
        }
    }

    /// grpcurl's single-dash long options (`-plaintext`, `-max-time 2`) are ours with two dashes, and its boolean
    /// flags take Go's spellings of a value (`-plaintext=true`; `=false` leaves the flag out). nil: left out.
    private static func callArgument(_ argument: String) -> String? {
        guard argument.hasPrefix("-"), argument.count >= 2 else { return argument }
        let dashes = argument.hasPrefix("--") ? 2 : 1
        let name = String(argument.dropFirst(dashes).prefix { $0 != "=" })
        guard Call.longOptionNames.contains(name) else { return argument }
        let flag = "--" + argument.dropFirst(dashes)
        guard Call.booleanFlagNames.contains(name), let equals = flag.firstIndex(of: "=") else { return flag }
        switch flag[flag.index(after: equals)...] {
        case "1", "t", "T", "TRUE", "true", "True": return "--" + name
        case "0", "f", "F", "FALSE", "false", "False": return nil
        default: return flag  // the parser refuses it, naming the flag
        }
    }

    /// grpc_health_probe's flags as Go reads them: `--name` is `-name`; a boolean flag takes `=true` or `=false` (and
    /// Go's other spellings), its last setting winning (`-tls -tls=false` is plaintext); and a probe writes `-service=`
    /// for the whole server, an empty value glued to its flag, which the parser would read as a flag without a value,
    /// so it becomes the flag and an empty argument. Only an empty value: the first `=` is the last character
    /// (`-rpc-header=authorization: Basic dXNlcjpwdw==` is a value ending in `=`).
    private static func healthArguments(_ arguments: [String]) -> [String] {
        var result: [String] = []
        var booleans: [(name: String, on: Bool)] = []
        for argument in arguments {
            guard argument.hasPrefix("-"), argument.count >= 2 else {
                result.append(argument)
                continue
            }
            let flag = argument.hasPrefix("--") && Health.probeFlags.contains(String(argument.dropFirst(2).prefix { $0 != "=" }))
                ? String(argument.dropFirst()) : argument
            let name = String(flag.dropFirst().prefix { $0 != "=" })
            if Health.probeBooleans.contains(name) {
                guard let equals = flag.firstIndex(of: "=") else {
                    booleans.append((name, true))
                    continue
                }
                switch flag[flag.index(after: equals)...] {
                case "1", "t", "T", "TRUE", "true", "True": booleans.append((name, true))
                case "0", "f", "F", "FALSE", "false", "False": booleans.append((name, false))
                default: result.append(flag)  // the parser refuses it, naming the flag
                }
            } else if flag.firstIndex(of: "=") == flag.index(before: flag.endIndex) {
                result += [String(flag.dropLast()), ""]
            } else {
                result.append(flag)
            }
        }
        // Each boolean once, as its last setting left it.
        var seen: Set<String> = []
        for (name, on) in booleans.reversed() where seen.insert(name).inserted && on { result.append("-" + name) }
        return result
    }

    static func main() async {
        // A closed stdout (`grpc-cm call ... | head -c1`) is an error to report (`writeStdout`), not a signal to die of.
        signal(SIGPIPE, SIG_IGN)
        // `help NAME` for a command that does not exist printed the top-level help and exited 0.
        let raw = Array(CommandLine.arguments.dropFirst())
        if raw.count >= 2, raw[0] == "help", !GRPCCM.configuration.subcommands.contains(where: { $0._commandName == raw[1] }) {
            writeStderr("error: unknown command '\(raw[1])'\n" + GRPCCM.helpMessage())
            exit(2)
        }
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
