import Foundation

/// Debian's etcd-server on loopback, one member, data in a temporary directory (`make test` installs it).
final class EtcdPeer: @unchecked Sendable {
    // `@unchecked`: set once in init.
    let port: Int
    private let process: Process
    private let dataDirectory: String

    enum EtcdError: Error {
        case didNotStart(String)
    }

    init() throws {
        let port = freePort()
        let peerPort = freePort()
        let directory = NSTemporaryDirectory() + "grpc-cm-etcd-\(getpid())-\(port)"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [
            "etcd", "--name", "test", "--data-dir", directory, "--log-level", "error",
            "--listen-client-urls", "http://127.0.0.1:\(port)", "--advertise-client-urls", "http://127.0.0.1:\(port)",
            "--listen-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-cluster", "test=http://127.0.0.1:\(peerPort)",
        ]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        self.port = port
        self.dataDirectory = directory
        // Serving once its client port accepts.
        for _ in 0..<1000 {
            if Self.accepts(port) { return }
            if !process.isRunning { break }
            usleep(10_000)
        }
        process.terminate()
        throw EtcdError.didNotStart("etcd did not listen on \(port) (is etcd-server installed?)")
    }

    var endpoint: String { "127.0.0.1:\(self.port)" }

    private static func accepts(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }

    func stop() {
        if self.process.isRunning {
            self.process.terminate()
            self.process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: self.dataDirectory)
    }
}
