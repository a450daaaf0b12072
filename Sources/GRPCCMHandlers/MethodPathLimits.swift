/// What the handlers keep per method path. Paths come from callers (a gateway passes any through): the breakers
/// and the metrics' series keep state of their own for a bounded number of them, each not too long, and count the
/// rest together under `other` (gRFC A66's word for methods it does not name). Both use the same rules, so that a
/// method's breaker and its series are the same one.
package enum MethodPathLimits {
    /// Methods with state of their own, all services of a loop together; later ones share `other`.
    package static let trackedMethods = 1000
    /// A longer path shares `other` from its first call: each label is written on some 30 lines of every scrape,
    /// and a path may be as long as the header list allows.
    package static let maxPathBytes = 256
    package static let other = "other"

    /// `path`, or `other` when it is too long to have state of its own.
    @inline(__always)
    package static func tracked(_ path: String) -> String {
        path.utf8.count <= Self.maxPathBytes ? path : Self.other
    }
}
