import GRPCCMReactor
import GRPCCMWire

/// TLS for a connection, through OpenSSL 3. `nil` in `Configuration.tls` means plaintext (h2c), as in the Go
/// original; the CLI, like grpcurl, uses TLS unless `--plaintext` is given.
///
/// Verified by default: the server's chain against the system trust store (or `trustRoots`; in either, any
/// certificate is an anchor, an intermediate CA too), and its name
/// (DNS names and IP addresses in subjectAltName) against `serverName` or the target's host. ALPN offers `h2`
/// and a server that does not select it is refused. TLS 1.2 is the minimum.
public struct TLSSettings: Sendable, Hashable {
    /// Where trusted CA certificates come from.
    public enum TrustRoots: Sendable, Hashable {
        /// The system trust store (OpenSSL's default verify paths).
        case system
        /// CA certificates in a PEM file.
        case file(String)
    }

    /// Default `.system`.
    public var trustRoots: TrustRoots = .system
    /// The client certificate chain (PEM) for mutual TLS; nil: none.
    public var certificateChainFile: String?
    /// The client private key (PEM) for mutual TLS; nil: none.
    public var privateKeyFile: String?
    /// The name sent as SNI, checked against the certificate, and sent as the requests' `:authority` (as grpc-go
    /// does with its credentials' server name); nil: the target's host (`localhost` for a Unix socket). A trailing
    /// dot is left out for TLS.
    public var serverName: String?
    /// Check the certificate chain and the name. `false` is grpcurl's `-insecure`: only when asked.
    public var verifyCertificate: Bool = true

    public init() {}

    /// TLS with the system trust store and default verification.
    public static var defaults: TLSSettings { TLSSettings() }

    /// Checks the fields that can be checked without the files.
    /// - Throws: `ConfigurationError` naming the field.
    package func validate() throws(ConfigurationError) {
        if (self.certificateChainFile == nil) != (self.privateKeyFile == nil) {
            throw ConfigurationError(
                field: "tls.certificateChainFile", message: "a client certificate needs its private key, and the other way round")
        }
        if let name = self.serverName, name.utf8.contains(where: { $0 <= 0x20 || $0 >= 0x7F }) {
            // It is sent as the :authority and as SNI: a newline read with it from a file would corrupt the one and
            // fail every handshake's name check with the other.
            throw ConfigurationError(
                field: "tls.serverName", message: "must be a host name (printable ASCII, no spaces): \"\(name)\"")
        }
        if let name = self.serverName, let problem = Self.serverNameProblem(name) {
            throw ConfigurationError(field: "tls.serverName", message: "\(problem): \"\(name)\"")
        }
        if self.verifyCertificate, let name = self.serverName, name.isEmpty {
            // An empty name would verify nothing but the chain: any certificate the trust roots signed would do.
            throw ConfigurationError(
                field: "tls.serverName", message: "must not be empty while verifyCertificate is on (nil uses the target's host)")
        }
    }

    /// Why `name` is not a host name or an IP address as a certificate names one (nil when it is): a port or
    /// brackets (`api.example.com:443`, `[::1]`) would be sent in SNI and compared with the certificate's names as
    /// written, and every handshake would fail "hostname mismatch"; an IPv6 zone (`fe80::1%eth0`) cannot be
    /// compared at all.
    private static func serverNameProblem(_ name: String) -> String? {
        if name.contains("%") { return "must not carry an IPv6 zone (a certificate names the address without one)" }
        if name.hasPrefix(".") {
            // OpenSSL's name check reads a leading dot as any name under the domain (a certificate for
            // evil.example.com would pass for ".example.com").
            return "must not begin with a dot (it would match any name under that domain)"
        }
        if name.contains(where: { "[]/@".contains($0) }) || (name.contains(":") && NetworkAddress(ip: name, port: 0) == nil) {
            return "must be a host name or an IP address, without a port or brackets"
        }
        return nil
    }
}
