extension Duration {
    /// Whole nanoseconds (truncated toward zero), saturating at `Int64.min`/`Int64.max`.
    ///
    /// The attoseconds divided by 10^9 in one 128-bit step. Through `components`, which divides by 10^18 first, it
    /// cost about 150 instructions more, once for every call with a timeout (and `components` traps when the
    /// seconds do not fit an `Int64`, where this saturates).
    package var nanoseconds: Int64 {
        let nanoseconds = self.attoseconds / 1_000_000_000
        if nanoseconds > Int128(Int64.max) { return .max }
        if nanoseconds < Int128(Int64.min) { return .min }
        return Int64(nanoseconds)
    }
}
