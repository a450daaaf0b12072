import Foundation
import Testing

@testable import GRPCConnectionManager

@Suite("grpc-cm: the embedded server's process and the command line", .serialized)
struct CommandLineTests {
    @Test("--help, -h and help [command] print the help and exit 0", arguments: [
        ["--help"], ["-h"], ["help"], ["help", "call"], ["call", "--help"], ["health", "--help"], ["serve", "-h"],
    ])
    func help(_ arguments: [String]) throws {
        let (status, output) = try runProgram(grpcCMBinary(), arguments)
        #expect(status == 0)
        #expect(output.hasPrefix("OVERVIEW: "), "\(output.prefix(200))")
        #expect(output.contains("USAGE: grpc-cm"))
    }

    @Test("help for a command that does not exist is a usage error")
    func helpForNoSuchCommand() throws {
        #expect(try runProgram(grpcCMBinary(), ["help", "nosuch"]).status == 2)
    }

    @Test("call -v prints the response headers and trailers as grpcurl does: sorted, -bin padded, '(empty)' for none")
    func verbose() throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        func stderr(_ flags: String) throws -> String {
            try runProgram(
                "/bin/sh", ["-c", "'\(grpcCMBinary())' call --plaintext \(fixture.target) echo.Echo/Get --data-hex 01 -v \(flags) 2>&1 >/dev/null"]
            ).output
        }
        // grpcurl's layout: names sorted, -bin values padded.
        let echoed = try stderr("-H 'x-zz: last' -H 'x-data-bin: AQ' -H 'x-aa: first'")
        #expect(echoed.contains("Response headers received:\nx-aa: first\nx-data-bin: AQ==\nx-zz: last\n"), "\(echoed)")
        #expect(echoed.contains("Response trailers received:\n"))
        // grpcurl's reading of -H: a -bin value that is not base64 goes as its bytes; a name alone has an empty value.
        let raw = try stderr("-H 'x-data-bin: AA!' -H 'x-flag'")
        #expect(raw.contains("x-data-bin: QUEh\nx-flag: \n"), "\(raw)")
        // A trailers-only failure has no response headers.
        let failed = try stderr("-H 'x-fail-code: 5'")
        #expect(failed.contains("Response headers received:\n(empty)\n"), "\(failed)")
        #expect(failed.contains("Code: NotFound"))
    }

    @Test("bad flags are usage errors, lost output is exit 1, and messages name the real reason")
    func usageErrorsAndReasons() throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let cli = grpcCMBinary()
        let target = fixture.target
        /// Exit status and everything the command wrote (stdout and stderr).
        func run(_ arguments: String) throws -> (status: Int32, output: String) {
            try runProgram("/bin/sh", ["-c", "'\(cli)' \(arguments) 2>&1"])
        }
        // health: a bad -rpc-header is a bad argument (1), not a failed RPC (3); a -bin value is sent as its bytes,
        // as grpc_health_probe sends it (base64 or not).
        let port = target.split(separator: ":").last!
        #expect(try run("health -addr=:\(port) '-rpc-header=te: x'").status == 1)
        #expect(try run("health -addr=:\(port) '-rpc-header=x-trace'").status == 1)
        #expect(try run("health -addr=:\(port) '-rpc-header=x-trace-bin: AA!'") == (0, "status: SERVING\n"))
        #expect(try run("health -addr=:\(port) '-rpc-header=x-trace-bin: AAE='") == (0, "status: SERVING\n"))
        // A TLS flag given empty (a templated probe argument that expanded to nothing) is not given, as in the probe.
        #expect(try run("health -addr=:\(port) -tls-server-name=") == (0, "status: SERVING\n"))
        #expect(try run("health -addr=:\(port) -tls-ca-cert= -tls-client-cert= -tls-client-key=") == (0, "status: SERVING\n"))
        // call: a --metrics-out that cannot be written is not a success.
        let lost = try run("call --plaintext \(target) a.B/C --metrics-out /nonexistent/dir/m.prom")
        #expect(lost.status == 1)
        #expect(lost.output.contains("cannot write --metrics-out /nonexistent/dir/m.prom: No such file or directory"))
        // --repeat prints one line per call: the single-call outputs are refused, a message's newline escaped.
        #expect(try run("call --plaintext \(target) a.B/C --repeat 2 --hex").status == 2)
        let lines = try run("call --plaintext \(target) a.B/C --repeat 1 -H 'x-fail-code: 5' -H 'x-fail-message: a%0Ab'")
        #expect(lines.status == 64 + 5)
        #expect(lines.output.hasPrefix("1 NotFound ") && lines.output.hasSuffix(" a\\nb\n"), "\(lines.output)")
        // A positive duration below a nanosecond is the smallest one, not zero (which the configuration refuses).
        #expect(try run("call --plaintext --keepalive-time 1e-10 \(target) a.B/C").status == 0)
        // The echo server takes a status by name too.
        #expect(try run("call --plaintext \(target) a.B/C -H 'x-fail-code: UNAVAILABLE'").status == 64 + 14)
        // A TLS setting the library refuses is named as TLS, not as a failed dial (grpcurl: exit 1 either way).
        let emptyName = try run("call --servername '' \(target) a.B/C")
        #expect(emptyName.status == 1 && emptyName.output.hasPrefix("Failed to create TLS config: "), "\(emptyName.output)")
        let crlf = try run("call --plaintext \(target) a.B/C --repeat 1 -H 'x-fail-code: 5' -H 'x-fail-message: a%0D%0Ab%0Bc'")
        #expect(crlf.output.hasSuffix(" a\\r\\nb\\u{b}c\n"), "\(crlf.output)")
        // --max-msg-sz (grpcurl's) raises the 4 MiB limit on a response.
        let big = "call --plaintext \(target) a.B/C -H 'x-response-bytes: 5000000'"
        #expect(try run(big + " --out /dev/null").status == 64 + 8, "over 4 MiB: RESOURCE_EXHAUSTED")
        #expect(try runProgram("/bin/sh", ["-c", "'\(cli)' \(big) --max-msg-sz 6000000 | wc -c"]) == (0, "5000000\n"))
        #expect(try run(big + " --max-msg-sz 0").status == 2)
        // grpcurl's single-dash spellings of the long options (Go flags).
        #expect(try runProgram(cli, ["call", "-plaintext", "-max-time", "2", target, "a.B/C", "-data-hex=0a0b", "-hex"]) == (0, "0a0b\n"))
        // A PEM file that is not there says so (OpenSSL alone says "system lib").
        // Neither it nor a target nobody answers is a usage error: grpcurl exits 1 when it cannot set up or dial the
        // connection, and leaves 64 + code to calls that reached a server.
        let missing = try run("call --cacert /nonexistent/ca.pem \(target) a.B/C")
        #expect(missing.status == 1)
        #expect(missing.output.contains("Failed to create TLS config: "))
        #expect(missing.output.contains("cannot load CA certificates from /nonexistent/ca.pem: No such file or directory"))
        let refused = try run("call --plaintext 127.0.0.1:\(freePort()) a.B/C")
        #expect(refused.status == 1)
        #expect(refused.output.contains("Failed to dial target host \"127.0.0.1:"), "\(refused.output)")
        #expect(refused.output.contains("Unavailable") && refused.output.contains("refused"), "\(refused.output)")
        let unparsable = try run("call --plaintext no-port-here a.B/C")
        #expect(unparsable.status == 1)
        #expect(unparsable.output.contains("Failed to dial target host \"no-port-here\""), "\(unparsable.output)")
        // A request refused before it goes out is the call's failure, with its code, not a failed dial (nobody
        // listens there, so no connection is ever made).
        let nobody = "127.0.0.1:\(freePort())"
        let tooLarge = try run("call --plaintext \(nobody) a.B/C --max-msg-sz 4 --data-hex 0a03666f6f")
        #expect(tooLarge.status == 64 + 8 && !tooLarge.output.contains("Failed to dial"), "\(tooLarge.output)")
        let badName = try run("call --plaintext \(nobody) 'a.B/C D'")
        #expect(badName.status > 64 && !badName.output.contains("Failed to dial"), "\(badName.output)")
        // Options that would change nothing, or wait for ever, are usage errors.
        for useless in ["--interval 1", "--no-retry --retry-max-attempts 2", "--no-breaker --breaker-timeout 5", "--wait-for-ready"] {
            let refusedFlags = try run("call --plaintext \(target) a.B/C \(useless)")
            #expect(refusedFlags.status == 2, "\(useless): \(refusedFlags.output)")
        }
        #expect(try run("call --plaintext \(target) a.B/C --wait-for-ready --max-time 5").status == 0)
        // Go's boolean spellings, as grpcurl takes them; =false leaves the flag out (TLS to a plaintext server).
        #expect(try runProgram(cli, ["call", "-plaintext=true", target, "a.B/C", "-data-hex=0a0b", "-hex=1"]) == (0, "0a0b\n"))
        #expect(try run("call -plaintext=false \(target) a.B/C").status == 1)
        // An empty -H (an unset variable in a script) is skipped, and user-agent goes in front of the client's own.
        #expect(try run("call --plaintext \(target) a.B/C -H ''").status == 0)
        #expect(try run("call --plaintext \(target) a.B/C -H 'user-agent: probe/1'").status == 0)
        #expect(try run("call --plaintext \(target) a.B/C --user-agent probe/1").status == 0)
    }

    @Test("health reads flags as grpc_health_probe's Go parser does: --name, bool=value, -version, -gzip, its conflicts")
    func healthTakesGoFlags() throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let cli = grpcCMBinary()
        let port = fixture.target.split(separator: ":").last!
        // The probe's 1 s timeouts are short for a sanitizer build on a busy machine: these checks are of the flags.
        let addr = ["-addr=:\(port)", "-connect-timeout=20s", "-rpc-timeout=20s"]
        let serving = (Int32(0), "status: SERVING\n")
        func check(_ arguments: [String], _ comment: Comment? = nil) throws {
            let result = try runProgram(cli, ["health"] + arguments, stderr: true)
            #expect(result == serving, "\(result) \(comment?.rawValue ?? "")")
        }
        try check(addr + ["-tls=false"])
        try check(addr + ["-tls", "-tls=false"], "the last setting wins")
        // All of it goes to stderr, as the probe's log does (standard output would show as "STDOUT: ...").
        let verbose = try runProgram(cli, ["health"] + addr + ["-v=true"], stderr: true)
        #expect(verbose.status == 0 && verbose.output.hasSuffix("status: SERVING\n") && !verbose.output.contains("STDOUT:"), "\(verbose)")
        // The timings as Go prints a time.Duration ("2.812345ms"), as the probe's -v shows them.
        let timings = try runProgram("/bin/sh", ["-c", "'\(cli)' health \(addr.joined(separator: " ")) -v 2>&1 >/dev/null"]).output
        let goDuration = #/establishing connection took [0-9]+(\.[0-9]+)?(ns|µs|ms|s)\ntime elapsed: connect=[0-9.]+(ns|µs|ms|s) rpc=[0-9.]+(ns|µs|ms|s)\nstatus: SERVING\n/#
        #expect(timings.wholeMatch(of: goDuration) != nil, "\(timings)")
        try check(["--addr=:\(port)", "--service=", "--connect-timeout=20s", "--rpc-timeout=20s"])
        try check(["--addr", ":\(port)", "-gzip", "-connect-timeout", "20s", "-rpc-timeout", "20s"])
        #expect(try runProgram(cli, ["health", "-version"]) == (0, GRPCConnectionManagerVersion.string + "\n"))
        #expect(try runProgram(cli, ["health", "-addr=:\(port)", "-tls=maybe"]).status == 1)
        for conflict in [["-tls-ca-cert=/tmp/ca.pem"], ["-tls-server-name=example.com"]] {
            #expect(try runProgram(cli, ["health", "-addr=:\(port)", "-tls", "-tls-no-verify"] + conflict).status == 1)
        }
    }

    @Test("out of fds, grpc-cm serve pauses accepting instead of spinning, and resumes once fds are free")
    func serveOutOfFDs() async throws {
        // Its own process: out of fds, this test process's libdispatch would trap.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "ulimit -n 16 && exec '\(grpcCMBinary())' serve --port 0"]
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        defer {
            process.terminate()
            process.waitUntilExit()
        }
        let line = readLine(errors.fileHandleForReading.fileDescriptor) ?? ""
        let target = String(line.split(separator: " ").last ?? "")
        #expect(line.contains("listening on 127.0.0.1:"), "\(line)")

        // 16 fds, about 11 in use before the first client: the clients past the first few wait in the backlog, and
        // the server's accept fails with EMFILE while its listening socket stays readable.
        let port = UInt16(target.split(separator: ":").last ?? "") ?? 0
        var clients: [Int32] = []
        defer { for fd in clients { close(fd) } }
        for _ in 0..<20 { clients.append(try #require(loopbackConnection(port: Int(port)))) }

        // A loop that kept asking would burn the whole second (about 100 ticks); pausing 5 ms, doubling up to 1 s,
        // costs next to nothing.
        let before = try cpuTicks(of: process.processIdentifier)
        try await Task.sleep(for: .seconds(1))
        let spent = try cpuTicks(of: process.processIdentifier) - before
        #expect(spent < 20, "CPU ticks in one second out of fds: \(spent)")
        #expect(process.isRunning)

        for fd in clients { close(fd) }
        clients.removeAll()
        let channel = try GRPCChannel(target: target)
        defer { channel.close() }
        let response = await channel.call([1, 2, 3], timeout: .seconds(10))
        #expect(response.status.code == .ok, "\(response.status)")
        #expect(response.message == [1, 2, 3])
    }

    /// `grpc-cm` with `arguments`, running, its standard streams the given pipes (nil: inherited).
    private func startCLI(
        _ arguments: [String], stdin: Pipe? = nil, stdout: Pipe? = nil, stderr: Pipe? = nil
    ) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: grpcCMBinary())
        process.arguments = arguments
        if let stdin { process.standardInput = stdin }
        if let stdout { process.standardOutput = stdout }
        if let stderr { process.standardError = stderr }
        try process.run()
        return process
    }

    /// Stops `process` if it still runs, and waits for it.
    private func stopCLI(_ process: Process) {
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }

    /// `grpc-cm serve --port 0` with `arguments`, running; its target from the line it prints.
    private func startServe(_ arguments: [String]) throws -> (process: Process, target: String) {
        let errors = Pipe()
        let process = try self.startCLI(["serve", "--port", "0"] + arguments, stderr: errors)
        let line = readLine(errors.fileHandleForReading.fileDescriptor) ?? ""
        return (process, String(line.split(separator: " ").last ?? ""))
    }

    @Test("grpc-cm serve stops gracefully on SIGTERM: GOAWAY, nothing new accepted, the call under way finishes; exit 0")
    func serveStopsGracefully() async throws {
        let (process, target) = try self.startServe(["--grace-period", "30"])
        defer { self.stopCLI(process) }
        var configuration = Configuration()
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        let channel = try GRPCChannel(target: target, configuration: configuration)
        defer { channel.close() }
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        let bidi = channel.bidirectionalStreaming(path: "/raw.Raw/Update", options: RequestOptions(timeout: .seconds(60)))
        var echoes = bidi.responses.makeAsyncIterator()
        try await bidi.write([1])
        #expect(try await echoes.next() == [1], "the server has the stream")
        kill(process.processIdentifier, SIGTERM)
        #expect(await eventually { recorder.count { if case .goAwayReceived = $0 { true } else { false } } == 1 })
        // A new call finds nobody listening; the one under way goes on to its end.
        #expect(await channel.call([9], timeout: .seconds(5)).status.code == .unavailable)
        try await bidi.write([2])
        #expect(try await echoes.next() == [2])
        bidi.closeSend()
        #expect(try await echoes.next() == nil)
        #expect(await bidi.result().status.code == .ok)
        // Its last connection done, the server exits, long before the grace period's end.
        #expect(await eventually(timeout: 10) { !process.isRunning })
        #expect(process.terminationReason == .exit && process.terminationStatus == 0)
    }

    @Test("grpc-cm serve: a second SIGTERM ends the grace period at once, the calls still under way with it")
    func serveSecondSignalHurries() async throws {
        let (process, target) = try self.startServe(["--grace-period", "3600"])
        defer { self.stopCLI(process) }
        let channel = try GRPCChannel(target: target)
        defer { channel.close() }
        let recorder = EventRecorder()
        channel.events.subscribe { recorder.record($0) }
        // A deadline, so that a server that misses the second signal fails the test instead of holding it an hour.
        let bidi = channel.bidirectionalStreaming(path: "/raw.Raw/Update", options: RequestOptions(timeout: .seconds(60)))
        var echoes = bidi.responses.makeAsyncIterator()
        try await bidi.write([1])
        #expect(try await echoes.next() == [1])
        kill(process.processIdentifier, SIGTERM)
        // The server took the first signal (its GOAWAY says so) before the second is sent: two SIGTERMs pending at
        // once are delivered as one (standard signals do not queue), and a loaded machine may not have run the
        // server in between.
        #expect(await eventually(timeout: 20) { recorder.count { if case .goAwayReceived = $0 { true } else { false } } == 1 })
        try await bidi.write([2])
        #expect(try await echoes.next() == [2], "still open after the first signal")
        kill(process.processIdentifier, SIGTERM)
        #expect(await bidi.result().status.code == .unavailable)
        #expect(await eventually(timeout: 10) { !process.isRunning })
        #expect(process.terminationReason == .exit && process.terminationStatus == 0)
    }

    @Test("call: SIGINT cancels the call under way or stops a --repeat run between calls; the metrics are still written; exit 130")
    func callInterrupted() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let metrics = FileManager.default.temporaryDirectory.appendingPathComponent("grpc-cm-interrupted-\(getpid()).prom").path
        defer { try? FileManager.default.removeItem(atPath: metrics) }
        for (name, extra) in [("between calls", ["--repeat", "1000", "--interval", "60"]), ("during a call", ["-H", "x-sleep-ms: 60000"])] {
            try? FileManager.default.removeItem(atPath: metrics)
            let requestsBefore = fixture.server.requestsPerConnection().reduce(0, +)
            let process = try self.startCLI(
                ["call", "--plaintext", fixture.target, "a.B/C", "--metrics-out", metrics] + extra, stdout: Pipe())
            defer { self.stopCLI(process) }
            // The first request has reached the server (with --repeat, the next is 60 s away).
            #expect(await eventually { fixture.server.requestsPerConnection().reduce(0, +) == requestsBefore + 1 }, "\(name)")
            kill(process.processIdentifier, SIGINT)
            #expect(await eventually(timeout: 10) { !process.isRunning }, "\(name)")
            #expect(process.terminationReason == .exit && process.terminationStatus == 128 + SIGINT, "\(name)")
            let text = (try? String(contentsOfFile: metrics, encoding: .utf8)) ?? ""
            #expect(text.contains("grpc_client_requests_total"), "\(name): metrics written at exit")
        }
    }

    @Test("call: SIGINT while the request is read from stdin ends the program there, before any call")
    func callInterruptedReadingStdin() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let input = Pipe()  // never closed until the end: the read waits
        let process = try self.startCLI(["call", "--plaintext", fixture.target, "a.B/C", "--data-file", "-"], stdin: input)
        defer {
            self.stopCLI(process)
            try? input.fileHandleForWriting.close()
        }
        // One of its threads blocked in read(0, ...): /proc/PID/task/TID/syscall names the call and its first argument.
        let read = {
            #if arch(x86_64)
            "0 0x0 "
            #else
            "63 0x0 "
            #endif
        }()
        let tasks = "/proc/\(process.processIdentifier)/task"
        #expect(await eventually {
            ((try? FileManager.default.contentsOfDirectory(atPath: tasks)) ?? []).contains { task in
                ((try? String(contentsOfFile: "\(tasks)/\(task)/syscall", encoding: .utf8)) ?? "").hasPrefix(read)
            }
        })
        kill(process.processIdentifier, SIGINT)
        #expect(await eventually(timeout: 10) { !process.isRunning }, "it kept reading")
        #expect(process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGINT)
        #expect(fixture.server.requestsPerConnection().isEmpty, "no call went out")
    }

    @Test("health: SIGINT cancels the probe where it is, as grpc_health_probe: exit 2 while connecting, 3 during the RPC")
    func healthInterrupted() async throws {
        let silent = try ScriptedPeer("silent")  // takes the connection, never says a word: CONNECTING
        defer { silent.stop() }
        let hanging = try ScriptedPeer("health-silent")  // connects; the Check is never answered
        defer { hanging.stop() }
        for (peer, expected) in [(silent, Int32(2)), (hanging, 3)] {
            let errors = Pipe()
            let process = try self.startCLI(
                ["health", "-addr=\(peer.target)", "-connect-timeout=60s", "-rpc-timeout=60s"], stderr: errors)
            defer { self.stopCLI(process) }
            // Connecting, or waiting for the answer, when the signal comes.
            let waiting = await eventually { peer === silent ? peer.events.contains("accepted") : peer.headerBlocks() == 1 }
            #expect(waiting)
            kill(process.processIdentifier, SIGINT)
            #expect(await eventually(timeout: 10) { !process.isRunning })
            #expect(process.terminationReason == .exit && process.terminationStatus == expected, "\(peer.target)")
            let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(said.hasPrefix("cancellation received\n"), "\(said)")
        }
    }

    /// User plus system CPU time of `pid`, in clock ticks (`/proc/PID/stat`, fields 14 and 15).
    private func cpuTicks(of pid: Int32) throws -> Int {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.lastIndex(of: ")")!...].split(separator: " ")
        return Int(fields[12])! + Int(fields[13])!
    }
}
