/// Request or response metadata: an ordered list of (name, value) pairs; names may repeat.
///
/// Names are lower-case ASCII from `0-9 a-z _ - .`. A name ending in `-bin` carries bytes (base64 on the wire);
/// any other carries printable ASCII (0x20...0x7E). `validate()` checks both before anything is sent, so a header
/// with CR/LF can never be smuggled onto the wire. Spaces at either end of a text value are left out when it is sent:
/// HTTP/2 forbids them there (RFC 9113 §8.2.1), and HTTP's semantics do not count them as part of the value.
public struct CallMetadata: Sendable, Hashable, Sequence, CustomStringConvertible, ExpressibleByDictionaryLiteral {
    public typealias Key = String
    public typealias Value = String
    public typealias Element = (name: String, value: MetadataValue)

    private var storage: [Element] = []

    /// No entries.
    public init() {}

    /// Text entries, in order: `["x-tenant": "blue"]`. Repeated names are kept, as separate entries.
    public init(dictionaryLiteral elements: (String, String)...) {
        for (name, value) in elements { self.add(name, value) }
    }

    /// Entries, repeated names counted once each.
    public var count: Int { self.storage.count }
    /// Whether there are no entries.
    public var isEmpty: Bool { self.storage.isEmpty }

    /// Appends a text value.
    public mutating func add(_ name: String, _ value: String) {
        self.storage.append((name.lowercased(), .string(value)))
    }

    /// Appends a binary value; `name` should end in `-bin`.
    public mutating func add(_ name: String, binary value: [UInt8]) {
        self.storage.append((name.lowercased(), .binary(value)))
    }

    package mutating func append(_ name: String, _ value: MetadataValue) {
        self.storage.append((name, value))
    }

    /// Appends every entry of `other`, in its order.
    public mutating func add(contentsOf other: CallMetadata) {
        self.storage.append(contentsOf: other.storage)
    }

    /// Sets the one text value of `name`: the first entry is replaced and any others removed, or it is appended.
    public mutating func replaceOrAdd(_ name: String, _ value: String) {
        let key = name.lowercased()
        guard let first = self.storage.firstIndex(where: { $0.name == key }) else {
            self.storage.append((key, .string(value)))
            return
        }
        self.storage[first].value = .string(value)
        var index = first + 1
        while index < self.storage.count {
            if self.storage[index].name == key { self.storage.remove(at: index) } else { index += 1 }
        }
    }

    /// Removes every value of `name`.
    public mutating func removeAll(named name: String) {
        let key = name.lowercased()
        self.storage.removeAll { $0.name == key }
    }

    /// The first text value for `name`.
    public subscript(name: String) -> String? {
        let key = name.lowercased()
        for entry in self.storage where entry.name == key {
            if case .string(let text) = entry.value { return text }
            return entry.value.description
        }
        return nil
    }

    /// Every value for `name`.
    public func values(for name: String) -> [MetadataValue] {
        let key = name.lowercased()
        return self.storage.filter { $0.name == key }.map(\.value)
    }

    public func makeIterator() -> IndexingIterator<[Element]> { self.storage.makeIterator() }

    public var description: String {
        "[" + self.storage.map { "\($0.name): \($0.value)" }.joined(separator: ", ") + "]"
    }

    public static func == (lhs: CallMetadata, rhs: CallMetadata) -> Bool {
        lhs.storage.count == rhs.storage.count
            && zip(lhs.storage, rhs.storage).allSatisfy { $0.name == $1.name && $0.value == $1.value }
    }

    public func hash(into hasher: inout Hasher) {
        for entry in self.storage {
            hasher.combine(entry.name)
            hasher.combine(entry.value)
        }
    }

    // MARK: validation

    /// Headers that HTTP/2 or gRPC own; a caller may not set them as metadata.
    package static let reservedNames: Set<String> = Set(
        [
            "te", "content-type", "host", "user-agent", "grpc-timeout", "grpc-status", "grpc-message", "grpc-encoding",
            "grpc-accept-encoding", "grpc-status-details-bin", "grpc-previous-rpc-attempts", "grpc-retry-pushback-ms",
        ] + HeaderName.connectionSpecific.map(\.description))

    /// Checks every name and value; the error says which entry is wrong and why.
    public func validate() throws(MetadataError) {
        for entry in self.storage {
            try Self.validate(name: entry.name)
            if Self.reservedNames.contains(entry.name) {
                // user-agent went out as a second field beside the client's, which servers read first.
                let reason = entry.name == "user-agent"
                    ? "is the client's own (set Configuration.userAgentPrefix to put yours in front of it)"
                    : "is reserved for gRPC or HTTP/2"
                throw MetadataError(name: entry.name, reason: reason)
            }
            switch entry.value {
            case .string(let text):
                if entry.name.hasSuffix("-bin") {
                    throw MetadataError(name: entry.name, reason: "ends in -bin, so its value must be binary")
                }
                for byte in text.utf8 where byte < 0x20 || byte > 0x7E {
                    throw MetadataError(
                        name: entry.name,
                        reason: "value contains byte 0x\(String(byte, radix: 16)); only printable ASCII is allowed")
                }
            case .binary:
                if !entry.name.hasSuffix("-bin") {
                    throw MetadataError(name: entry.name, reason: "has a binary value but does not end in -bin")
                }
            }
        }
    }

    package static func validate(name: String) throws(MetadataError) {
        if name.isEmpty { throw MetadataError(name: name, reason: "is empty") }
        for byte in name.utf8 {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "_"),
                UInt8(ascii: "-"), UInt8(ascii: "."):
                continue
            default:
                throw MetadataError(
                    name: name, reason: "contains byte 0x\(String(byte, radix: 16)); names use 0-9 a-z _ - . only")
            }
        }
    }
}

/// One metadata value: text, or bytes for `-bin` names.
public enum MetadataValue: Sendable, Hashable, CustomStringConvertible {
    /// Text: printable ASCII, under a name that does not end in `-bin`.
    case string(String)
    /// Bytes, under a name ending in `-bin`; base64 on the wire.
    case binary([UInt8])

    public var description: String {
        switch self {
        case .string(let text): return text
        case .binary(let bytes): return Base64.encode(bytes)
        }
    }
}

/// A metadata entry that cannot be sent.
public struct MetadataError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The entry's name.
    public var name: String
    /// What is wrong with it.
    public var reason: String
    public var description: String { "invalid metadata \"\(self.name)\": \(self.reason)" }
}
