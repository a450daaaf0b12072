import Foundation
import GRPCEchoServer
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// TLS against the embedded server, a grpcio server and openssl s_server, with certificates made at test time.
@Suite("TLS", .serialized)
struct TLSTests {
    static func tls(_ certificates: TestCertificates, _ adjust: (inout TLSSettings) -> Void = { _ in }) -> Configuration {
        var configuration = Configuration()
        var tls = TLSSettings()
        tls.trustRoots = .file(certificates.caCertificate)
        adjust(&tls)
        configuration.tls = tls
        configuration.enableRetry = false
        configuration.enableCircuitBreaker = false
        return configuration
    }

    static func server(
        _ certificates: TestCertificates, loop: ReactorLoop, certificate: String? = nil, key: String? = nil,
        clientCA: String? = nil, port: Int = 0
    ) throws -> EchoServer {
        var options = EchoServer.Options()
        options.tlsCertificateChain = certificate ?? certificates.serverCertificate
        options.tlsPrivateKey = key ?? certificates.serverKey
        options.tlsClientCA = clientCA
        return try EchoServer(port: port, options: options, eventLoop: loop)
    }

    /// A channel to `server` trusting the test CA and presenting the client certificate `chain` with its `key`.
    static func channel(
        to server: EchoServer, presenting chain: String, key: String, _ certificates: TestCertificates, loop: ReactorLoop
    ) throws -> GRPCChannel {
        try GRPCChannel(
            target: "127.0.0.1:\(server.port)",
            configuration: Self.tls(certificates) {
                $0.certificateChainFile = chain
                $0.privateKeyFile = key
            }, eventLoop: loop)
    }

