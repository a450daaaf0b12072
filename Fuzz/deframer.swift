// libFuzzer target: the gRPC message deframer (Sources/GRPCCMWire/MessageDeframer.swift).
//
// The input is cut into chunks whose sizes come from its own first bytes, so every way a message can straddle DATA
// frames is tried. Invariants: no crash; every message handed out is within the limit; the bytes of the messages
// plus their 5-byte prefixes never exceed the bytes fed; an error ends the stream (nothing is fed after it).

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzDeframer(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 1 else { return 0 }
    let bytes = UnsafeBufferPointer(start: data, count: size)
    let limit = Int(bytes[0]) * 64 + 1
    var deframer = MessageDeframer(maxMessageSize: limit)
    deframer.compressionAllowed = bytes[1] & 1 == 1
    var offset = 2
    var chunkSeed = Int(bytes[1])
    var delivered = 0
    while offset < size {
        chunkSeed = (chunkSeed &* 1_103_515_245 &+ 12_345) & 0x7FFF_FFFF
        let chunk = min(size - offset, 1 + chunkSeed % 97)
        let slice = UnsafeRawBufferPointer(start: data + offset, count: chunk)
        offset += chunk
        do {
            try deframer.process(slice) { message, _ in
                precondition(message.count <= limit, "a message over the limit was delivered")
                delivered += message.count + 5
            }
        } catch {
            break
        }
    }
    precondition(delivered <= size - 2, "more message bytes than input bytes")
    return 0
}
