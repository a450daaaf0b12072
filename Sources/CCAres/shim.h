// c-ares as a Clang module (apt: libc-ares-dev; pkg-config: libcares).
#ifndef CCARES_SHIM_H
#define CCARES_SHIM_H
#include <ares.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

// c-ares 1.18 writes DNS over TCP with writev(2), which raises SIGPIPE when the server has reset the connection.
// The library leaves SIGPIPE as the application set it, so c-ares's sockets send with MSG_NOSIGNAL instead; the
// other functions are what c-ares does without them, but for one thing: c-ares leaves sockets made by functions
// of the application's as they are made (it sets neither O_NONBLOCK nor FD_CLOEXEC then), so they are made
// nonblocking here. It reads a UDP socket until a read fails: on a blocking one, the loop thread waited in
// recvfrom for the next answer, for ever when a server answered A and never AAAA.
static inline ares_socket_t ccares_socket(int domain, int type, int protocol, void *user_data) {
    (void)user_data;
    return socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
}

static inline int ccares_close(ares_socket_t fd, void *user_data) {
    (void)user_data;
    return close(fd);
}

static inline int ccares_connect(ares_socket_t fd, const struct sockaddr *address, ares_socklen_t length, void *user_data) {
    (void)user_data;
    return connect(fd, address, length);
}

static inline ares_ssize_t ccares_recvfrom(
    ares_socket_t fd, void *buffer, size_t length, int flags, struct sockaddr *from, ares_socklen_t *from_length,
    void *user_data) {
    (void)user_data;
    return recvfrom(fd, buffer, length, flags, from, from_length);
}

static inline ares_ssize_t ccares_sendv(ares_socket_t fd, const struct iovec *vector, int count, void *user_data) {
    (void)user_data;
    struct msghdr message = {0};
    message.msg_iov = (struct iovec *)vector;
    message.msg_iovlen = (size_t)count;
    return sendmsg(fd, &message, MSG_NOSIGNAL);
}

static const struct ares_socket_functions ccares_nosignal_functions = {
    ccares_socket, ccares_close, ccares_connect, ccares_recvfrom, ccares_sendv,
};

/// Makes `channel` send without SIGPIPE (see above).
static inline void ccares_send_without_sigpipe(ares_channel channel) {
    ares_set_socket_functions(channel, &ccares_nosignal_functions, NULL);
}
#endif
