import CNghttp2
import CReactor
import GRPCCMReactor

#if canImport(Glibc)
import Glibc
#endif

/// What an HTTP/2 connection (ours, or the echo server's) has to write: nghttp2's frames of one loop turn
/// coalesced into one buffer, encrypted in one pass when TLS is on, and written with as few syscalls as the socket
/// allows. Reactor thread only.
package struct SocketOutput: ~Copyable {
    /// Bytes for the socket (ciphertext under TLS); `start` of them are written.
    private var bytes = OutputBytes()
    private var start = 0
    /// nghttp2's output waiting for TLS.
    private var plaintext = OutputBytes()
    /// Bytes written to the socket since the connection began (ciphertext under TLS).
    private var written = 0
    /// TLS: plaintext bytes encrypted since the connection began.
    private var encryptedPlaintext = 0
    /// TLS: where each recent `encryptPending` pass began, in plaintext and in ciphertext (both counted from the
    /// connection's start), oldest first, for the passes whose records may not all be written. What tells, under
    /// TLS, whether a plaintext byte can have reached the kernel (`mayHaveWritten`).
    private var passes: [(plaintext: Int, ciphertext: Int)] = []
    /// More passes than this are not told apart: a new one is counted with the last kept (which only makes
    /// `mayHaveWritten` say yes more often).
    private static let maxPasses = 64

    package init() {}

    /// Keep at most about this much buffered: nghttp2 holds the rest until the socket drains.
    package static let cap = 1 << 20

    package enum Failure: Error {
        /// nghttp2_session_mem_send failed with this code.
        case http2(Int32)
        case tls(TLSError)
        /// write(2) failed with this errno.
        case write(Int32)
    }

    /// Everything is written.
    package var isDrained: Bool { self.start == self.bytes.count }

    /// Bytes for the socket since the connection began, written or not.
    private var socketBytes: Int { self.written + self.bytes.count - self.start }

    /// Where the socket's byte stream has got to: every byte produced for it since the connection began, written or
    /// not, in the units its peer acknowledges (ciphertext under TLS; plaintext not yet encrypted counted as is,
    /// without its record's overhead).
    package var streamPosition: Int { self.socketBytes + self.plaintext.count }

    /// Where nghttp2's output has got to: the bytes it produced since the connection began (plaintext under TLS).
    /// A stream's frames, once it is submitted, all come at or after the mark read then (nghttp2 writes a request's
    /// HEADERS out in a later `mem_send`).
    @inline(__always)
    package func mark(encrypted: Bool) -> Int {
        encrypted
            ? self.encryptedPlaintext + self.plaintext.count
            : self.socketBytes
    }

    /// Whether any byte nghttp2 produced at or after `mark` can have reached the kernel. False means the peer cannot
    /// have seen any of it (a request submitted at `mark` never left this process); true may be wrong only in that
    /// direction (under TLS, passes counted together or already written are taken as sent).
    package func mayHaveWritten(from mark: Int, encrypted: Bool) -> Bool {
        guard encrypted else { return self.written > mark }
        if mark >= self.encryptedPlaintext { return false }
        // The pass that encrypted the byte at `mark` (or the first one after it) made its records at or after its
        // ciphertext start, and so did every later pass.
        guard let pass = self.passes.last(where: { $0.plaintext <= mark }) else { return true }
        return self.written > pass.ciphertext
    }

    /// Whether more of nghttp2's output fits under the cap.
    package var hasRoom: Bool { self.bytes.count - self.start < Self.cap && self.plaintext.count < Self.cap }

    /// Adds a piece of nghttp2's output: to the plaintext waiting for TLS when `encrypted`, else for the socket.
    package mutating func add(_ chunk: UnsafeRawBufferPointer, encrypted: Bool) {
        if encrypted {
            self.plaintext.append(chunk)
        } else {
            self.bytes.append(chunk)
        }
    }

    /// Adds a DATA frame: its 9-byte `header`, then the payload that `fill` passes to its sink piece by piece.
    /// When `fill` fails, nothing of the frame stays.
    package mutating func addFrame(
        header: UnsafeRawBufferPointer, encrypted: Bool, fill: ((UnsafeRawBufferPointer) -> Void) -> Bool
    ) -> Bool {
        if encrypted {
            return Self.append(header, fill, to: &self.plaintext)
        }
        return Self.append(header, fill, to: &self.bytes)
    }

    private static func append(
        _ header: UnsafeRawBufferPointer, _ fill: ((UnsafeRawBufferPointer) -> Void) -> Bool, to buffer: inout OutputBytes
    ) -> Bool {
        let before = buffer.count
        buffer.append(header)
        if fill({ buffer.append($0) }) { return true }
        buffer.removeLast(buffer.count - before)
        return false
    }

    /// Encrypts the plaintext collected this turn in one pass: records as large as the coalesced output allows. Takes
    /// the records TLS made by itself too, with or without plaintext: a KeyUpdate, or the reply to one that asked
    /// for it (made while reading), goes out with this flush rather than with the next HTTP/2 frame, which an idle
    /// connection may not send for a long time.
    package mutating func encryptPending(with tls: TLSSession) throws(Failure) {
        if !self.plaintext.isEmpty {
            if self.passes.count < Self.maxPasses {
                self.passes.append((self.encryptedPlaintext, self.socketBytes))
            }
            self.encryptedPlaintext += self.plaintext.count
            let result = self.plaintext.withUnsafeBytes { buffer in
                Result { () throws(TLSError) in try tls.writePlaintext(buffer) }
            }
            if case .failure(let error) = result { throw .tls(error) }
            self.plaintext.removeAll(keepingCapacity: true)
        }
        tls.drainCiphertext(into: &self.bytes)
    }

    /// Takes the TLS records (handshake, alerts) that `tls` has ready.
    package mutating func takeCiphertext(from tls: TLSSession) {
        tls.drainCiphertext(into: &self.bytes)
    }

    /// Adds bytes as they are (plaintext connections' last frames).
    package mutating func append(_ raw: [UInt8]) {
        raw.withUnsafeBytes { self.bytes.append($0) }
    }

    /// Writes as much as the socket takes, stopping at EAGAIN. The buffer never grows with the bytes ever sent: once
    /// all of it is out it is emptied, and while the socket lags, what is written is dropped from the front as soon
    /// as it is more than half the buffer, so a long upload holds at most the cap plus one collection.
    package mutating func write(to fd: Int32) throws(Failure) {
        while self.start < self.bytes.count {
            let written = self.bytes.withUnsafeBytes(from: self.start) { buffer in
                cr_write(fd, buffer.baseAddress!, buffer.count)
            }
            if written == -Int(EAGAIN) { break }
            if written < 0 { throw .write(Int32(-written)) }
            self.start += written
            self.written += written
        }
        self.forgetWrittenPasses()
        if self.start == self.bytes.count {
            // A buffer that grew very large (a burst of big messages) is not kept.
            self.bytes.removeAll(keepingCapacity: self.bytes.capacity <= (4 << 20))
            self.start = 0
        } else if self.start > (64 << 10) && self.start * 2 > self.bytes.count {
            self.bytes.removeFirst(self.start)
            self.start = 0
        }
    }

    /// Bytes held, written or not (for the bound's test).
    package var heldBytes: Int { self.bytes.count }

    /// One last write, whatever it achieves (closing: a GOAWAY or a TLS alert on its way out). What it could not
    /// write stays until `reset`, which the close calls after asking `mayHaveWritten`.
    package mutating func writeOnce(to fd: Int32) {
        guard self.start < self.bytes.count else { return }
        let written = self.bytes.withUnsafeBytes(from: self.start) { buffer in
            cr_write(fd, buffer.baseAddress!, buffer.count)
        }
        if written > 0 {
            self.start += written
            self.written += written
        }
    }

    /// Drops the TLS passes whose records are all written (the next pass's records start at or before `written`).
    private mutating func forgetWrittenPasses() {
        guard !self.passes.isEmpty else { return }
        if self.start == self.bytes.count {
            self.passes.removeAll(keepingCapacity: true)
            return
        }
        var drop = 0
        while drop + 1 < self.passes.count && self.passes[drop + 1].ciphertext <= self.written { drop += 1 }
        if drop > 0 { self.passes.removeFirst(drop) }
    }

    /// Lets the buffers go. What they still held counts as written from here on: marks read later stay above the
    /// earlier ones, and nothing dropped can ever be taken for unsent. (The close asks `mayHaveWritten` first.)
    package mutating func reset() {
        self.written += self.bytes.count - self.start
        self.encryptedPlaintext += self.plaintext.count
        self.passes = []
        self.bytes.removeAll(keepingCapacity: false)
        self.plaintext.removeAll(keepingCapacity: false)
        self.start = 0
    }
}
