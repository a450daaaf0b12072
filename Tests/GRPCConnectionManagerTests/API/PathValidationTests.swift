import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMWire

/// The method path check that runs for every call (eight bytes at a time) against the plain rule it implements.
@Suite("Method path validation")
struct PathValidationTests {
    static func reference(_ bytes: [UInt8]) -> Bool {
        bytes.first == UInt8(ascii: "/") && bytes.allSatisfy { $0 > 0x20 && $0 < 0x7F }
    }

    @Test("agrees with the byte-by-byte rule for every byte value at every position, and for random paths")
    func agreesWithReference() {
        let base = Array("/echo.Echo/UnaryCallWithALongName".utf8)
        for position in 1..<base.count {
            for byte in UInt8.min...UInt8.max {
                var bytes = base
                bytes[position] = byte
                let path = String(decoding: bytes, as: UTF8.self)
                // Bytes that are not UTF-8 become U+FFFD (three bytes, all above 0x7E): compare with what was checked.
                #expect(MethodPath.isValid(path) == Self.reference(Array(path.utf8)), "byte \(byte) at \(position)")
            }
        }
        // Every length around the word size, a boundary byte at every position: the last bytes are checked as a
        // word that overlaps the one before, so each position of the tail must count.
        for length in 1...24 {
            for position in 0..<length {
                for byte: UInt8 in [0x00, 0x20, 0x21, 0x2F, 0x7E, 0x7F] {
                    var bytes = [UInt8(ascii: "/")] + Array(repeating: UInt8(ascii: "a"), count: length - 1)
                    bytes[position] = byte
                    let path = String(decoding: bytes, as: UTF8.self)
                    #expect(MethodPath.isValid(path) == Self.reference(bytes), "byte \(byte) at \(position) of \(length)")
                }
            }
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2_000 {
            let length = Int.random(in: 0...40, using: &generator)
            var bytes = (0..<length).map { _ in UInt8.random(in: 0x1F...0x80, using: &generator) }
            if !bytes.isEmpty && Bool.random(using: &generator) { bytes[0] = UInt8(ascii: "/") }
            let path = String(decoding: bytes, as: UTF8.self)
            #expect(MethodPath.isValid(path) == Self.reference(Array(path.utf8)))
        }
        #expect(!MethodPath.isValid(""))
        #expect(MethodPath.isValid("/a.B/C"))
    }
}
