// libFuzzer target: reading a response's header blocks (Sources/GRPCCMWire/ResponseHead.swift): HTTP status,
// grpc-status, grpc-message (percent-decoding), content-type, grpc-encoding, metadata and -bin values (base64),
// the header list size bound, and grpc-timeout parsing of any value.
//
// Input: a sequence of records. Record: one control byte (bit 0: end the block here, bit 1: with END_STREAM, bits
// 2-3: which well-known name to use, or a name from the input), then a length-prefixed name and value. Invariants:
// no crash; a status is always produced; its code is always within 0...16; a second head reading the same fields
// through a metadata name cache gives the same answer for every field and the same response. The cache is the run's
// own (names kept from earlier inputs meet later ones) or, when bit 0 of the first byte is set, one for this input
// alone (the shared one fills with the first names it meets and then keeps no more).

private let names: [[UInt8]] = [Array(":status".utf8), Array("grpc-status".utf8), Array("grpc-message".utf8)]
// The fuzzer runs inputs one at a time on one thread.
nonisolated(unsafe) private let nameCache = MetadataNameCache()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzResponseHead(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let bytes = UnsafeBufferPointer(start: data, count: size)
    var head = ResponseHead(maxHeaderListSize: 256 + Int(bytes[0]) * 16)
    var cached = ResponseHead(maxHeaderListSize: 256 + Int(bytes[0]) * 16)
    let metadataNames = bytes[0] & 1 == 0 ? nameCache : MetadataNameCache()
    var index = 1
    var ended = false
    while index + 2 < size && !ended {
        let control = bytes[index]
        let nameLength = Int(bytes[index + 1]) % 40
        let valueLength = Int(bytes[index + 2])
        index += 3
        guard index + nameLength + valueLength <= size else { break }
        let which = Int(control >> 2) & 3
        let name: [UInt8] = which < 3 ? names[which] : Array(bytes[index..<(index + nameLength)])
        let value = Array(bytes[(index + nameLength)..<(index + nameLength + valueLength)])
        index += nameLength + valueLength
        let accepted = name.withUnsafeBufferPointer { n in value.withUnsafeBufferPointer { v in head.header(name: n, value: v) } }
        let acceptedCached = name.withUnsafeBufferPointer { n in
            value.withUnsafeBufferPointer { v in cached.header(name: n, value: v, names: metadataNames) }
        }
        precondition(accepted == acceptedCached && head.malformation == cached.malformation, "the name cache changed a field's fate")
        _ = GRPCTimeout.decode(String(decoding: value, as: UTF8.self))
        if !accepted { break }
        if control & 1 == 1 {
            let endStream = control & 2 == 2
            let block = head.endBlock(endStream: endStream)
            let cachedBlock = cached.endBlock(endStream: endStream)
            precondition(block == cachedBlock, "the name cache changed how a block ended")
            precondition((block == .notGRPC) == (block != .malformed && head.notGRPCResponse() != nil && !endStream
                && head.completeBlocks == 1), "notGRPC and notGRPCResponse() disagree")
            ended = endStream
        }
    }
    let status = head.status(errorCode: UInt32(bytes[0] % 16))
    precondition(status == cached.status(errorCode: UInt32(bytes[0] % 16)), "the name cache changed the status")
    precondition(head.initialMetadata == cached.initialMetadata && head.trailingMetadata == cached.trailingMetadata)
    precondition((0...16).contains(status.code.rawValue), "status code \(status.code.rawValue) out of range")
    return 0
}
