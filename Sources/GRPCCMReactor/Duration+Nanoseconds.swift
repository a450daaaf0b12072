extension Duration {
    /// Whole nanoseconds (truncated toward zero), saturating at `Int64.min`/`Int64.max`.
    ///
    /// A `Duration` is its attoseconds as one two's-complement 128-bit integer, low word first (the two stored
    /// properties of a frozen struct), so it is divided by 10^9 in one step. Through `components`, which divides by
    /// 10^18 first, it cost about 150 instructions more, once for every call with a timeout. Tested against
    /// `components` over the whole range.
    package var nanoseconds: Int64 {
        let nanoseconds = unsafeBitCast(self, to: Int128.self) / 1_000_000_000
        if nanoseconds > Int128(Int64.max) { return .max }
        if nanoseconds < Int128(Int64.min) { return .min }
        return Int64(nanoseconds)
    }
}
