import CReactor
import Foundation
import Testing

/// What the reactor's socket layer makes of a TCP connect that the kernel completes in an unusual way.
@Suite("Socket connect")
struct SocketConnectTests {
    @Test("a TCP socket connected to itself (a local port nobody listens on) is refused, not taken for a server")
    func selfConnectIsRefused() throws {
        let fd = try #require(selfConnectingSocket())
        defer { close(fd) }
        var writable = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        #expect(poll(&writable, 1, 10_000) == 1)
        // The kernel's own word: connected, no error (a client would go on and read back its own preface).
        var pending: Int32 = -1
        var length = socklen_t(MemoryLayout<Int32>.size)
        #expect(getsockopt(fd, SOL_SOCKET, SO_ERROR, &pending, &length) == 0 && pending == 0)
        #expect(cr_socket_error(fd) == ECONNREFUSED)
    }
}
