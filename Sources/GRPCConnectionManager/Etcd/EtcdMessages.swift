import GRPCCMWire

/// The few messages of etcd's v3 gRPC API (`etcdserverpb`, api/etcdserverpb/rpc.proto) the resolver and the
/// registration helper use, encoded and decoded by hand: no protobuf library in the core.
enum EtcdMessages {
    static let rangePath = "/etcdserverpb.KV/Range"
    static let putPath = "/etcdserverpb.KV/Put"
    static let watchPath = "/etcdserverpb.Watch/Watch"
    static let leaseGrantPath = "/etcdserverpb.Lease/LeaseGrant"
    static let leaseRevokePath = "/etcdserverpb.Lease/LeaseRevoke"
    static let leaseKeepAlivePath = "/etcdserverpb.Lease/LeaseKeepAlive"

    /// The end of the key range of every key starting with `prefix` (etcd's `clientv3.GetPrefixRangeEnd`).
    static func prefixEnd(_ prefix: [UInt8]) -> [UInt8] {
        var end = prefix
        while let last = end.last {
            if last < 0xFF {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]  // every key
    }

    /// RangeRequest{key = 1, range_end = 2}: every key under `prefix`.
    static func rangeRequest(prefix: String) -> [UInt8] {
        let key = Array(prefix.utf8)
        return ProtobufWire.lengthDelimited(1, key) + ProtobufWire.lengthDelimited(2, Self.prefixEnd(key))
    }

    /// RangeResponse{header = 1 {revision = 3}, kvs = 2 {key = 1, value = 5}}.
    static func rangeResponse(_ bytes: [UInt8]) -> (revision: Int64, pairs: [(key: String, value: [UInt8])])? {
        var revision: Int64 = 0
        var pairs: [(key: String, value: [UInt8])] = []
        let ok = ProtobufWire.forEachField(bytes[...]) { number, field in
            guard case .bytes(let body) = field else { return }
            if number == 1 { revision = Self.headerRevision(body) }
            if number == 2 {
                var key: [UInt8] = []
                var value: [UInt8] = []
                ProtobufWire.forEachField(body) { number, field in
                    guard case .bytes(let bytes) = field else { return }
                    if number == 1 { key = Array(bytes) }
                    if number == 5 { value = Array(bytes) }
                }
                pairs.append((String(decoding: key, as: UTF8.self), value))
            }
        }
        return ok ? (revision, pairs) : nil
    }

    static func headerRevision(_ header: ArraySlice<UInt8>) -> Int64 {
        var revision: Int64 = 0
        ProtobufWire.forEachField(header) { number, field in
            if number == 3, case .varint(let value) = field { revision = Int64(bitPattern: value) }
        }
        return revision
    }

    /// WatchRequest{create_request = 1 {key = 1, range_end = 2, start_revision = 3}}.
    static func watchCreateRequest(prefix: String, startRevision: Int64) -> [UInt8] {
        let key = Array(prefix.utf8)
        let create =
            ProtobufWire.lengthDelimited(1, key) + ProtobufWire.lengthDelimited(2, Self.prefixEnd(key))
            + ProtobufWire.varintField(3, UInt64(bitPattern: startRevision))
        return ProtobufWire.lengthDelimited(1, create)
    }

    /// WatchResponse{header = 1 {revision = 3}, created = 3, canceled = 4, events = 11}: how many events, whether
    /// etcd cancelled the watch, and, on the response that confirms its creation, etcd's revision then (nil on the
    /// others; a fresh etcd is at 1, never 0).
    static func watchResponse(_ bytes: [UInt8]) -> (events: Int, canceled: Bool, createdAt: Int64?) {
        var events = 0
        var canceled = false
        var created = false
        var revision: Int64 = 0
        ProtobufWire.forEachField(bytes[...]) { number, field in
            switch (number, field) {
            case (1, .bytes(let header)): revision = Self.headerRevision(header)
            case (3, .varint(let value)): created = value != 0
            case (4, .varint(let value)): canceled = value != 0
            case (11, _): events += 1
            default: break
            }
        }
        return (events, canceled, created && revision > 0 ? revision : nil)
    }

    /// PutRequest{key = 1, value = 2, lease = 3}.
    static func putRequest(key: String, value: [UInt8], lease: Int64) -> [UInt8] {
        ProtobufWire.lengthDelimited(1, Array(key.utf8)) + ProtobufWire.lengthDelimited(2, value)
            + ProtobufWire.varintField(3, UInt64(bitPattern: lease))
    }

    /// LeaseGrantRequest{TTL = 1} (seconds).
    static func leaseGrantRequest(ttlSeconds: Int64) -> [UInt8] {
        ProtobufWire.varintField(1, UInt64(bitPattern: ttlSeconds))
    }

    /// LeaseGrantResponse{ID = 2, TTL = 3, error = 4}, and LeaseKeepAliveResponse{ID = 2, TTL = 3}.
    static func leaseResponse(_ bytes: [UInt8]) -> (id: Int64, ttl: Int64, error: String) {
        var id: Int64 = 0
        var ttl: Int64 = 0
        var error = ""
        ProtobufWire.forEachField(bytes[...]) { number, field in
            switch (number, field) {
            case (2, .varint(let value)): id = Int64(bitPattern: value)
            case (3, .varint(let value)): ttl = Int64(bitPattern: value)
            case (4, .bytes(let text)): error = String(decoding: text, as: UTF8.self)
            default: break
            }
        }
        return (id, ttl, error)
    }

    /// LeaseRevokeRequest{ID = 1} and LeaseKeepAliveRequest{ID = 1}.
    static func leaseIDRequest(_ id: Int64) -> [UInt8] {
        ProtobufWire.varintField(1, UInt64(bitPattern: id))
    }

    /// The value grpc-go's etcd endpoints manager (`go.etcd.io/etcd/client/v3/naming/endpoints`) writes for an
    /// endpoint: `{"Op":0,"Addr":"host:port","Metadata":null}`.
    static func endpointValue(address: String) -> [UInt8] {
        Array("{\"Op\":0,\"Addr\":\"\(address)\",\"Metadata\":null}".utf8)
    }

    /// The address in such a value: the `Addr` string of the JSON object (other members, `Metadata` included, are
    /// skipped). nil when the value is not such an object or `Addr` is not a string.
    static func endpointAddress(_ value: [UInt8]) -> String? {
        let space: Set<UInt8> = [0x20, 0x09, 0x0A, 0x0D]
        guard value.first(where: { !space.contains($0) }) == UInt8(ascii: "{") else { return nil }
        let key = Array("\"Addr\"".utf8)
        guard let keyStart = (0...max(value.count - key.count, 0)).first(where: { value[$0...].starts(with: key) }),
            value.count >= key.count
        else { return nil }
        var index = keyStart + key.count
        while index < value.count && space.contains(value[index]) { index += 1 }
        guard index < value.count, value[index] == UInt8(ascii: ":") else { return nil }
        index += 1
        while index < value.count && space.contains(value[index]) { index += 1 }
        guard index < value.count, value[index] == UInt8(ascii: "\"") else { return nil }
        index += 1
        guard let close = value[index...].firstIndex(of: UInt8(ascii: "\"")),
            !value[index..<close].contains(UInt8(ascii: "\\"))
        else { return nil }
        return String(decoding: value[index..<close], as: UTF8.self)
    }
}
