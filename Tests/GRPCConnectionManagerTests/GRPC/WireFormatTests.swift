import Testing
#if canImport(Glibc)
import Glibc
#endif

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

@Suite("grpc-timeout")
struct GRPCTimeoutTests {
    @Test(arguments: [
        (Int64(0), "0n"), (-5, "0n"), (1, "1n"), (999, "999n"), (1_234, "1240n"), (99_999_999, "100m"),
        (100_000_000, "100m"), (100_000_001, "101m"), (123_456_789, "124m"), (1_500_000_000, "1500m"),
        (29_999_700_000, "30S"), (200_000_000_000, "200S"), (5_400_000_000_000, "90M"), (7_200_000_000_000, "2H"),
        (100_000_000_000_000, "100000S"), (Int64.max, "2563889H"),
    ])
    func encodes(nanoseconds: Int64, expected: String) {
        #expect(GRPCTimeout.encode(nanoseconds: nanoseconds) == expected)
    }

    @Test("HTTP/2 error codes: RFC 9113's names; a made-up code is hex in messages and UNKNOWN as a metric label")
    func http2ErrorCodeNames() {
        #expect(HTTP2ErrorCode.name(0x1) == "PROTOCOL_ERROR" && HTTP2ErrorCode.label(0x1) == "PROTOCOL_ERROR")
        #expect(HTTP2ErrorCode.name(0xb) == "ENHANCE_YOUR_CALM" && HTTP2ErrorCode.label(0xd) == "HTTP_1_1_REQUIRED")
        #expect(HTTP2ErrorCode.name(0xdead) == "0xdead")
        #expect(HTTP2ErrorCode.label(0xdead) == "UNKNOWN")
    }

    @Test("the server never sees a deadline earlier than the client's, nor more than 1 % later")
    func encodingRoundsUpByAtMostOnePercent() {
        var generator = SystemRandomNumberGenerator()
        var values: [Int64] = [100_000_001, 123_456_789_123, 999_999_999_999_999]
        for _ in 0..<2_000 { values.append(Int64.random(in: 1...(1 << 50), using: &generator)) }
        for value in values {
            let text = GRPCTimeout.encode(nanoseconds: value)
            #expect(text.utf8.count <= 9)
            let decoded = GRPCTimeout.decode(text)!
            #expect(decoded >= value && Double(decoded) <= Double(value) * 1.01, "\(value) -> \(text)")
        }
    }

    @Test("a timeout's remaining time, taken a little later, is sent as the same text: HPACK indexes it once")
    func nearbyTimeoutsShareTheirText() {
        for elapsed: Int64 in stride(from: 0, to: 100_000_000, by: 999_983) {
            #expect(GRPCTimeout.encode(nanoseconds: 30_000_000_000 - elapsed) == "30S")
        }
        var bytes = [UInt8](repeating: 0, count: GRPCTimeout.maxEncodedLength)
        let length = bytes.withUnsafeMutableBufferPointer { GRPCTimeout.encode(nanoseconds: 250_000_000, into: $0) }
        #expect(Array(bytes[..<length]) == Array("250m".utf8))
    }

    @Test("the memo writes what encoding anew writes, for every timeout, whatever came before it")
    func memoMatchesEncoding() {
        var generator = SystemRandomNumberGenerator()
        var values: [Int64] = [0, -1, 1, 99, 100, 999, 1_000, 1_001, 99_999, 100_000, 999_999_999, 1_000_000_000]
        // Around each boundary of a scale and of a rounding step, where a memo's range could be one off.
        for power in 2...16 {
            let scale = Int64(pow(10.0, Double(power - 2)))
            for base in [scale * 100, scale * 1_000, scale * 299, scale * 300] where base > 0 {
                values += (-3...3).map { base &+ $0 }.filter { $0 > 0 }
            }
        }
        for _ in 0..<2_000 { values.append(Int64.random(in: 1...(1 << 50), using: &generator)) }
        // The largest, where no unit holds the rounded value exactly and the finest that fits is taken.
        values += (0..<200).map { Int64.max - $0 } + (0..<500).map { _ in Int64.random(in: 6_000_000_000_000_000_000...Int64.max, using: &generator) }
        // A decaying timeout, as calls taken a little later see it.
        values += stride(from: 30_000_000_000, to: 29_800_000_000, by: -1_999_993).map { $0 }
        var memo = GRPCTimeout.Memo()
        var fresh = [UInt8](repeating: 0, count: GRPCTimeout.maxEncodedLength)
        var memoed = fresh
        for value in values + values.shuffled() + values.reversed() {
            let expected = fresh.withUnsafeMutableBufferPointer { GRPCTimeout.encode(nanoseconds: value, into: $0) }
            let length = memoed.withUnsafeMutableBufferPointer { memo.encode(nanoseconds: value, into: $0) }
            #expect(Array(memoed[..<length]) == Array(fresh[..<expected]), "\(value)")
        }
    }

