import Foundation

@testable import GRPCCMReactor

/// An HTTP/2 server that misbehaves on purpose, frame by frame: `scripted_peer.py` beside this file (hyperframe and
/// hpack, from the h2 package that `make test` installs). See the script for the modes.
final class ScriptedPeer: Sendable {
    private let script: ScriptProcess
    var port: Int { self.script.port }

    /// Starts the script in `mode` with `arguments`; with `tls`, over TLS (certificate chain and key, PEM).
    init(_ mode: String, _ arguments: [String] = [], tls: (certificate: String, key: String)? = nil) throws {
        var all: [String] = []
        if let tls { all += ["--tls", tls.certificate, tls.key] }
        self.script = try ScriptProcess("scripted_peer.py", all + [mode] + arguments)
    }

    var target: String { "127.0.0.1:\(self.port)" }

    /// The "event ..." lines so far, without the prefix: every one the script printed before this was asked (a round
    /// trip through its stdin first, since a line printed before a response may still be in the pipe when the
    /// response has arrived).
    var events: [String] {
        if !self.script.isStopped { _ = self.script.ask("count") { Int($0) } }
        return self.script.output.filter { $0.hasPrefix("event ") }.map { String($0.dropFirst(6)) }
    }

    /// Request header blocks the peer has received.
    func headerBlocks() -> Int {
        self.script.ask("count") { Int($0) } ?? -1
    }

    /// The most streams one connection had at once whose request headers had arrived and whose body had not begun.
    func mostBodiless() -> Int {
        self.script.ask("bodiless") { Int($0) } ?? -1
    }

    func stop() {
        self.script.stop()
    }
}
