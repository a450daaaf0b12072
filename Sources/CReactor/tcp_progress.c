// tcp_progress.c: how far the peer has acknowledged a TCP socket's output (TCP_INFO's bytes_acked). Apart from
// socket.c because glibc's <netinet/tcp.h>, which that file uses, has a struct tcp_info without the field, and the
// kernel's <linux/tcp.h>, which has it, cannot be included beside it.
// Not "CReactor.h" (it includes <netinet/tcp.h>): the declaration there must match this definition.
#ifdef __linux__

#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

int64_t cr_socket_bytes_acked(int fd);

int64_t cr_socket_bytes_acked(int fd) {
    struct tcp_info info;
    socklen_t length = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0) return -1;
    // An older kernel fills less of the structure (the field came in Linux 4.1).
    if (length < offsetof(struct tcp_info, tcpi_bytes_acked) + sizeof(info.tcpi_bytes_acked)) return -1;
    return (int64_t)info.tcpi_bytes_acked;
}

#endif