    @Test(arguments: ["", "1", "S", "123456789S", "12x", "-1S", "1.5S"])
    func rejects(_ text: String) {
        #expect(GRPCTimeout.decode(text) == nil)
    }

    @Test func decodes() {
        #expect(GRPCTimeout.decode("2H") == 7_200_000_000_000)
        #expect(GRPCTimeout.decode("3M") == 180_000_000_000)
        #expect(GRPCTimeout.decode("250m") == 250_000_000)
        #expect(GRPCTimeout.decode("7u") == 7_000)
    }
}

@Suite("percent-encoding of grpc-message")
struct PercentEncodingTests {
    @Test(arguments: [
        ("plain text", "plain text"), ("100%", "100%25"), ("né", "n%C3%A9"), ("a\nb", "a%0Ab"),
        ("日本", "%E6%97%A5%E6%9C%AC"), ("🙂", "%F0%9F%99%82"),
    ])
    func roundTrips(text: String, encoded: String) {
        #expect(PercentEncoding.encode(text) == encoded)
        #expect(PercentEncoding.decode(encoded) == text)
    }

    @Test(arguments: ["%", "%4", "%zz", "abc%", "%%41"])
    func brokenEscapesAreKeptNotDropped(_ text: String) {
        let decoded = PercentEncoding.decode(text)
        #expect(!decoded.isEmpty)
        #expect(decoded.contains("%"))
    }

    @Test func invalidUTF8BecomesReplacementCharacter() {
        #expect(PercentEncoding.decode("a%FFb") == "a\u{FFFD}b")
    }
}

@Suite("status mapping")
struct StatusMappingTests {
    @Test(arguments: [
        (400, StatusCode.internal), (401, .unauthenticated), (403, .permissionDenied), (404, .unimplemented),
        (429, .unavailable), (431, .internal), (502, .unavailable), (503, .unavailable), (504, .unavailable),
        (200, .unknown), (500, .unknown), (418, .unknown),
    ])
    func httpToGRPC(http: Int, code: StatusCode) {
        #expect(CallStatus.code(forHTTPStatus: http) == code)
    }

    @Test(arguments: [
        (UInt32(0x7), StatusCode.unavailable), (0x8, .cancelled), (0xb, .resourceExhausted),
        (0xc, .permissionDenied), (0x1, .internal), (0x2, .internal), (0x0, .internal),
    ])
    func rstStreamToGRPC(errorCode: UInt32, code: StatusCode) {
        #expect(CallStatus.forRSTStream(errorCode: errorCode).code == code)
    }

    @Test func codeNamesFollowGrpcurl() {
        #expect(StatusCode.cancelled.name == "Canceled")
        #expect(StatusCode.deadlineExceeded.name == "DeadlineExceeded")
        #expect(StatusCode.unauthenticated.name == "Unauthenticated")
        #expect(StatusCode(rawValue: 42).name == "Code(42)")
        #expect(StatusCode(name: "unavailable") == .unavailable)
        #expect(StatusCode(name: "14") == .unavailable)
    }
}

@Suite("metadata validation")
struct MetadataValidationTests {
    @Test(arguments: ["x-ok", "a.b_c-d", "0-9"])
    func acceptsValidNames(_ name: String) throws {
        var metadata = CallMetadata()
        metadata.add(name, "value")
        try metadata.validate()
        #expect(metadata.count == 1)
        #expect(metadata[name] == "value")
    }

    @Test(arguments: ["", "bad name", "colon:", "ümlaut", ":path", "te", "grpc-timeout", "content-type", "user-agent"])
    func rejectsBadOrReservedNames(_ name: String) {
        var metadata = CallMetadata()
        metadata.append(name, .string("v"))
        #expect(throws: MetadataError.self) { try metadata.validate() }
    }

