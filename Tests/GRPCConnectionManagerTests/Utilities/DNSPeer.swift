import Foundation

@testable import GRPCCMReactor

/// A DNS server on loopback whose answers a test changes (`dns_server.py` beside this file): for the c-ares resolver.
final class DNSPeer: Sendable {
    private let script: ScriptProcess
    var port: Int { self.script.port }

    let host: String

    /// A server on `host` (a loopback address), on `port` or a free one.
    init(host: String = "127.0.0.1", port: Int = 0) throws {
        self.host = host
        self.script = try ScriptProcess("dns_server.py", [host, String(port)])
    }

    /// `host:port`, for `Configuration.dns.servers`.
    var server: String { "\(self.host):\(self.port)" }

    /// Answers `name` with `addresses` from now on (A for IPv4, AAAA for IPv6); returns once the server does.
    func set(_ name: String, _ addresses: [String]) { self.change("set \(name) \(addresses.joined(separator: ","))") }
    /// Answers `name` with no address.
    func empty(_ name: String) { self.change("empty \(name)") }
    /// Answers `name`'s A queries with `ipv4` at once, its AAAA ones (no address) only after 5 s.
    func answerAAAALate(_ name: String, _ ipv4: String) { self.change("lateaaaa \(name) \(ipv4)") }
    /// Never answers `name`.
    func silence(_ name: String) { self.change("silent \(name)") }

    /// Sends a change and waits for the server's "ok" (the next query sees it).
    private func change(_ line: String) {
        _ = self.script.ask(line) { $0 == "ok" ? true : nil }
    }

    /// Queries received so far.
    func queries() -> Int {
        self.script.ask("count") { $0.hasPrefix("count ") ? Int($0.dropFirst(6)) : nil } ?? -1
    }

    func stop() {
        self.script.stop()
    }
}
