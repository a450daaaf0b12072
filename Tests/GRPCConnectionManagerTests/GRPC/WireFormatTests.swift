import Testing

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
        (Int64(0), "0n"), (-5, "0n"), (1, "1n"), (99_999_999, "99999999n"), (100_000_000, "100000u"),
        (100_000_001, "100001u"), (1_500_000_000, "1500000u"), (200_000_000_000, "200000m"),
        (100_000_000_000_000, "100000S"), (Int64.max, "2562048H"),
    ])
    func encodes(nanoseconds: Int64, expected: String) {
        #expect(GRPCTimeout.encode(nanoseconds: nanoseconds) == expected)
    }

    @Test func encodingNeverShortensTheDeadline() {
        for value: Int64 in [100_000_001, 123_456_789_123, 999_999_999_999_999] {
            let text = GRPCTimeout.encode(nanoseconds: value)
            #expect(text.count <= 9)
            #expect(GRPCTimeout.decode(text)! >= value)
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
        #expect(Status.code(forHTTPStatus: http) == code)
    }

    @Test(arguments: [
        (UInt32(0x7), StatusCode.unavailable), (0x8, .cancelled), (0xb, .resourceExhausted),
        (0xc, .permissionDenied), (0x1, .internal), (0x2, .internal), (0x0, .internal),
    ])
    func rstStreamToGRPC(errorCode: UInt32, code: StatusCode) {
        #expect(Status.forRSTStream(errorCode: errorCode).code == code)
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
        var metadata = Metadata()
        metadata.add(name, "value")
        try metadata.validate()
    }

    @Test(arguments: ["", "bad name", "colon:", "ümlaut", ":path", "te", "grpc-timeout", "content-type"])
    func rejectsBadOrReservedNames(_ name: String) {
        var metadata = Metadata()
        metadata.append(name, .string("v"))
        #expect(throws: MetadataError.self) { try metadata.validate() }
    }

    @Test(arguments: ["a\r\nx-injected: 1", "line\nbreak", "tab\there", "é", "\u{7F}"])
    func rejectsValuesWithControlOrNonASCIIBytes(_ value: String) {
        var metadata = Metadata()
        metadata.add("x-key", value)
        #expect(throws: MetadataError.self) { try metadata.validate() }
    }

    @Test func binaryValuesNeedTheBinSuffixAndViceVersa() {
        var binary = Metadata()
        binary.add("x-data", binary: [0, 1])
        #expect(throws: MetadataError.self) { try binary.validate() }
        var text = Metadata()
        text.add("x-data-bin", "text")
        #expect(throws: MetadataError.self) { try text.validate() }
        var good = Metadata()
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
    @Test(arguments: ["127.0.0.1:50051", "[::1]:443", "localhost:80", "unix:/tmp/x.sock", "unix:///tmp/y.sock"])
    func parses(_ text: String) throws {
        _ = try Target(parsing: text)
    }

    @Test(arguments: ["127.0.0.1", "host:", ":80", "[::1]443", "[::1", "h:0", "h:70000", "unix:", "::1:80"])
    func rejects(_ text: String) {
        #expect(throws: ConfigurationError.self) { try Target(parsing: text) }
    }

    @Test func unixAuthorityIsLocalhost() throws {
        #expect(try Target(parsing: "unix:/tmp/x").authority == "localhost")
        #expect(try Target(parsing: "[::1]:5").authority == "[::1]:5")
    }

    @Test func configurationErrorsNameTheField() {
        var configuration = Configuration()
        configuration.maxMessageSize = 0
        #expect(throws: ConfigurationError(field: "maxMessageSize", message: "must be greater than zero")) {
            try configuration.validate()
        }
        configuration = Configuration()
        configuration.minConnectTimeout = .zero
        #expect(throws: ConfigurationError.self) { try configuration.validate() }
        configuration = Configuration()
        configuration.http2.initialStreamWindowSize = 10
        #expect(throws: ConfigurationError.self) { try configuration.validate() }
    }
}
