// libFuzzer target: percent-encoding (grpc-message) and base64 (-bin metadata) in
// Sources/GRPCCMWire/PercentEncoding.swift and Base64.swift. Invariants: decoding arbitrary bytes never crashes;
// encoding then decoding gives the input back, for both.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzEncodings(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    // Arbitrary input to the decoders.
    _ = PercentEncoding.decode(bytes)
    _ = Base64.decode(bytes)
    // Round trips.
    let text = String(decoding: bytes, as: UTF8.self)
    precondition(PercentEncoding.decode(PercentEncoding.encode(text)) == text, "percent-encoding round trip")
    let encoded = Base64.encode(bytes)
    precondition(Base64.decode(Array(encoded.utf8)) == bytes, "base64 round trip")
    return 0
}
