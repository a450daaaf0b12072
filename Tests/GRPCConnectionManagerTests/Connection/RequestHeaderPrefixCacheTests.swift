import CNghttp2
import Testing

@testable import GRPCCMTransport

@Suite("Request header prefixes shared per loop")
struct RequestHeaderPrefixCacheTests {
    /// The fields of a prefix as (name, value) text.
    private func fields(_ prefix: RequestHeaderPrefix) -> [String] {
        prefix.nvs.map { nv in
            let name = String(decoding: UnsafeBufferPointer(start: nv.name, count: nv.namelen), as: UTF8.self)
            let value = String(decoding: UnsafeBufferPointer(start: nv.value, count: nv.valuelen), as: UTF8.self)
            return "\(name): \(value)"
        }
    }

    @Test func connectionsWithTheSameFieldsShareOnePrefix() {
        let cache = RequestHeaderPrefixCache()
        let first = cache.prefix(authority: "a.example:443", scheme: "https", userAgent: "ua/1", acceptEncoding: nil)
        let second = cache.prefix(authority: "a.example:443", scheme: "https", userAgent: "ua/1", acceptEncoding: nil)
        #expect(first === second)
        #expect(
            self.fields(first) == [
                ":method: POST", ":scheme: https", ":authority: a.example:443", "te: trailers",
                "content-type: application/grpc", "user-agent: ua/1",
            ])
    }

    @Test func anyDifferentFieldGetsItsOwnPrefix() {
        let cache = RequestHeaderPrefixCache()
        let base = cache.prefix(authority: "a:1", scheme: "http", userAgent: "ua", acceptEncoding: nil)
        let others = [
            cache.prefix(authority: "b:1", scheme: "http", userAgent: "ua", acceptEncoding: nil),
            cache.prefix(authority: "a:1", scheme: "https", userAgent: "ua", acceptEncoding: nil),
            cache.prefix(authority: "a:1", scheme: "http", userAgent: "ub", acceptEncoding: nil),
            cache.prefix(authority: "a:1", scheme: "http", userAgent: "ua", acceptEncoding: "gzip"),
        ]
        for other in others { #expect(other !== base) }
        #expect(self.fields(others[0]).contains(":authority: b:1"))
        #expect(self.fields(others[1]).contains(":scheme: https"))
        #expect(self.fields(others[2]).contains("user-agent: ub"))
        #expect(self.fields(others[3]).last == "grpc-accept-encoding: gzip")
        #expect(!self.fields(base).contains { $0.hasPrefix("grpc-accept-encoding") })
    }

    @Test func aPrefixLivesOnlyAsLongAsItsConnectionsAndDeadEntriesAreSwept() {
        let cache = RequestHeaderPrefixCache()
        weak var dropped: RequestHeaderPrefix?
        do {
            let prefix = cache.prefix(authority: "gone:1", scheme: "http", userAgent: "ua", acceptEncoding: nil)
            dropped = prefix
        }
        #expect(dropped == nil)  // the cache did not keep it alive
        // A thousand authorities, each dropped at once: the table is swept as it doubles, so it stays small.
        for index in 0..<1000 {
            _ = cache.prefix(authority: "host\(index):1", scheme: "http", userAgent: "ua", acceptEncoding: nil)
        }
        #expect(cache.count <= 8)
        let kept = cache.prefix(authority: "kept:1", scheme: "http", userAgent: "ua", acceptEncoding: nil)
        for index in 0..<100 {
            _ = cache.prefix(authority: "more\(index):1", scheme: "http", userAgent: "ua", acceptEncoding: nil)
        }
        #expect(cache.prefix(authority: "kept:1", scheme: "http", userAgent: "ua", acceptEncoding: nil) === kept)
    }
}
