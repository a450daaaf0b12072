import Foundation

/// Certificates made at test time with the openssl CLI into a temporary folder; no private key is committed.
struct TestCertificates: Sendable {
    let directory: String
    var caCertificate: String { self.path("ca.pem") }
    var serverCertificate: String { self.path("server.pem") }
    var serverKey: String { self.path("server.key") }
    var expiredCertificate: String { self.path("expired.pem") }
    var clientCertificate: String { self.path("client.pem") }
    var clientKey: String { self.path("client.key") }
    /// The client's key encrypted with a passphrase ("secret").
    var encryptedClientKey: String { self.path("client-encrypted.key") }
    /// A server certificate from a CA nobody trusts.
    var strangerCertificate: String { self.path("stranger.pem") }
    var strangerKey: String { self.path("stranger.key") }
    /// An intermediate CA the test CA signed, and a server certificate (localhost, 127.0.0.1) it signed: the chain
    /// file holds both, as a server sends them.
    var intermediateCertificate: String { self.path("intermediate.pem") }
    var intermediateServerChain: String { self.path("leaf-chain.pem") }
    var intermediateServerKey: String { self.path("leaf.key") }
    /// A server certificate (the server's key) whose subject is CN=localhost and whose only subjectAltName is
    /// 127.0.0.1: it names no DNS name.
    var commonNameOnlyCertificate: String { self.path("cn-only.pem") }

    func path(_ name: String) -> String { "\(self.directory)/\(name)" }

    /// Creates a CA, a server certificate for localhost and 127.0.0.1, an expired one, a client certificate, and a
    /// self-signed stranger.
    static func make() throws -> TestCertificates {
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("grpc-cm-certs-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let certificates = TestCertificates(directory: directory)
        try "subjectAltName=DNS:localhost,IP:127.0.0.1\n".write(
            toFile: certificates.path("server.ext"), atomically: true, encoding: .utf8)
        try "basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n".write(
            toFile: certificates.path("intermediate.ext"), atomically: true, encoding: .utf8)
        try "subjectAltName=IP:127.0.0.1\n".write(
            toFile: certificates.path("cn-only.ext"), atomically: true, encoding: .utf8)
        try "extendedKeyUsage=clientAuth\n".write(toFile: certificates.path("client.ext"), atomically: true, encoding: .utf8)
        let steps: [[String]] = [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=grpc-cm test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "server.pem", "-days", "2", "-extfile", "server.ext"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "expired.pem", "-days", "-1", "-extfile", "server.ext"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "cn-only.pem", "-days", "2", "-extfile", "cn-only.ext"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=client"],
            ["x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "client.pem", "-days", "2", "-extfile", "client.ext"],
            ["pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret", "-out", "client-encrypted.key"],
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key", "-out", "stranger.pem", "-days",
             "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "intermediate.key",
             "-out", "intermediate.csr", "-subj", "/CN=grpc-cm test intermediate"],
            ["x509", "-req", "-in", "intermediate.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "intermediate.pem", "-days", "2", "-extfile", "intermediate.ext"],
            ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "leaf.key",
             "-out", "leaf.csr", "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", "leaf.csr", "-CA", "intermediate.pem", "-CAkey", "intermediate.key",
             "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "server.ext"],
        ]
        for arguments in steps {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["openssl"] + arguments
            process.currentDirectoryURL = URL(fileURLWithPath: directory)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            guard process.terminationStatus == 0 else { throw CertificateError.opensslFailed(arguments.joined(separator: " ")) }
        }
        let chain = try String(contentsOfFile: certificates.path("leaf.pem"), encoding: .utf8)
            + String(contentsOfFile: certificates.intermediateCertificate, encoding: .utf8)
        try chain.write(toFile: certificates.intermediateServerChain, atomically: true, encoding: .utf8)
        return certificates
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: self.directory)
    }

    enum CertificateError: Error {
        case opensslFailed(String)
    }
}
