/// The keys of the per-method tables (retry, hedging, request compression): `/package.Service/Method` for a method;
/// `package.Service` or `/package.Service/` (gRFC A6's form) for a whole service. One place says which keys are
/// valid and how a call's path finds its entry, so that every table reads them alike.
package enum MethodKeys {
    /// The entry of `table` for a call to `path` (`/package.Service/Method`): the method's, else its service's
    /// (`package.Service` first, then `/package.Service/`). Callers test `table.isEmpty` first, in their own
    /// module: the common case then costs no call (one into this generic function cost about 90 instructions per
    /// call at the perf gate).
    package static func lookUp<Value>(_ table: [String: Value], path: String) -> Value? {
        if let value = table[path] { return value }
        // A path of one segment ("/a"), or none, has no service part.
        let parts = path.split(separator: "/")
        guard parts.count == 2 else { return nil }
        return table[String(parts[0])] ?? table["/\(parts[0])/"]
    }

    /// Whether `key` is one of the three spellings. Anything else (`package.Service/Method`, grpcurl's spelling)
    /// would match no call, and its setting would silently not apply.
    package static func isValid(_ key: String) -> Bool {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        let isMethodOrSlashedService = parts.count == 3 && parts[0].isEmpty && !parts[1].isEmpty
        let isService = !key.isEmpty && !key.contains("/")
        return isMethodOrSlashedService || isService
    }
}
