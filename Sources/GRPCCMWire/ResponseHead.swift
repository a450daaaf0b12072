/// What the header blocks of a gRPC response say, read header by header as nghttp2 decodes them (gRPC
/// `PROTOCOL-HTTP2.md`, "Responses"): the HTTP status, `grpc-status`, `grpc-message`, `content-type`,
/// `grpc-encoding`, and the rest as initial or trailing metadata.
///
/// Pure: no I/O and no clock, so the rules are tested and fuzzed on their own (`Fuzz/`). The owner (a call attempt)
/// feeds it and asks it for the status when the stream ends.
///
/// Every block is bounded by `maxHeaderListSize`, counted as RFC 9113 §6.5.2 counts it (name + value + 32 per
/// field, over the uncompressed list): nghttp2 only advertises SETTINGS_MAX_HEADER_LIST_SIZE, it does not enforce it.
///
/// It also holds the blocks to HTTP/2's rules for a response (RFC 9113 §8.1.1, 8.2, 8.3.2), which the client's
/// nghttp2 session does not check (`nghttp2_option_set_no_http_messaging`: it cost about 700 instructions a call,
/// and most of it went on fields this type parses anyway). A block that breaks one sets `malformation`; the owner
/// resets the stream (PROTOCOL_ERROR) and ends the call INTERNAL with it. The rules, as nghttp2 applied them:
/// - pseudo-headers: only `:status`, once, three digits and not 101, in the response headers (not trailers),
///   before any regular field; the response headers must have one;
/// - regular fields: a value has no NUL, CR, LF or other control but HTAB (a space or HTAB at either end is let
///   through, as grpc-go lets it: see `HeaderName.isValidValue`); a
///   name with an upper-case letter is malformed, any other name that is not a token is ignored; the
///   connection-specific fields (`connection`, `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`)
///   and a `te` other than `trailers` are malformed;
/// - blocks: a 1xx response must not end the stream, and trailers must (a block after the response headers that
///   does not end the stream is malformed).
/// `content-length` is passed on as metadata and not checked against the DATA: gRPC frames its messages itself.
/// DATA before the response headers is the owner's to refuse (`receivedResponseHeaders`).
package struct ResponseHead: Sendable {
    /// How a header block ended.
    package enum Block: Equatable, Sendable {
        /// A 1xx block: skipped, the real headers follow.
        case informational
        /// The response headers (initial metadata); messages and trailers follow.
        case headers
        /// The trailers, with the status.
        case trailers
        /// A trailers-only response: one block with the status and END_STREAM.
        case trailersOnly
        /// The block breaks HTTP/2's rules (`malformation` says how).
        case malformed
        /// Response headers that begin an HTTP answer, not a gRPC response: `notGRPCResponse()` gives the status.
        case notGRPC
    }

    package let maxHeaderListSize: Int
    package private(set) var httpStatus = 0
    /// The raw `grpc-status`; `unreadableStatus` for one that is not a decimal (its text is kept as metadata).
    package private(set) var grpcStatus: Int?
    package private(set) var grpcMessage: String?
    /// The response's content-type, when it is not exactly `application/grpc` (that one, the usual, is only noted
    /// in `grpcContentType`: no string to make, copy or release per call).
    package private(set) var contentType: String?
    package private(set) var grpcContentType = false
    /// The `grpc-encoding` of the response messages (nil: identity).
    package private(set) var grpcEncoding: String?
    /// Complete header blocks, 1xx blocks not counted.
    package private(set) var completeBlocks = 0
    /// The first block was also the last (trailers-only).
    package private(set) var trailersOnly = false
    package private(set) var initialMetadata = CallMetadata()
    package private(set) var trailingMetadata = CallMetadata()
    /// Size of the block being read, in RFC 9113 §6.5.2 terms.
    package private(set) var blockSize = 0
    /// Why the response is malformed, once it is: see the type's rules.
    package private(set) var malformation: String?
    private var inTrailers = false
    /// The block being read has had its `:status`, or a regular field (after which no pseudo-header may come).
    private var blockHasStatus = false
    private var blockHasRegularField = false

    /// `grpcStatus` when the server's was not a decimal.
    package static let unreadableStatus = -1

    package init(maxHeaderListSize: Int) {
        self.maxHeaderListSize = maxHeaderListSize
    }

    /// The final response headers have arrived (1xx blocks do not count): DATA may follow.
    ///
    /// A `mutating get` though it changes nothing, for the reason `status(errorCode:)` gives: read through a plain
    /// getter, a call's head was copied whole for each DATA frame (about 320 instructions).
    package var receivedResponseHeaders: Bool {
        mutating get { self.completeBlocks > 0 }
    }

    /// Resets what is counted per block, for the next one. Run by `endBlock`, so the next block starts where this
    /// one ended: nghttp2's on_begin_headers callback (two a call, about 50 instructions each) is not needed.
    private mutating func startNextBlock() {
        self.inTrailers = self.completeBlocks > 0
        self.blockSize = 0
        self.blockHasStatus = false
        self.blockHasRegularField = false
    }

    /// Records why the response is malformed; returns false, for `header` to refuse the block.
    private mutating func malformed(_ reason: String) -> Bool {
        self.malformation = self.malformation ?? reason
        return false
    }

    private static func text(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        String(decoding: bytes.prefix(64), as: UTF8.self).debugDescription
    }

    /// One header field of the current block.
    /// - Parameter names: The metadata names this channel's responses carried before: the same answer with it as
    ///   without it, sooner.
    /// - Returns: false to refuse the block: it has grown past `maxHeaderListSize` (the stream must be reset and the
    ///   call ends with `headerListTooLarge`), or the field is malformed (`malformation` is set).
    package mutating func header(
        name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>, names: MetadataNameCache? = nil
    ) -> Bool {
        self.blockSize += name.count + value.count + 32
        if self.blockSize > self.maxHeaderListSize { return false }
        guard let first = name.first else { return self.malformed("a header field with an empty name") }
        if first == UInt8(ascii: ":") {
            guard !self.inTrailers else { return self.malformed("pseudo-header \(Self.text(name)) in trailers") }
            guard HeaderName.equals(name, HeaderName.status) else {
                return self.malformed("pseudo-header \(Self.text(name)) in a response")
            }
            guard !self.blockHasRegularField else { return self.malformed(":status after a regular field") }
            guard !self.blockHasStatus else { return self.malformed("two :status fields") }
            guard value.count == 3, let code = HeaderName.parseInt(value), code >= 100, code != 101 else {
                return self.malformed(":status \(Self.text(value))")
            }
            self.blockHasStatus = true
            self.httpStatus = code
            return true
        }
        self.blockHasRegularField = true
        // The usual fields first, by exact name: their names are valid by construction, and a value that parses
        // (digits) or matches (`application/grpc`) needs no check of its bytes.
        if HeaderName.equals(name, HeaderName.grpcStatus) {
            if let code = HeaderName.parseInt(value) {
                // An unreadable one before it stands (grpc-go ends the call at the first it cannot read), and its
                // text is then taken out of the metadata with it.
                if self.grpcStatus != Self.unreadableStatus { self.grpcStatus = code }
                return true
            }
            guard HeaderName.isValidValue(value) else { return self.malformed("grpc-status \(Self.text(value))") }
            // Kept as metadata for the status to quote, and taken out again once read (`status`, `forgetStatus`):
            // a field of its own cost every call a release.
            self.grpcStatus = Self.unreadableStatus
            self.append("grpc-status", .string(String(decoding: value.prefix(64), as: UTF8.self)))
            return true
        }
        if !self.inTrailers && HeaderName.equals(name, HeaderName.contentType)
            && HeaderName.equals(value, HeaderName.applicationGRPC)
        {
            self.grpcContentType = true
            return true
        }
        guard HeaderName.isValidValue(value) else {
            return self.malformed("the value of \(Self.text(name)) (\(Self.text(value)))")
        }
        if HeaderName.equals(name, HeaderName.grpcMessage) {
            self.grpcMessage = PercentEncoding.decode(value)
            return true
        }
        if HeaderName.equals(name, HeaderName.grpcAcceptEncoding) {
            // Transport negotiation, not application metadata (grpc-go and grpc-java keep it out too); it would
            // cost three allocations per call against servers that send it on every response.
            return true
        }
        if !self.inTrailers {
            if HeaderName.equals(name, HeaderName.contentType) {
                self.contentType = String(decoding: value, as: UTF8.self)
                return true
            }
            if HeaderName.equals(name, HeaderName.grpcEncoding) {
                let encoding = String(decoding: value, as: UTF8.self)
                self.grpcEncoding = encoding == "identity" ? nil : encoding
                return true
            }
        }
        let nameText: String
        if let known = names?.name(spelled: name) {
            nameText = known
        } else {
            guard HeaderName.isValidName(name) else {
                // Upper case is malformed in HTTP/2; any other stray byte makes the field ignored (nghttp2's
                // leniency with the web's odd headers).
                if name.contains(where: { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) {
                    return self.malformed("header name \(Self.text(name)) has upper-case letters")
                }
                return true
            }
            if HeaderName.isConnectionSpecific(name) {
                return self.malformed("connection-specific header \(Self.text(name))")
            }
            nameText = String(decoding: name, as: UTF8.self)
            names?.keep(nameText, spelled: name)
        }
        if HeaderName.equals(name, "te") && !HeaderName.equals(value, "trailers") {
            return self.malformed("te \(Self.text(value))")
        }
        if HeaderName.isBinary(name) {
            // Repeated values may arrive joined with "," (PROTOCOL-HTTP2.md): each piece is its own base64 value,
            // padded or not, so each is decoded alone. A piece that is not base64 makes the response malformed,
            // as grpc-go holds it (INTERNAL): dropped, it would hide from the application what the server sent.
            var pieces: [[UInt8]] = []
            for piece in value.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false) {
                let trimmed = piece.drop { $0 == UInt8(ascii: " ") }
                guard let bytes = Base64.decode(trimmed) else {
                    return self.malformed("the value of \(Self.text(name)) is not base64 (\(Self.text(value)))")
                }
                pieces.append(bytes)
            }
            for bytes in pieces { self.append(nameText, .binary(bytes)) }
            return true
        }
        self.append(nameText, .string(String(decoding: value, as: UTF8.self)))
        return true
    }

    private mutating func append(_ name: String, _ value: MetadataValue) {
        if self.inTrailers {
            self.trailingMetadata.append(name, value)
        } else {
            self.initialMetadata.append(name, value)
        }
    }

    /// The current header block is complete; `endStream` when it also ends the stream.
    package mutating func endBlock(endStream: Bool) -> Block {
        let block = self.closeBlock(endStream: endStream)
        self.startNextBlock()
        return block
    }

    private mutating func closeBlock(endStream: Bool) -> Block {
        if self.malformation != nil { return .malformed }
        if self.completeBlocks == 0 {
            guard self.blockHasStatus else {
                _ = self.malformed("response headers without :status")
                return .malformed
            }
            if (100..<200).contains(self.httpStatus) {
                guard !endStream else {
                    _ = self.malformed("an informational (\(self.httpStatus)) response that ends the stream")
                    return .malformed
                }
                // Informational (1xx): skip it and read the next block (PROTOCOL-HTTP2.md). Nothing of it carries
                // over: a content-type or grpc-encoding it named is not the response's.
                self.httpStatus = 0
                self.initialMetadata = CallMetadata()
                self.forgetStatus()
                self.grpcContentType = false
                self.contentType = nil
                self.grpcEncoding = nil
                return .informational
            }
        } else if !endStream {
            _ = self.malformed("trailers without END_STREAM")
            return .malformed
        }
        self.completeBlocks += 1
        if self.completeBlocks == 1 && endStream {
            // Trailers-only: what arrived belongs to the trailers.
            self.trailersOnly = true
            self.trailingMetadata = self.initialMetadata
            self.initialMetadata = CallMetadata()
            return .trailersOnly
        }
        guard self.completeBlocks == 1 else { return .trailers }
        // The status is the last block's to give (the trailers, or a trailers-only response): a grpc-status in the
        // response headers says nothing about how the stream will end. Kept, it would let a stream the server
        // resets, or ends without trailers, pass for OK.
        self.forgetStatus()
        return self.beginsGRPCResponse ? .headers : .notGRPC
    }

    /// The response headers say 200 and a gRPC content-type (the usual `application/grpc` read without a string).
    private var beginsGRPCResponse: Bool {
        self.httpStatus == 200 && (self.grpcContentType || self.contentType.map(Self.isGRPC(contentType:)) == true)
    }

    @inline(__always)
    private mutating func forgetStatus() {
        // Tested first: the usual response headers carry neither, and storing nil over a string costs a release.
        if self.grpcStatus != nil { self.forgetGRPCStatus() }
        if self.grpcMessage != nil { self.grpcMessage = nil }
    }

    /// Out of line: with its metadata removal inlined, `forgetStatus` stopped being inlined, about 20 instructions
    /// per call.
    private mutating func forgetGRPCStatus() {
        if self.grpcStatus == Self.unreadableStatus { self.initialMetadata.removeAll(named: "grpc-status") }
        self.grpcStatus = nil
    }

    /// Why the response headers just completed do not begin a gRPC response (`endBlock` said `.notGRPC`), or nil
    /// when they do. A status other than 200, or a content-type that is not gRPC's, is an HTTP answer such as a
    /// proxy's error page: its body is not gRPC messages, and the call ends with the status gRPC maps it to
    /// (`CallStatus.code(forHTTPStatus:)`; UNKNOWN at 200), as grpc-go and grpc-java end it.
    package mutating func notGRPCResponse() -> CallStatus? {
        guard !self.beginsGRPCResponse else { return nil }
        let type = self.grpcContentType ? "application/grpc" : self.contentType
        let typeText = type.map { "content-type \"\(String($0.prefix(64)))\"" } ?? "no content-type"
        guard self.httpStatus == 200 else {
            return CallStatus(
                code: CallStatus.code(forHTTPStatus: self.httpStatus),
                message: "HTTP status \(self.httpStatus) (\(typeText)): not a gRPC response")
        }
        return CallStatus(code: .unknown, message: "HTTP status 200 with \(typeText): not a gRPC response")
    }

    /// `application/grpc`, alone or followed by a message format (`+proto`) or parameters (`;`), as PROTOCOL-HTTP2.md
    /// writes Content-Type; `application/grpc-web` and the like are other protocols.
    package static func isGRPC(contentType: String) -> Bool {
        var bytes = contentType.utf8[...]
        for expected in "application/grpc".utf8 {
            // Media types are case-insensitive (RFC 9110 §8.3.1).
            guard let byte = bytes.popFirst(), byte == expected || (byte >= 0x41 && byte <= 0x5A && byte + 0x20 == expected)
            else { return false }
        }
        guard let next = bytes.first else { return true }
        return next == UInt8(ascii: "+") || next == UInt8(ascii: ";")
    }

    /// Moves both metadata out (the head is done with them): the response takes them without a copy.
    package mutating func takeMetadata() -> (initial: CallMetadata, trailing: CallMetadata) {
        var taken = (initial: CallMetadata(), trailing: CallMetadata())
        swap(&taken.initial, &self.initialMetadata)
        swap(&taken.trailing, &self.trailingMetadata)
        return taken
    }

    /// The status the response carries, once the stream has ended (`errorCode`: the RST_STREAM code, 0 for a clean
    /// end). Message-level checks (a truncated message, a unary call without exactly one message) are the caller's.
    ///
    /// `mutating` though it usually changes nothing (it takes an unreadable grpc-status's text out of the trailing
    /// metadata): a call holds its head in a stored property, and a non-mutating method of a struct held by a class
    /// gets a copy of it (a retain and a release of each string and array in it).
    package mutating func status(errorCode: UInt32) -> CallStatus {
        if self.completeBlocks == 0 || (self.grpcStatus == nil && self.completeBlocks < 2 && errorCode != 0) {
            return errorCode == 0
                ? CallStatus(code: .internal, message: "stream closed without a response")
                : CallStatus.forRSTStream(errorCode: errorCode)
        }
        if let code = self.grpcStatus {
            if code == Self.unreadableStatus {
                let text = self.trailingMetadata["grpc-status"].map { "\"\($0)\"" } ?? "that"
                self.trailingMetadata.removeAll(named: "grpc-status")
                let detail = self.grpcMessage.map { ": \($0)" } ?? ""
                return CallStatus(code: .unknown, message: "server sent grpc-status \(text), which is not a number\(detail)")
            }
            guard (0...16).contains(code) else {
                // gRPC: a code outside the defined range is UNKNOWN.
                let detail = self.grpcMessage.map { ": \($0)" } ?? ""
                return CallStatus(code: .unknown, message: "server sent grpc-status \(code), which is not a gRPC code\(detail)")
            }
            return CallStatus(code: StatusCode(rawValue: code), message: self.grpcMessage ?? "")
        }
        if self.httpStatus != 200 && self.httpStatus != 0 {
            return CallStatus(
                code: CallStatus.code(forHTTPStatus: self.httpStatus),
                message: "HTTP status \(self.httpStatus) without grpc-status"
                    + ((self.grpcContentType ? "application/grpc" : self.contentType).map { " (content-type \($0))" } ?? ""))
        }
        if let type = self.contentType, !Self.isGRPC(contentType: type) {
            return CallStatus(code: .unknown, message: "unexpected content-type \"\(type)\" in response")
        }
        if errorCode != 0 { return CallStatus.forRSTStream(errorCode: errorCode) }
        if self.completeBlocks >= 2 || self.trailersOnly {
            // Trailers came, but without a status: UNKNOWN, as grpc-go and grpc-java read it, with the server's
            // message if it sent one (grpc-go keeps it as the status's).
            return CallStatus(
                code: .unknown, message: "trailers without grpc-status" + (self.grpcMessage.map { ": \($0)" } ?? ""))
        }
        return CallStatus(code: .internal, message: "stream ended without grpc-status trailers")
    }
}