    @Test("a manager's service keeps the security it was registered with: after closeConnection, and for health checks")
    func managerKeepsAServicesSecurity() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let server = try Self.server(certificates, loop: loop)
        defer { server.close() }
        let address = "127.0.0.1:\(server.port)"
        var configuration = Configuration()  // plaintext by default: only the service is TLS
        configuration.enableRetry = false
        let manager = try ConnectionManager(configuration: configuration, eventLoop: loop)
        let tls = Self.tls(certificates).tls!
        let first = try manager.connection(service: "pay", address: address, security: .tls(tls))
        #expect(await first.call([1], timeout: .seconds(5)).status == .ok)
        // The same address with other security is another channel, not the one open.
        let plain = try manager.connection(service: "pay", address: address, security: .plaintext)
        #expect(plain !== first)
        #expect(await plain.call([2], timeout: .seconds(5)).status.code == .unavailable, "plaintext to a TLS server")
        let again = try manager.connection(service: "pay", address: address, security: .tls(tls))
        #expect(again !== plain)
        #expect(try manager.connection(service: "pay") === again, "nil keeps what was registered")
        // Registered without security, the configuration's (plaintext here) is the service's: asking for it by name
        // keeps the channel and its calls.
        let other = try manager.connection(service: "other", address: address)
        #expect(try manager.connection(service: "other", address: address, security: .plaintext) === other)
        // Closed and made again from the registration: TLS still.
        manager.closeConnection(service: "pay")
        #expect(try await manager.checkHealth(service: "pay") == .serving)
        #expect(await (try manager.connection(service: "pay")).call([3], timeout: .seconds(5)).status == .ok)
        await manager.close(gracePeriod: .seconds(1))
    }

    @Test("a server that negotiates h2, then speaks HTTP/1.1 inside TLS (a TLS proxy's backend) is named for what it is")
    func http1InsideTLS() async throws {
        let (response, _) = try await Self.callScriptedPeer("http1")
        #expect(response.status.code == .unavailable)
        #expect(response.status.message.contains("then answered with HTTP/1.x (\"HTTP/1.1 400 Bad Request\")"), "\(response.status)")
    }

    /// One call, trusting the test CA, to a scripted peer in `mode` over TLS with the server's certificate (or the
    /// stranger's, which that CA did not sign); returns its response and what the peer saw.
    static func callScriptedPeer(_ mode: String, stranger: Bool = false) async throws -> (UnaryResponse, events: [String]) {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let identity = stranger
            ? (certificates.strangerCertificate, certificates.strangerKey)
            : (certificates.serverCertificate, certificates.serverKey)
        let peer = try ScriptedPeer(mode, tls: identity)
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, configuration: Self.tls(certificates), eventLoop: loop)
        let response = await channel.call([1], timeout: .seconds(5))
        _ = await eventually(timeout: 5) { !stranger || peer.events.contains { $0.hasPrefix("handshake-failed") } }
        return (response, peer.events)
    }

    @Test("the right CA succeeds, by name and by IP; failures say why")
    func verification() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let server = try Self.server(certificates, loop: loop)
        defer { server.close() }
        let port = server.port

        for target in ["127.0.0.1:\(port)", "localhost:\(port)"] {
            let channel = try GRPCChannel(target: target, configuration: Self.tls(certificates), eventLoop: loop)
            let response = await channel.call([1, 2], timeout: .seconds(5))
            #expect(response.status == .ok, "\(target)")
            #expect(response.message == [1, 2])
        }

        let system = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: Self.tls(certificates) { $0.trustRoots = .system }, eventLoop: loop)
        let unknownCA = await system.call([1], timeout: .seconds(5))
        #expect(unknownCA.status.code == .unavailable)
        #expect(unknownCA.status.message.contains("certificate verify failed"))

        let wrongName = try GRPCChannel(
            target: "127.0.0.1:\(port)", configuration: Self.tls(certificates) { $0.serverName = "other.example" }, eventLoop: loop)
        let mismatch = await wrongName.call([1], timeout: .seconds(5))
        #expect(mismatch.status.code == .unavailable)
        #expect(mismatch.status.message.contains("certificate verify failed: hostname mismatch"))

        let insecure = try GRPCChannel(
            target: "127.0.0.1:\(port)",
            configuration: Self.tls(certificates) {
                $0.trustRoots = .system
                $0.verifyCertificate = false
            }, eventLoop: loop)
        #expect(await insecure.call([3], timeout: .seconds(5)).message == [3])
    }

    /// The test certificates and a started loop, both let go of after `body`.
    static func withCertificates(_ body: (TestCertificates, ReactorLoop) async throws -> Void) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        try await body(certificates, loop)
    }

    /// A channel to `server` trusting a copy of the test CA at `trusted.pem`, which the test may rewrite.
    static func channelTrustingACopy(
        of certificates: TestCertificates, server: EchoServer, loop: ReactorLoop
    ) throws -> (channel: GRPCChannel, trusted: String) {
        let trusted = certificates.path("trusted.pem")
        try FileManager.default.copyItem(atPath: certificates.caCertificate, toPath: trusted)
        let channel = try GRPCChannel(
            target: "localhost:\(server.port)", configuration: Self.tls(certificates) { $0.trustRoots = .file(trusted) },
            eventLoop: loop)
        return (channel, trusted)
    }

    /// A server presenting the stranger's certificate, and a channel to it trusting a copy of the test CA.
    static func strangerAndAChannelTrustingACopy(
        _ certificates: TestCertificates, loop: ReactorLoop
    ) throws -> (server: EchoServer, channel: GRPCChannel, trusted: String) {
        let server = try Self.server(
            certificates, loop: loop, certificate: certificates.strangerCertificate, key: certificates.strangerKey)
        do {
            let (channel, trusted) = try Self.channelTrustingACopy(of: certificates, server: server, loop: loop)
            return (server, channel, trusted)
        } catch {
            server.close()
            throw error
        }
    }

    /// A scripted echo peer over TLS with the test CA's server certificate, and a started loop for the client; all
    /// stopped after `body`.
    static func withTLSEchoPeer(
        _ body: (TestCertificates, ScriptedPeer, ReactorLoop) async throws -> Void
    ) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let peer = try ScriptedPeer("echo", tls: (certificates.serverCertificate, certificates.serverKey))
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        try await body(certificates, peer, loop)
    }

    @Test("a name is checked against the subjectAltNames only: a subject CN=localhost names nobody")
    func commonNameIsNotAName() async throws {
        try await Self.withCertificates { certificates, loop in
            let server = try Self.server(certificates, loop: loop, certificate: certificates.commonNameOnlyCertificate)
            defer { server.close() }
            let byName = try GRPCChannel(target: "localhost:\(server.port)", configuration: Self.tls(certificates), eventLoop: loop)
            defer { byName.close() }
            let refused = await byName.call([1], timeout: .seconds(5))
            #expect(refused.status.code == .unavailable && refused.status.message.contains("hostname mismatch"), "\(refused.status)")
            // Its IP subjectAltName is a name it does carry.
            let byIP = try GRPCChannel(target: "127.0.0.1:\(server.port)", configuration: Self.tls(certificates), eventLoop: loop)
            defer { byIP.close() }
            let accepted = await byIP.call([2], timeout: .seconds(5))
            #expect(accepted.status == .ok, "\(accepted.status)")
        }
    }

    @Test("a name with a trailing dot (fully qualified) is sent and checked without it")
    func trailingDotName() async throws {
        try await Self.withTLSEchoPeer { certificates, peer, loop in
            // By the target's host (resolved by a scripted resolver: the system's has no "localhost." either), and
            // by serverName.
            let byHost = try GRPCChannel(
                target: "localhost.:\(peer.port)", configuration: Self.tls(certificates), eventLoop: loop,
                resolver: ScriptedResolver([[NetworkAddress(ip: "127.0.0.1", port: peer.port)!]]))
            let byName = try GRPCChannel(
                target: peer.target, configuration: Self.tls(certificates) { $0.serverName = "localhost." }, eventLoop: loop)
            for channel in [byHost, byName] {
                let response = await channel.call([1], timeout: .seconds(5))
                #expect(response.status == .ok, "\(channel.target): \(response.status)")
            }
            #expect(peer.events.filter { $0.hasPrefix("sni ") } == ["sni localhost", "sni localhost"], "\(peer.events)")
        }
    }

    @Test("serverName is the requests' :authority too (as grpc-go takes it), not the dialled address")
    func serverNameIsTheAuthority() async throws {
        try await Self.withTLSEchoPeer { certificates, peer, loop in
            let named = try GRPCChannel(
                target: peer.target, configuration: Self.tls(certificates) { $0.serverName = "localhost" }, eventLoop: loop)
            #expect(await named.call([1], timeout: .seconds(5)).status == .ok)
            let unnamed = try GRPCChannel(target: peer.target, configuration: Self.tls(certificates), eventLoop: loop)
            #expect(await unnamed.call([2], timeout: .seconds(5)).status == .ok)
            #expect(peer.events.filter { $0.hasPrefix("authority ") } == ["authority localhost", "authority \(peer.target)"])
        }
    }

    @Test("an etcd:/// target under verified TLS needs serverName: its name is a key prefix no certificate names")
    func etcdTargetNeedsAServerName() throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var configuration = Configuration()
        configuration.tls = TLSSettings()
        configuration.etcd = Configuration.Etcd(endpoints: ["127.0.0.1:2379"])
        #expect {
            _ = try GRPCChannel(target: "etcd:///services/echo", configuration: configuration, eventLoop: loop)
        } throws: { ($0 as? ConfigurationError)?.field == "tls.serverName" }
        configuration.tls?.serverName = "echo.internal"
        _ = try GRPCChannel(target: "etcd:///services/echo", configuration: configuration, eventLoop: loop)
        configuration.tls = TLSSettings()
        configuration.tls?.verifyCertificate = false
        _ = try GRPCChannel(target: "etcd:///services/echo", configuration: configuration, eventLoop: loop)
    }

    @Test("a trusted intermediate CA is an anchor: its server's chain verifies without the root")
    func intermediateAsTrustAnchor() async throws {
        try await Self.withCertificates { certificates, loop in
            let server = try Self.server(
                certificates, loop: loop, certificate: certificates.intermediateServerChain, key: certificates.intermediateServerKey)
            defer { server.close() }
            for roots in [certificates.intermediateCertificate, certificates.caCertificate] {
                let channel = try GRPCChannel(
                    target: "localhost:\(server.port)", configuration: Self.tls(certificates) { $0.trustRoots = .file(roots) },
                    eventLoop: loop)
                let response = await channel.call([1], timeout: .seconds(5))
                #expect(response.status == .ok, "trusting \(roots): \(response.status)")
            }
        }
    }

    @Test("an expired certificate and a stranger's certificate are refused with the reason")
    func expiredAndStranger() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let expired = try Self.server(certificates, loop: loop, certificate: certificates.expiredCertificate)
        defer { expired.close() }
        let channel = try GRPCChannel(target: "127.0.0.1:\(expired.port)", configuration: Self.tls(certificates), eventLoop: loop)
        let response = await channel.call([1], timeout: .seconds(5))
        #expect(response.status.code == .unavailable)
        #expect(response.status.message.contains("certificate has expired"))

        let stranger = try Self.server(
            certificates, loop: loop, certificate: certificates.strangerCertificate, key: certificates.strangerKey)
        defer { stranger.close() }
        let other = try GRPCChannel(target: "127.0.0.1:\(stranger.port)", configuration: Self.tls(certificates), eventLoop: loop)
        let refused = await other.call([1], timeout: .seconds(5))
        #expect(refused.status.code == .unavailable)
        #expect(refused.status.message.contains("certificate verify failed"))
    }

    @Test("mutual TLS: a client certificate is accepted; none is refused")
    func mutualTLS() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let server = try Self.server(certificates, loop: loop, clientCA: certificates.caCertificate)
        defer { server.close() }
        let withCertificate = try Self.channel(
            to: server, presenting: certificates.clientCertificate, key: certificates.clientKey, certificates, loop: loop)
        #expect(await withCertificate.call([7], timeout: .seconds(5)).message == [7])
        let without = try GRPCChannel(target: "127.0.0.1:\(server.port)", configuration: Self.tls(certificates), eventLoop: loop)
        let refused = await without.call([7], timeout: .seconds(5))
        #expect(refused.status.code == .unavailable)
        #expect(refused.status.message.contains("certificate required"), "\(refused.status.message)")
        // With verification off the reason is still the server's, not a verdict on its chain nobody asked for.
        let unverified = try GRPCChannel(
            target: "127.0.0.1:\(server.port)",
            configuration: Self.tls(certificates) {
                $0.trustRoots = .system
                $0.verifyCertificate = false
            }, eventLoop: loop)
        let refusedAgain = await unverified.call([7], timeout: .seconds(5))
        #expect(refusedAgain.status.code == .unavailable)
        #expect(refusedAgain.status.message.contains("certificate required"), "\(refusedAgain.status.message)")
    }

    @Test("a TLS server that does not select h2 through ALPN is refused, saying so")
    func noH2() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let port = freePort()
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        server.arguments = [
            "openssl", "s_server", "-accept", "127.0.0.1:\(port)", "-cert", certificates.serverCertificate, "-key",
            certificates.serverKey, "-alpn", "http/1.1", "-quiet",
        ]
        ignoreSIGPIPE()
        server.standardInput = Pipe()
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer {
            kill(server.processIdentifier, SIGKILL)
            server.waitUntilExit()
        }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: Self.tls(certificates), eventLoop: loop)
        var response = UnaryResponse(status: .ok)
        // s_server may take a moment to listen: connection refused until then.
        _ = await eventually {
            response = await channel.call([1], timeout: .seconds(2))
            return !response.status.message.contains("refused")
        }
        #expect(response.status.code == .unavailable)
        #expect(response.status.message.contains("did not negotiate HTTP/2"))
    }

    @Test("against a grpcio TLS server; reconnection over TLS after a restart")
    func grpcioAndRestart() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        var peer = try PythonPeer(tlsCertificate: certificates.serverCertificate, tlsKey: certificates.serverKey)
        let port = peer.port
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: "localhost:\(port)", configuration: Self.tls(certificates), eventLoop: loop)
        #expect(await channel.call([4, 2], timeout: .seconds(5)).message == [4, 2])
        #expect(try await channel.checkHealth() == .serving)
        // The same failures against grpcio: a CA we do not trust, a name the certificate does not carry.
        let untrusted = try GRPCChannel(
            target: "localhost:\(port)", configuration: Self.tls(certificates) { $0.trustRoots = .system }, eventLoop: loop)
        #expect(await untrusted.call([1], timeout: .seconds(5)).status.message.contains("certificate verify failed"))
        let misnamed = try GRPCChannel(
            target: "localhost:\(port)", configuration: Self.tls(certificates) { $0.serverName = "elsewhere.example" },
            eventLoop: loop)
        #expect(await misnamed.call([1], timeout: .seconds(5)).status.message.contains("hostname mismatch"))
        peer.stop()
        #expect(await channel.call([1], timeout: .seconds(2)).status.code == .unavailable)
        peer = try PythonPeer(port: port, tlsCertificate: certificates.serverCertificate, tlsKey: certificates.serverKey)
        defer { peer.stop() }
        #expect(await eventually(timeout: 5) { await channel.call([5], timeout: .seconds(1)).status == .ok })
    }

    @Test("unreadable TLS files are a configuration error naming tls")
    func badFiles() throws {
        var configuration = Configuration()
        var tls = TLSSettings()
        tls.trustRoots = .file("/nonexistent/ca.pem")
        configuration.tls = tls
        #expect {
            _ = try GRPCChannel(target: "127.0.0.1:1", configuration: configuration)
        } throws: { error in
            (error as? ConfigurationError)?.field == "tls"
        }
        tls = TLSSettings()
        tls.certificateChainFile = "/tmp/only-a-cert.pem"
        configuration.tls = tls
        #expect {
            try ConnectionManager(configuration: configuration)
        } throws: { error in
            (error as? ConfigurationError)?.field == "tls.certificateChainFile"
        }
        tls = TLSSettings()
        tls.serverName = ""
        configuration.tls = tls
        #expect {
            try ConnectionManager(configuration: configuration)
        } throws: { error in
            (error as? ConfigurationError)?.field == "tls.serverName"
        }
    }

    @Test("an encrypted private key is refused, saying so, without asking for a passphrase (the library and the CLI)")
    func encryptedKey() throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        // The CLI first, bounded, with a standard input that stays open: OpenSSL's own prompt would wait on it for
        // ever (so would this process, in a terminal, on the old code).
        ignoreSIGPIPE()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: grpcCMBinary())
        process.arguments = [
            "call", "--cacert", certificates.caCertificate, "--cert", certificates.clientCertificate,
            "--key", certificates.encryptedClientKey, "127.0.0.1:1", "a.B/C",
        ]
        let input = Pipe()
        let output = Pipe()
        process.standardInput = input
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let exited = waitFor(seconds: 10) { !process.isRunning }
        if !exited { kill(process.processIdentifier, SIGKILL) }  // OpenSSL's prompt holds SIGTERM off
        process.waitUntilExit()
        try? input.fileHandleForWriting.close()
        let text = String(decoding: readToEnd(output.fileHandleForReading.fileDescriptor), as: UTF8.self)
        #expect(exited, "the CLI waited for a passphrase")
        #expect(process.terminationStatus == 1, "\(text)")
        #expect(text.contains("it is encrypted"), "\(text)")
        guard exited else { return }  // it prompted: so would this process, and in a terminal it would wait
        Self.expectClientIdentityRefused(
            certificates, key: certificates.encryptedClientKey,
            saying: "it is encrypted, and keys with a passphrase are not supported")
    }

    /// A channel with the client certificate and `key` is refused when made, the error saying `text`.
    static func expectClientIdentityRefused(
        _ certificates: TestCertificates, key: String, saying text: String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let configuration = Self.tls(certificates) {
            $0.certificateChainFile = certificates.clientCertificate
            $0.privateKeyFile = key
        }
        #expect(sourceLocation: sourceLocation) {
            _ = try GRPCChannel(target: "127.0.0.1:1", configuration: configuration)
        } throws: { error in
            "\(error)".contains(text)
        }
    }

    @Test("a client key of another pair is refused naming both files, not with OpenSSL's 'key values mismatch' alone")
    func keyOfAnotherPair() throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        Self.expectClientIdentityRefused(
            certificates, key: certificates.strangerKey,
            saying: "private key \(certificates.strangerKey) does not match the certificate \(certificates.clientCertificate)")
    }

    @Test("the embedded TLS server refuses a client that offers no ALPN (it would get HTTP/2 unasked)")
    func embeddedServerRequiresALPN() throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let server = try Self.server(certificates, loop: loop)
        defer { server.close() }
        // What the server sends after a handshake without ALPN: its SETTINGS before, nothing (a close) now.
        func firstBytes(alpn: [String]) throws -> Int {
            let script = """
                import socket, ssl
                context = ssl.create_default_context(cafile="\(certificates.caCertificate)")
                if \(alpn.isEmpty ? "False" : "True"):
                    context.set_alpn_protocols([\(alpn.map { "\"\($0)\"" }.joined(separator: ","))])
                sock = context.wrap_socket(socket.create_connection(("127.0.0.1", \(server.port))), server_hostname="localhost")
                sock.settimeout(5)
                try:
                    print(len(sock.recv(9)))
                except (ssl.SSLError, ConnectionError):
                    print(0)
                """
            let result = try runProgram("/usr/bin/env", ["python3", "-c", script])
            return Int(result.output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        }
        #expect(try firstBytes(alpn: ["h2"]) == 9, "an h2 client gets the server's SETTINGS")
        #expect(try firstBytes(alpn: []) == 0, "a client without ALPN is closed")
    }

    @Test("a failed handshake sends its alert: the server hears why (unknown CA), not a bare close")
    func handshakeFailureSendsAlert() async throws {
        let (response, events) = try await Self.callScriptedPeer("observe", stranger: true)
        #expect(response.status.code == .unavailable)
        let failure = events.first { $0.hasPrefix("handshake-failed") } ?? ""
        #expect(failure.contains("UNKNOWN_CA"), "the server saw: \(events)")
    }

    @Test("an idle client answers a TLS 1.3 KeyUpdate that asks for one at once, not with its next frame")
    func keyUpdateAnsweredWhileIdle() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let serverLoop = try ReactorLoop()
        serverLoop.start()
        defer { serverLoop.shutdown() }
        let server = try Self.server(certificates, loop: serverLoop)
        defer { server.close() }
        let channel = try GRPCChannel(target: "127.0.0.1:\(server.port)", configuration: Self.tls(certificates))
        defer { channel.close() }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)

        // The client has nothing more to send (no call, and keepalive pings minutes away): its reply can only go out
        // because reading the KeyUpdate made TLS output.
        #expect(server.requestKeyUpdates() == 1)
        #expect(await eventually(timeout: 5) { server.clientKeyUpdates() == 1 }, "the client's KeyUpdate never came")
        let after = await channel.call([2, 3], timeout: .seconds(5))
        #expect(after.status == .ok)
        #expect(after.message == [2, 3])
        #expect(server.clientKeyUpdates() == 1, "a reply does not ask for another")
    }

    @Test("an empty serverName is refused while verification is on, accepted with it off")
    func emptyServerName() throws {
        var tls = TLSSettings()
        tls.serverName = ""
        var configuration = Configuration()
        configuration.tls = tls
        #expect {
            try configuration.validate()
        } throws: { error in
            (error as? ConfigurationError)?.field == "tls.serverName"
        }
        tls.verifyCertificate = false
        configuration.tls = tls
        try configuration.validate()
        let context = try TLSContext(client: TLSSettings())
        #expect(throws: TLSError.self) { try TLSSession(context: context, serverName: "", verifyName: "") }
    }

    @Test("renegotiation is refused by both ends' contexts")
    func renegotiationRefused() throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let client = try TLSContext(client: TLSSettings())
        let server = try TLSContext(
            serverCertificateChain: certificates.serverCertificate, privateKey: certificates.serverKey, clientCA: nil)
        #expect(client.refusesRenegotiation)
        #expect(server.refusesRenegotiation)
    }

    @Test("loop shutdown sends GOAWAY, and close_notify under TLS, before the socket closes", arguments: [false, true])
    func shutdownSaysGoodbye(_ useTLS: Bool) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let peer = try ScriptedPeer(
            "observe", tls: useTLS ? (certificates.serverCertificate, certificates.serverKey) : nil)
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        var configuration = useTLS ? Self.tls(certificates) : Configuration()
        configuration.enableRetry = false
        let channel = try GRPCChannel(target: peer.target, configuration: configuration, eventLoop: loop)
        channel.connect()
        #expect(await eventually(timeout: 5) { await channel.connectivity().state == .ready })
        loop.shutdown()
        #expect(await eventually(timeout: 5) { peer.events.contains("goaway") })
        if useTLS {
            #expect(await eventually(timeout: 5) { peer.events.contains("close_notify") }, "\(peer.events)")
        }
    }

    @Test("channels with equal TLS settings share one OpenSSL context (reading the trust roots once)")
    func contextsAreShared() throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        func source(_ configuration: Configuration) throws -> TLSContextSource {
            try GRPCChannel(target: "127.0.0.1:1", configuration: configuration, eventLoop: loop).tlsContextSource!
        }
        let first = try source(Self.tls(certificates)).context()
        #expect(try source(Self.tls(certificates)).context() === first)
        // The name is set per session, not in the context: a manager's etcd services, each naming its server, share it.
        #expect(try source(Self.tls(certificates) { $0.serverName = "localhost" }).context() === first)
        #expect(try source(Self.tls(certificates) { $0.trustRoots = .system }).context() !== first)
    }

    @Test("a TLS file rewritten on disk is read for the next connection, without closing the channel")
    func rotatedFilesAreRead() async throws {
        try await Self.withCertificates { certificates, loop in
            // The server presents the stranger's certificate; the client trusts what its CA file holds.
            let (server, channel, trusted) = try Self.strangerAndAChannelTrustingACopy(certificates, loop: loop)
            defer {
                channel.close()
                server.close()
            }
            let refused = await channel.call([1], timeout: .seconds(5))
            #expect(refused.status.code == .unavailable && refused.status.message.contains("certificate verify failed"))
            // The CA bundle is replaced (one that trusts the stranger): the next attempt reads it.
            try FileManager.default.removeItem(atPath: trusted)
            try FileManager.default.copyItem(atPath: certificates.strangerCertificate, toPath: trusted)
            let response = await channel.unaryResult(
                path: "/echo.Echo/Get", request: [2], options: RequestOptions(timeout: .seconds(10), waitForReady: true))
            #expect(response.status == .ok, "\(response.status)")
        }
    }

    @Test("files caught half rotated (unreadable now) leave the last good context in use for the next connection")
    func halfRotatedFilesKeepTheLastContext() async throws {
        try await Self.withCertificates { certificates, loop in
            let server = try Self.server(certificates, loop: loop)
            defer { server.close() }
            let (channel, trusted) = try Self.channelTrustingACopy(of: certificates, server: server, loop: loop)
            defer { channel.close() }
            #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
            let before = channel.tlsContextSource!.context()
            try "not a certificate\n".write(toFile: trusted, atomically: true, encoding: .utf8)
            #expect(channel.tlsContextSource!.context() === before, "the last good context")
            // A new connection (the server sends GOAWAY) is made with it.
            server.goAway()
            let response = await channel.unaryResult(
                path: "/echo.Echo/Get", request: [2], options: RequestOptions(timeout: .seconds(10), waitForReady: true))
            #expect(response.status == .ok, "\(response.status)")
        }
    }

    @Test("changed files that could not be loaded are tried again after a while though unchanged since (a failure of the moment), announced once")
    func refusalIsTriedAgain() throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let trusted = certificates.path("trusted.pem")
        try FileManager.default.copyItem(atPath: certificates.caCertificate, toPath: trusted)
        let settings = Self.tls(certificates) { $0.trustRoots = .file(trusted) }.tls!
        let source = try TLSContextSource(settings: settings, retryRefusalAfter: .seconds(1))
        try "not a certificate\n".write(toFile: trusted, atomically: true, encoding: .utf8)
        let first = source.choose()
        #expect(first.refusal != nil && first.refusedNow)
        #expect(source.buildsTried == 1)
        // At once: the refusal stands (no rebuild per connection attempt).
        #expect(source.choose().refusal != nil)
        #expect(source.buildsTried == 1)
        // After the interval, tried again (a failure of the moment would pass now); the same refusal is not
        // announced again. Before, the files stayed refused until they changed again.
        var again: TLSContextSource.Choice?
        #expect(waitFor(seconds: 10) {
            again = source.choose()
            return source.buildsTried == 2
        })
        #expect(again?.refusal != nil && again?.refusedNow == false)
    }

    @Test("files that changed and cannot be loaded are announced once, and named by the handshakes that then fail")
    func refusedRotationIsReported() async throws {
        try await Self.withCertificates { certificates, loop in
            // The server presents the stranger's certificate, which the client's CA file never trusts.
            let (server, channel, trusted) = try Self.strangerAndAChannelTrustingACopy(certificates, loop: loop)
            defer {
                channel.close()
                server.close()
            }
            let recorder = EventRecorder()
            channel.events.subscribe { recorder.record($0) }
            let before = await channel.call([1], timeout: .seconds(5))
            #expect(before.status.code == .unavailable && !before.status.message.contains("could not be loaded"))
            try "not a certificate\n".write(toFile: trusted, atomically: true, encoding: .utf8)
            // The next attempts use the last good (old) context, fail its check, and say why the new files are not
            // in use (a fail-fast call in the backoff fails with the last attempt's error).
            let named = "the TLS files changed on disk but could not be loaded"
            var last = CallStatus(code: .ok, message: "")
            #expect(await eventually(timeout: 10) {
                last = await channel.call([1], timeout: .seconds(5)).status
                return last.message.contains(named)
            }, "\(last)")
            #expect(last.code == .unavailable && last.message.contains("certificate verify failed"), "\(last)")
            #expect(last.message.contains("trusted.pem"), "\(last)")
            // Two more attempts, each with the same refusal: announced once.
            let failedAttempts = { recorder.count { if case .connectAttemptFailed = $0 { true } else { false } } }
            let seen = failedAttempts()
            #expect(await eventually(timeout: 10) {
                _ = await channel.call([1], timeout: .seconds(5))
                return failedAttempts() >= seen + 2
            })
            let refusals = recorder.all.compactMap { event -> CallStatus? in
                if case .tlsFilesRefused(_, _, let error) = event { return error }
                return nil
            }
            #expect(refusals.count == 1, "once for the change: \(refusals)")
            #expect(refusals.first?.message.contains("trusted.pem") == true, "\(refusals)")
        }
    }

    @Test("a client certificate a TLS 1.3 server refuses after the handshake is named with the rotation that did not take")
    func refusedClientCertificateNamesTheRotation() async throws {
        try await Self.withCertificates { certificates, loop in
            // The server trusts only the stranger for client certificates: ours is refused, under TLS 1.3 with an
            // alert that comes after the client's side of the handshake is done.
            let server = try Self.server(certificates, loop: loop, clientCA: certificates.strangerCertificate)
            defer { server.close() }
            let key = certificates.path("client-copy.key")
            try FileManager.default.copyItem(atPath: certificates.clientKey, toPath: key)
            let channel = try GRPCChannel(
                target: "localhost:\(server.port)",
                configuration: Self.tls(certificates) {
                    $0.certificateChainFile = certificates.clientCertificate
                    $0.privateKeyFile = key
                }, eventLoop: loop)
            defer { channel.close() }
            let before = await channel.call([1], timeout: .seconds(5)).status
            #expect(before.code == .unavailable && !before.message.contains("could not be loaded"), "\(before)")
            // A rotation caught half done: the key is not a key. The last good files stay in use, and the refusal
            // that follows names the rotation as its likely cause.
            try "not a key\n".write(toFile: key, atomically: true, encoding: .utf8)
            var last = CallStatus(code: .ok, message: "")
            #expect(await eventually(timeout: 10) {
                last = await channel.call([1], timeout: .seconds(5)).status
                return last.message.contains("the TLS files changed on disk but could not be loaded")
            }, "\(last)")
            #expect(last.code == .unavailable && last.message.contains("client-copy.key"), "\(last)")
        }
    }

    @Test("the embedded server's client CA may be an intermediate: a client whose chain ends there is accepted, as the client side does for its roots")
    func serverClientCAMayBeAnIntermediate() async throws {
        try await Self.withCertificates { certificates, loop in
            let server = try Self.server(certificates, loop: loop, clientCA: certificates.intermediateCertificate)
            defer { server.close() }
            // The leaf the intermediate signed, presented as a client certificate with the intermediate after it.
            let channel = try Self.channel(
                to: server, presenting: certificates.intermediateServerChain, key: certificates.intermediateServerKey,
                certificates, loop: loop)
            defer { channel.close() }
            // Before, the server looked for the intermediate's issuer: "unable to get issuer certificate".
            let response = await channel.call([4], timeout: .seconds(5))
            #expect(response.status == .ok, "\(response.status)")
        }
    }

    /// How a call to `target` ends on a channel trusting a copy of the test CA whose copy was then broken (a
    /// rotation that cannot be loaded, so a refusal stands while it connects).
    static func callWhileARotationIsRefused(
        _ certificates: TestCertificates, target: String, loop: ReactorLoop, connectTimeout: Duration? = nil
    ) async throws -> CallStatus {
        let trusted = certificates.path("trusted.pem")
        try FileManager.default.copyItem(atPath: certificates.caCertificate, toPath: trusted)
        var configuration = Self.tls(certificates) { $0.trustRoots = .file(trusted) }
        if let connectTimeout { configuration.minConnectTimeout = connectTimeout }
        let channel = try GRPCChannel(target: target, configuration: configuration, eventLoop: loop)
        defer { channel.close() }
        try "not a certificate\n".write(toFile: trusted, atomically: true, encoding: .utf8)
        return await channel.call([1], timeout: .seconds(5)).status
    }

    @Test("a refused connect is not blamed on a TLS rotation that did not take: the note is for handshakes only")
    func refusedConnectIsNotARotationFailure() async throws {
        try await Self.withCertificates { certificates, loop in
            let status = try await Self.callWhileARotationIsRefused(certificates, target: "127.0.0.1:\(freePort())", loop: loop)
            #expect(status.code == .unavailable && status.message.contains("refused"), "\(status)")
            #expect(!status.message.contains("could not be loaded"), "\(status)")
        }
    }

    @Test("a TLS server that never sends its SETTINGS times out without the rotation note: the handshake was done")
    func http2HandshakeTimeoutIsNotARotationFailure() async throws {
        try await Self.withCertificates { certificates, loop in
            let peer = try ScriptedPeer("silent", tls: (certificates.serverCertificate, certificates.serverKey))
            defer { peer.stop() }
            let status = try await Self.callWhileARotationIsRefused(
                certificates, target: peer.target, loop: loop, connectTimeout: .milliseconds(500))
            #expect(status.code == .unavailable && status.message.contains("SETTINGS"), "\(status)")
            #expect(!status.message.contains("could not be loaded"), "\(status)")
        }
    }

    @Test("the embedded server closes a connection that does not finish its handshake in time, TLS or not; not others")
    func serverHandshakeTimeout() async throws {
        try await Self.withCertificates { certificates, loop in
            var options = EchoServer.Options()
            options.handshakeTimeout = .milliseconds(200)
            let plaintext = try EchoServer(options: options, eventLoop: loop)
            defer { plaintext.close() }
            options.tlsCertificateChain = certificates.serverCertificate
            options.tlsPrivateKey = certificates.serverKey
            let secure = try EchoServer(options: options, eventLoop: loop)
            defer { secure.close() }
            // A client that finished its handshake first: its connection outlives the others' timeouts.
            let channel = try GRPCChannel(target: "localhost:\(secure.port)", configuration: Self.tls(certificates), eventLoop: loop)
            defer { channel.close() }
            let recorder = EventRecorder()
            channel.events.subscribe { recorder.record($0) }
            #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
            // Clients that connect and say nothing (TLS), or half the preface (plaintext): closed by the server.
            for (server, bytes) in [(secure, [UInt8]()), (plaintext, Array("PRI * HTTP/2.0\r\n".utf8))] {
                let fd = try #require(loopbackConnection(port: server.port))
                defer { close(fd) }
                _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                // Read to the end (the plaintext server sent its SETTINGS at once): it must come, within 10 s.
                var closed = false
                var readable = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                var buffer = [UInt8](repeating: 0, count: 4096)
                while !closed && poll(&readable, 1, 10_000) == 1 {
                    closed = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } <= 0
                }
                #expect(closed, "not closed within 10 s")
            }
            let after = await channel.call([2], timeout: .seconds(5))
            #expect(after.status == .ok, "\(after.status)")
            #expect(recorder.count { if case .connectAttemptStarted = $0 { true } else { false } } == 1, "\(recorder.story)")
        }
    }

    @Test("an idle TLS connection gives back the buffers one large message grew (its memory BIOs kept 1 MiB and more)")
    func idleTLSBuffersAreTrimmed() async throws {
        try await Self.withCertificates { certificates, loop in
            let server = try Self.server(certificates, loop: loop)
            defer { server.close() }
            let channel = try GRPCChannel(target: "127.0.0.1:\(server.port)", configuration: Self.tls(certificates), eventLoop: loop)
            defer { channel.close() }
            func capacity() -> Int {
                channel.inspect { pool in
                    pool.currentTransports.compactMap { ($0 as? HTTP2ClientConnection)?.tlsBufferCapacity }.reduce(0, +)
                }
            }
            let big = [UInt8](repeating: 7, count: 1 << 20)
            let response = await channel.call("/echo.Echo/Get", big, timeout: .seconds(10))
            #expect(response.status == .ok && response.message == big)
            // After the idle trim's delay (1 s without streams) the connection holds next to nothing in its BIOs, and it
            // still works.
            #expect(await eventually(timeout: 5) { capacity() < 64 << 10 }, "\(capacity()) bytes still allocated")
            let again = await channel.call("/echo.Echo/Get", big, timeout: .seconds(10))
            #expect(again.status == .ok && again.message == big)
        }
    }

    @Test("large request bodies go from the call straight into the socket's output, intact, with and without TLS")
    func requestBodiesWithoutNghttp2Copy() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let secure = try Self.server(certificates, loop: loop)
        defer { secure.close() }
        let plain = try EchoServer(port: 0, options: EchoServer.Options(), eventLoop: loop)
        defer { plain.close() }
        var plainConfiguration = Configuration()
        plainConfiguration.enableRetry = false
        let channels = [
            ("plaintext", try GRPCChannel(target: "127.0.0.1:\(plain.port)", configuration: plainConfiguration, eventLoop: loop)),
            ("TLS", try GRPCChannel(target: "127.0.0.1:\(secure.port)", configuration: Self.tls(certificates), eventLoop: loop)),
        ]
        func pattern(_ count: Int, _ seed: Int) -> [UInt8] {
            (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ seed) }
        }
        func directFrames(_ channel: GRPCChannel) -> Int {
            channel.inspect { pool in
                pool.currentTransports.compactMap { ($0 as? HTTP2ClientConnection)?.directDataFrames }.reduce(0, +)
            }
        }
        for (label, channel) in channels {
            // Below the threshold (4,096 framed bytes) bodies are copied by nghttp2 as before.
            let small = await channel.call("/echo.Echo/Get", pattern(4090, 1), timeout: .seconds(10))
            #expect(small.message == pattern(4090, 1), "\(label)")
            #expect(directFrames(channel) == 0, "\(label): a 4,095-byte body took nghttp2's copy")
            // At and above it, including bodies split over frames and over the stream window.
            for (index, size) in [4091, 16379, 16380, 16384 * 5 + 7, 1 << 20].enumerated() {
                let request = pattern(size, index)
                let response = await channel.call("/echo.Echo/Get", request, timeout: .seconds(20))
                #expect(response.status == .ok, "\(label) size \(size)")
                #expect(response.message == request, "\(label) size \(size)")
            }
            let unaryFrames = directFrames(channel)
            // Full 16 KiB frames: 1 + 1 + 1 + 5 + 64 (a frame that flow control cuts below 4 KiB is copied).
            #expect(unaryFrames >= 1 + 1 + 1 + 5 + 48, "\(label): \(unaryFrames) frames went directly")
            // A stream mixing small and large messages: a frame may end inside one message and start in the next.
            let messages = [3, 70_000, 0, 5000, 1 << 20, 4091, 1].enumerated().map { pattern($0.element, $0.offset) }
            let (received, status) = try await echoed(messages, on: channel)
            #expect(received == messages, "\(label)")
            #expect(status.code == .ok, "\(label)")
            #expect(directFrames(channel) > unaryFrames, "\(label): the stream's large messages went directly")
            channel.close()
        }
    }
}