    @Test(arguments: ["a\r\nx-injected: 1", "line\nbreak", "tab\there", "é", "\u{7F}"])
    func rejectsValuesWithControlOrNonASCIIBytes(_ value: String) {
        var metadata = CallMetadata()
        metadata.add("x-key", value)
        #expect(throws: MetadataError.self) { try metadata.validate() }
    }

    @Test func binaryValuesNeedTheBinSuffixAndViceVersa() {
        var binary = CallMetadata()
        binary.add("x-data", binary: [0, 1])
        #expect(throws: MetadataError.self) { try binary.validate() }
        var text = CallMetadata()
        text.add("x-data-bin", "text")
        #expect(throws: MetadataError.self) { try text.validate() }
        var good = CallMetadata()
        good.add("x-data-bin", binary: [0, 0xFF, 10, 13])
        #expect(throws: Never.self) { try good.validate() }
    }

    @Test func base64IsUnpaddedOutAndTolerantIn() {
        #expect(Base64.encode([0xFF]) == "/w")
        #expect(Base64.decode(Array("/w==".utf8)) == [0xFF])
        #expect(Base64.decode(Array("/w".utf8)) == [0xFF])
        #expect(Base64.decode(Array("_w".utf8)) == [0xFF])
        #expect(Base64.decode(Array("a".utf8)) == nil)
        #expect(Base64.decode(Array("a$".utf8)) == nil)
        let bytes = (0..<300).map { UInt8($0 % 256) }
        #expect(Base64.decode(Array(Base64.encode(bytes).utf8)) == bytes)
    }
}

@Suite("targets")
struct TargetParsingTests {
    @Test(arguments: [
        ("127.0.0.1:50051", Target.Kind.hostPort(host: "127.0.0.1", port: 50051)),
        ("[::1]:443", .hostPort(host: "::1", port: 443)),
        ("localhost:80", .hostPort(host: "localhost", port: 80)),
        ("unix:/tmp/x.sock", .unix(path: "/tmp/x.sock")),
        ("unix:///tmp/y.sock", .unix(path: "/tmp/y.sock")),
    ])
    func parses(_ text: String, expected: Target.Kind) throws {
        let target = try Target(parsing: text)
        #expect(target.kind == expected)
        #expect(target.description == (text.hasPrefix("unix://") ? "unix:" + text.dropFirst(7) : text))
    }

    @Test(arguments: ["127.0.0.1", "host:", ":80", "[::1]443", "[::1", "h:0", "h:70000", "unix:", "::1:80", "h:+80", "h:-1", "dns:/x:1"])
    func rejects(_ text: String) {
        #expect(throws: ConfigurationError.self) { try Target(parsing: text) }
    }

    @Test("unix targets: an authority or a path longer than a socket address holds is refused up front")
    func unixTargetLimits() throws {
        #expect(try Target(parsing: "unix:///tmp/x").kind == .unix(path: "/tmp/x"))
        #expect(try Target(parsing: "unix:relative/x").kind == .unix(path: "relative/x"))
        #expect(try Target(parsing: "unix:/" + String(repeating: "a", count: 106)).kind == .unix(path: "/" + String(repeating: "a", count: 106)))
        for bad in ["unix://host/tmp/x", "unix:/" + String(repeating: "a", count: 107)] {
            #expect(throws: ConfigurationError.self, "\(bad)") { try Target(parsing: bad) }
        }
    }

