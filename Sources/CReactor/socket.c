// socket.c: nonblocking sockets for the reactor: connect (IPv4, IPv6, Unix), listen, accept, read, write.
// Every call retries EINTR (but a TCP connect, which goes on after it) and returns -errno instead of setting errno, so
// Swift never reads a thread-local.
#include "loop_internal.h"

#ifdef __linux__

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void cr_set_nodelay(int fd, sa_family_t family) {
    if (family == AF_INET || family == AF_INET6) {
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
}

// A TCP connect to a local port nobody listens on, when the kernel happens to pick that same port as the socket's
// own (it is in the ephemeral range), connects the socket to itself (simultaneous open): it "succeeds", and the
// client would read back its own connection preface. Nothing listens there, so it is refused.
static int cr_socket_is_self_connected(int fd) {
    struct sockaddr_storage local, peer;
    socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
    if (getsockname(fd, (struct sockaddr *)&local, &local_len) != 0) return 0;
    if (local.ss_family != AF_INET && local.ss_family != AF_INET6) return 0;
    if (getpeername(fd, (struct sockaddr *)&peer, &peer_len) != 0) return 0;
    return local_len == peer_len && memcmp(&local, &peer, local_len) == 0;
}

int cr_socket_connect(const struct sockaddr *address, socklen_t length, int *in_progress) {
    *in_progress = 0;
    int fd = socket(address->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    cr_set_nodelay(fd, address->sa_family);
    // Not retried after EINTR (a retry would get EALREADY): the connect goes on, as after EINPROGRESS.
    int rc = connect(fd, address, length);
    if (rc != 0) {
        if (errno == EINPROGRESS || errno == EINTR) {
            *in_progress = 1;
            return fd;
        }
        // EAGAIN (a Unix socket whose listener's backlog is full) is a failure, not a connect in progress: the
        // socket stays unconnected and would only be found out at the first write.
        int err = errno;
        close(fd);
        return -err;
    }
    if (cr_socket_is_self_connected(fd)) {
        close(fd);
        return -ECONNREFUSED;
    }
    return fd;
}

int cr_socket_error(int fd) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
    if (err == 0 && cr_socket_is_self_connected(fd)) return ECONNREFUSED;
    return err;
}

int cr_socket_set_user_timeout(int fd, unsigned int milliseconds) {
    if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &milliseconds, sizeof(milliseconds)) != 0) return -errno;
    return 0;
}

int cr_socket_listen(const struct sockaddr *address, socklen_t length, int backlog) {
    int fd = socket(address->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int one = 1;
    if (address->sa_family != AF_UNIX) (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (address->sa_family == AF_INET6) (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, address, length) != 0 || listen(fd, backlog) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    return fd;
}

int cr_socket_accept(int listen_fd) {
    struct sockaddr_storage peer;
    socklen_t len = sizeof(peer);
    int fd;
    do {
        fd = accept4(listen_fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return -errno;
    cr_set_nodelay(fd, peer.ss_family);
    return fd;
}

int cr_socket_local_port(int fd) {
    struct sockaddr_storage local;
    socklen_t len = sizeof(local);
    if (getsockname(fd, (struct sockaddr *)&local, &len) != 0) return -errno;
    if (local.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&local)->sin_port);
    if (local.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&local)->sin6_port);
    return 0;
}

ssize_t cr_read(int fd, void *buffer, size_t length) {
    ssize_t n;
    do {
        n = read(fd, buffer, length);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

ssize_t cr_write(int fd, const void *buffer, size_t length) {
    ssize_t n;
    do {
        n = send(fd, buffer, length, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno == ENOTSOCK) {
        do {
            n = write(fd, buffer, length);
        } while (n < 0 && errno == EINTR);
    }
    return n < 0 ? -errno : n;
}

int cr_close(int fd) {
    // Linux closes the fd even when close() reports EINTR, so it must not be retried.
    return close(fd) == 0 ? 0 : -errno;
}

int cr_make_unix_address(const char *path, struct sockaddr_un *out) {
    size_t len = strlen(path);
    memset(out, 0, sizeof(*out));
    if (len >= sizeof(out->sun_path)) return -ENAMETOOLONG;
    out->sun_family = AF_UNIX;
    memcpy(out->sun_path, path, len);
    return (int)(offsetof(struct sockaddr_un, sun_path) + len + 1);
}

int cr_unix_path_claim(const char *path) {
    struct stat info;
    if (lstat(path, &info) != 0) return errno == ENOENT ? 0 : -errno;
    if (!S_ISSOCK(info.st_mode)) return -EEXIST;
    struct sockaddr_un address;
    int length = cr_make_unix_address(path, &address);
    if (length < 0) return length;
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (probe < 0) return -errno;
    int rc;
    do {
        rc = connect(probe, (struct sockaddr *)&address, (socklen_t)length);
    } while (rc != 0 && errno == EINTR);
    int err = rc == 0 ? 0 : errno;
    close(probe);
    // Connected, or refused only because its backlog is full (EAGAIN): a server is there. Gone since the lstat (a
    // server that removed its socket on the way out): free. A server between its bind() and its listen() is refused
    // like a dead one; that window is a few instructions wide.
    if (rc == 0 || err == EAGAIN) return -EADDRINUSE;
    if (err == ENOENT) return 0;
    if (err != ECONNREFUSED) return -err;
    return unlink(path) == 0 || errno == ENOENT ? 0 : -errno;
}

#endif  // __linux__
