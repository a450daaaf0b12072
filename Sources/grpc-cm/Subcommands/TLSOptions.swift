import ArgumentParser
import GRPCConnectionManager

/// Transport security flags shared by `call` and `health`, as grpcurl spells them: TLS unless --plaintext.
struct TLSOptions: ParsableArguments {
    @Flag(help: "Use HTTP/2 without TLS (h2c).")
    var plaintext = false

    @Flag(help: "Skip verification of the server's certificate chain and name (TLS only).")
    var insecure = false

    @Option(help: "PEM file of CA certificates to trust instead of the system store.")
    var cacert: String?

    @Option(help: "PEM file of the client certificate chain (mutual TLS).")
    var cert: String?

    @Option(help: "PEM file of the client private key (mutual TLS).")
    var key: String?

    @Option(help: "Name for SNI and certificate verification (default: the target's host).")
    var servername: String?

    func validate() throws {
        if self.plaintext && (self.insecure || self.cacert != nil || self.cert != nil || self.key != nil || self.servername != nil) {
            throw ValidationError("--plaintext cannot be combined with TLS options (--insecure, --cacert, --cert, --key, --servername)")
        }
        if (self.cert == nil) != (self.key == nil) {
            throw ValidationError("--cert and --key go together")
        }
    }

    /// nil for --plaintext.
    var configuration: TLSSettings? {
        if self.plaintext { return nil }
        return cliTLSSettings(
            caFile: self.cacert, certificate: self.cert, key: self.key, serverName: self.servername, verify: !self.insecure)
    }
}

/// TLS settings from the flags of `call` and `health` (which spell them differently).
func cliTLSSettings(caFile: String?, certificate: String?, key: String?, serverName: String?, verify: Bool) -> TLSSettings {
    var tls = TLSSettings()
    if let caFile { tls.trustRoots = .file(caFile) }
    tls.certificateChainFile = certificate
    tls.privateKeyFile = key
    tls.serverName = serverName
    tls.verifyCertificate = verify
    return tls
}