    @Test("an IPv6 zone names an interface, written %zone or %25zone (RFC 6874); the authority writes it %25")
    func ipv6Zones() throws {
        for text in ["[fe80::1%lo]:80", "[fe80::1%25lo]:80"] {
            let target = try Target(parsing: text)
            #expect(target.kind == .hostPort(host: "fe80::1%lo", port: 80), "\(text)")
            #expect(target.numericAddresses?.first?.description == "[fe80::1%lo]:80")
            #expect(target.authority == "[fe80::1%25lo]:80")
        }
        #expect(try Target(parsing: "[fe80::1%1]:80").numericAddresses != nil, "an interface's index")
        #expect(try Target(parsing: "[fe80::1%251]:80").kind == .hostPort(host: "fe80::1%1", port: 80), "RFC 6874: %25 then 1")
        #expect(try Target(parsing: "[fe80::1%1]:80").authority == "[fe80::1%251]:80")
        for bad in ["[fe80::1%nosuchif0]:80", "[fe80::1%]:80", "[fe80::1%25]:80", "[1.2.3.4%lo]:80"] {
            #expect(throws: ConfigurationError.self, "\(bad)") { try Target(parsing: bad) }
            do { _ = try Target(parsing: bad) } catch { #expect(error.message.contains("zone"), "\(bad): \(error.message)") }
        }
    }

    @Test("dns:///host:port and dns:host:port are host:port; a DNS authority and other schemes are refused, named")
    func dnsScheme() throws {
        #expect(try Target(parsing: "dns:///echo.local:50051").kind == .hostPort(host: "echo.local", port: 50051))
        #expect(try Target(parsing: "dns:echo.local:50051").kind == .hostPort(host: "echo.local", port: 50051))
        #expect(try Target(parsing: "dns:///[::1]:5").description == "[::1]:5")
        #expect(try Target(parsing: "dns:53").kind == .hostPort(host: "dns", port: 53), "a host named dns")
        for (bad, reason) in [
            ("dns://8.8.8.8/echo.local:50051", "DNS server"), ("dns:///unix:/tmp/x", "dns:///host:port"),
            ("etcd://auth/name", "etcd:///name"), ("xds:///echo", "expected host:port"),
        ] {
            #expect(throws: ConfigurationError.self) { try Target(parsing: bad) }
            do { _ = try Target(parsing: bad) } catch { #expect(error.message.contains(reason), "\(bad): \(error.message)") }
        }
    }

    @Test("per-method tables find a service's entry under either spelling")
    func perMethodKeys() {
        var retry = RetrySettings()
        var once = CallRetryPolicy()
        once.maxAttempts = 1
        retry.perMethod = ["pkg.Pay": once]
        #expect(retry.policy(for: "/pkg.Pay/Charge").maxAttempts == 1)
        #expect(retry.policy(for: "/pkg.Other/Charge").maxAttempts == 3)
        retry.perMethod = ["/pkg.Pay/": once]
        #expect(retry.policy(for: "/pkg.Pay/Charge").maxAttempts == 1)
        // One segment, or none: no service part, and no crash looking for one (a gateway passes any path on).
        for path in ["/a", "/", "a"] { #expect(retry.policy(for: path).maxAttempts == 3, "\(path)") }
        #expect(Configuration.perMethod(["/pkg.Pay/": 7], path: "/a") == nil)
        #expect(Configuration.perMethod(["/pkg.Pay/": 7], path: "/pkg.Pay/Charge") == 7)
        #expect(Configuration.perMethod(["pkg.Pay": 7], path: "/pkg.Pay/Charge") == 7)
        #expect(Configuration.perMethod(["/pkg.Pay/Charge": 7, "pkg.Pay": 1], path: "/pkg.Pay/Charge") == 7)
    }

    @Test func unixAuthorityIsLocalhost() throws {
        #expect(try Target(parsing: "unix:/tmp/x").authority == "localhost")
        #expect(try Target(parsing: "[::1]:5").authority == "[::1]:5")
    }

    /// Every check `Configuration.validate()` makes, broken one at a time: the error names that field.
    @Test func configurationErrorsNameTheField() {
        let cases: [(String, (inout Configuration) -> Void)] = [
            ("maxMessageSize", { $0.maxMessageSize = 0 }),
            ("streamBufferSize", { $0.streamBufferSize = 0 }),
            ("minConnectTimeout", { $0.minConnectTimeout = .zero }),
            ("keepAliveTime", { $0.keepAliveTime = .zero }),
            ("keepAliveTimeout", { $0.keepAliveTimeout = .zero }),
            ("maxReconnectDelay", { $0.maxReconnectDelay = .zero }),
            ("connectionAttemptDelay", { $0.connectionAttemptDelay = .zero }),
            ("reconnectBackoff.initial", { $0.reconnectBackoff.initial = .zero }),
            ("reconnectBackoff.multiplier", { $0.reconnectBackoff.multiplier = 0.5 }),
            ("reconnectBackoff.jitter", { $0.reconnectBackoff.jitter = 2 }),
            ("idleTimeout", { $0.idleTimeout = .seconds(-1) }),
            ("connectionsPerTarget", { $0.connectionsPerTarget = 0 }),
            ("maxQueuedCalls", { $0.maxQueuedCalls = 0 }),
            ("resolutionInterval", { $0.resolutionInterval = .seconds(-1) }),
            ("minimumResolutionInterval", { $0.minimumResolutionInterval = .seconds(-1) }),
            ("maxConnectionsPerTarget", { $0.connectionsPerTarget = 2; $0.maxConnectionsPerTarget = 1 }),
            ("http2.initialStreamWindowSize", { $0.http2.initialStreamWindowSize = 10 }),
            ("http2.connectionWindowSize", { $0.http2.connectionWindowSize = 10 }),
            ("http2.maxFrameSize", { $0.http2.maxFrameSize = 1 << 24 }),
            ("http2.maxHeaderListSize", { $0.http2.maxHeaderListSize = 0 }),
            ("http2.maxHeaderListSize", { $0.http2.maxHeaderListSize = 1 << 32 }),
            ("retry.policy.maxAttempts", { $0.retry.policy.maxAttempts = 11 }),
            ("retry.policy.initialBackoff", { $0.retry.policy.initialBackoff = .zero }),
            ("retry.policy.backoffMultiplier", { $0.retry.policy.backoffMultiplier = 0 }),
            ("retry.policy.backoffMultiplier", { $0.retry.policy.backoffMultiplier = .nan }),
            ("retry.policy.backoffMultiplier", { $0.retry.policy.backoffMultiplier = .infinity }),
            ("retry.policy.maxBackoff", { $0.retry.policy.maxBackoff = .zero }),
            ("retry.policy.perAttemptTimeout", { $0.retry.policy.perAttemptTimeout = .zero }),
            ("retry.policy.perAttemptTimeout", {
                $0.retry.policy.perAttemptTimeout = .seconds(1)
                $0.retry.policy.maxAttempts = 1
            }),
            ("retry.policy.perAttemptTimeout", {
                $0.retry.policy.perAttemptTimeout = .seconds(1)
                $0.retry.policy.retryableCodes = [.unavailable]
            }),
            ("retry.perMethod[/a.B/C].maxAttempts", {
                var policy = CallRetryPolicy()
                policy.maxAttempts = 0
                $0.retry.perMethod["/a.B/C"] = policy
            }),
            ("retry.throttling.maxTokens", { $0.retry.throttling?.maxTokens = 0 }),
            ("retry.throttling.tokenRatio", { $0.retry.throttling?.tokenRatio = 0 }),
            ("retry.throttling.tokenRatio", { $0.retry.throttling?.tokenRatio = 0.0005 }),  // would never refill
            ("retry.throttling.tokenRatio", { $0.retry.throttling?.tokenRatio = .infinity }),  // trapped at the first end
            ("retry.throttling.tokenRatio", { $0.retry.throttling?.tokenRatio = .nan }),
            ("retry.policy.retryableCodes", { $0.retry.policy.retryableCodes = [.ok, .unavailable] }),
            ("retry.perMethod[pkg.Pay/Charge]", { $0.retry.perMethod["pkg.Pay/Charge"] = CallRetryPolicy() }),
            ("retry.perMethod[/pkg.Pay]", { $0.retry.perMethod["/pkg.Pay"] = CallRetryPolicy() }),
            ("hedging[pkg.Pay/Charge]", { $0.hedging["pkg.Pay/Charge"] = CallHedgingPolicy() }),
            ("compression.requestEncodingPerMethod[a/b/c]", { $0.compression.requestEncodingPerMethod["a/b/c"] = .gzip }),
            ("circuitBreaker.failureCodes", { $0.circuitBreaker.failureCodes = [.ok, .unavailable] }),
            ("circuitBreaker.slowCallDurationThreshold", { $0.circuitBreaker.slowCallDurationThreshold = .zero }),
            ("dns.servers", { $0.dns.servers = [] }),
            ("circuitBreaker.failureThreshold", { $0.circuitBreaker.failureThreshold = 0 }),
            ("circuitBreaker.successThreshold", { $0.circuitBreaker.successThreshold = 0 }),
            ("circuitBreaker.timeout", { $0.circuitBreaker.timeout = .zero }),
            ("circuitBreaker.failureRateThreshold", { $0.circuitBreaker.failureRateThreshold = 1.5 }),
            ("circuitBreaker.minimumNumberOfCalls", { $0.circuitBreaker.minimumNumberOfCalls = 0 }),
            ("circuitBreaker.slidingWindow", { $0.circuitBreaker.slidingWindow = .time(seconds: 0) }),
            ("circuitBreaker.permittedCallsInHalfOpen", { $0.circuitBreaker.permittedCallsInHalfOpen = 0 }),
            ("tls.certificateChainFile", {
                var tls = TLSSettings()
                tls.privateKeyFile = "/tmp/key.pem"
                $0.tls = tls
            }),
            ("userAgentPrefix", { $0.userAgentPrefix = "bad\nprefix" }),
            ("tls.serverName", {
                var tls = TLSSettings()
                tls.serverName = "api.example\n"  // read from a file with its newline
                $0.tls = tls
            }),
            ("tls.serverName", {
                var tls = TLSSettings()
                tls.serverName = "api.example.com:443"  // a port: sent in SNI, no certificate names it
                $0.tls = tls
            }),
            ("tls.serverName", {
                var tls = TLSSettings()
                tls.serverName = "[::1]"
                $0.tls = tls
            }),
            ("tls.serverName", {
                var tls = TLSSettings()
                tls.serverName = "fe80::1%eth0"  // a zone: OpenSSL cannot compare it with the certificate's
                $0.tls = tls
            }),
            ("tls.serverName", {
                var tls = TLSSettings()
                tls.serverName = ".example.com"  // OpenSSL would accept any name under example.com
                $0.tls = tls
            }),
            ("loadBalancingPolicies", { $0.loadBalancingPolicies[""] = .pickFirst }),
            ("healthCheckServiceNames", { $0.healthCheckServiceNames[""] = "" }),
            // Of several bad keys, the first in order is named (not whichever the dictionary yields first).
            ("retry.perMethod[a/b/c]", { for key in ["x/y/z", "a/b/c", "m/n/o", "d/e/f"] { $0.retry.perMethod[key] = CallRetryPolicy() } }),
            ("hedging[a/b/c]", { for key in ["x/y/z", "a/b/c", "m/n/o", "d/e/f"] { $0.hedging[key] = CallHedgingPolicy() } }),
        ]
        #expect(throws: Never.self) { try Configuration().validate() }
        // Valid: a cap below the first delay caps it; each table takes a method and both spellings of a service.
        var valid = Configuration()
        valid.maxReconnectDelay = .milliseconds(50)
        valid.retry.perMethod = ["/pkg.Pay/Charge": CallRetryPolicy(), "pkg.Pay": CallRetryPolicy(), "/pkg.Pay/": CallRetryPolicy()]
        valid.hedging = ["/pkg.Pay/Charge": CallHedgingPolicy(), "pkg.Ship": CallHedgingPolicy(), "/pkg.Mail/": CallHedgingPolicy()]
        valid.retry.throttling?.tokenRatio = 0.001
        // gRFC A6 takes a retry multiplier below 1 and a cap below the first delay (a service config's, as grpc-go).
        valid.retry.policy.backoffMultiplier = 0.5
        valid.retry.policy.maxBackoff = .milliseconds(50)
        #expect(throws: Never.self) { try valid.validate() }
        #expect(valid.retry.policy.backoff(retry: 1, unit: 0.999_999) < .milliseconds(50), "capped below the first delay")
        valid.retry.policy.maxBackoff = .seconds(1)
        #expect(valid.retry.policy.backoff(retry: 3, unit: 0.5) == .milliseconds(12.5), "100 ms x 0.5 x 0.5, half of it")
        // Both at once: the delays shrink under a cap below the first (grpc-go: min(1 s x 0.25, 500 ms)).
        var shrinking = CallRetryPolicy()
        shrinking.initialBackoff = .seconds(1)
        shrinking.backoffMultiplier = 0.5
        shrinking.maxBackoff = .milliseconds(500)
        #expect(shrinking.backoff(retry: 1, unit: 0.5) == .milliseconds(250))
        #expect(shrinking.backoff(retry: 3, unit: 0.5) == .milliseconds(125))
        for name in ["api.example.com", "::1", "127.0.0.1", "localhost."] {
            var named = Configuration()
            var tls = TLSSettings()
            tls.serverName = name
            named.tls = tls
            #expect(throws: Never.self, "\(name)") { try named.validate() }
        }
        for (field, breakIt) in cases {
            var configuration = Configuration()
            breakIt(&configuration)
            #expect(throws: ConfigurationError.self, "\(field)") { try configuration.validate() }
            do {
                try configuration.validate()
            } catch {
                #expect(error.field == field)
                #expect(!error.message.isEmpty)
            }
        }
    }
}
