// CReactor: the whole C API of the reactor on one page.
//
// One thread, one epoll instance. The loop (reactor.c) waits, fills a reused batch of fired events, dispatches
// them to one callback, runs expired timers (timers.c, a min-heap), and then calls an "after turn" hook so the
// owner can coalesce writes. The only function that is safe to call from another thread is cr_loop_wake().
//
// Everything Swift can do itself stays in Swift; this file exists because epoll, eventfd, sockaddr handling and a
// cache-friendly timer heap are simplest and cheapest in C.
#ifndef CREACTOR_H
#define CREACTOR_H

#ifdef __linux__

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <netdb.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cr_loop cr_loop;

/// Readiness bits passed to the fd callback and used for interest.
enum {
    CR_READ = 1,   ///< readable (EPOLLIN), or the peer hung up
    CR_WRITE = 2,  ///< writable (EPOLLOUT)
    CR_ERROR = 4,  ///< EPOLLERR: check SO_ERROR / the next read
    CR_HUP = 8,    ///< EPOLLHUP or EPOLLRDHUP
};

/// Called for a ready fd. `target` is what was passed to cr_fd_register.
typedef void (*cr_fd_cb)(void *_Nullable ctx, void *_Nullable target, uint32_t events);
/// Called for an expired timer. The timer is already removed when this runs.
typedef void (*cr_timer_cb)(void *_Nullable ctx, void *_Nullable target, uint64_t tag);
/// Wake-up (the eventfd fired: drain the submission queue) and end-of-turn hooks.
typedef void (*cr_hook_cb)(void *_Nullable ctx);

typedef struct cr_callbacks {
    cr_fd_cb _Nonnull on_fd;
    cr_timer_cb _Nonnull on_timer;
    cr_hook_cb _Nonnull on_wake;
    cr_hook_cb _Nonnull after_turn;
} cr_callbacks;

/// Creates a loop: an epoll instance plus an eventfd for wake-ups. Returns NULL with errno set on failure.
cr_loop *_Nullable cr_loop_create(void *_Nullable ctx, cr_callbacks callbacks);
/// Sets the context passed to the wake and after-turn hooks.
void cr_loop_set_context(cr_loop *_Nonnull loop, void *_Nullable ctx);
/// Closes the epoll fd and the eventfd and frees the loop. Registered fds are the owner's to close first.
void cr_loop_destroy(cr_loop *_Nonnull loop);
/// Runs one turn. With `block` it sleeps until an fd is ready, a timer expires or cr_loop_wake() is called;
/// without it, it only polls. Returns the number of fd events dispatched, or -errno if epoll_wait failed.
int cr_loop_run_once(cr_loop *_Nonnull loop, int block);
/// Runs one turn, sleeping until an fd is ready, a timer expires or cr_loop_wake() is called, but at most
/// `max_wait_ms` milliseconds (-1: no bound but the next timer; 0: only poll). Returns as cr_loop_run_once.
int cr_loop_run_once_for(cr_loop *_Nonnull loop, int max_wait_ms);
/// Milliseconds until the earliest timer, rounded up; 0 when one is due; -1 when there is none.
int cr_loop_next_timer_ms(const cr_loop *_Nonnull loop);
/// The epoll fd itself. It is readable whenever the loop has fd events or a wake-up to process, so a host with an
/// event loop of its own can watch it and call cr_loop_run_once_for(loop, 0) then (libcurl's multi-socket idea).
int cr_loop_fd(const cr_loop *_Nonnull loop);
/// Wakes the loop from any thread. Only the first of many concurrent calls writes the eventfd.
void cr_loop_wake(cr_loop *_Nonnull loop);
/// How many loops the calling thread serves now (runs, drives, or stands in for while one shuts down). A thread that
/// serves a loop must never wait for another loop: that one may be waiting for it (two loops each shutting the
/// other down from a callback), and neither would turn again.
int cr_thread_loop_count(void);
/// The calling thread begins (+1) or stops (-1) serving a loop.
void cr_thread_loop_count_add(int delta);
/// The monotonic time in nanoseconds, cached once per loop turn (libuv's uv_now).
uint64_t cr_loop_now(const cr_loop *_Nonnull loop);
/// Refreshes the cached time.
void cr_loop_update_time(cr_loop *_Nonnull loop);
/// A fresh CLOCK_MONOTONIC reading in nanoseconds.
uint64_t cr_clock_now(void);

/// Registers `fd` (level-triggered) with the given interest. Returns a registration id (> 0) or -errno.
int64_t cr_fd_register(cr_loop *_Nonnull loop, int fd, uint32_t interest, void *_Nullable target);
/// Changes the interest of a registration. Returns 0 or -errno.
int cr_fd_set_interest(cr_loop *_Nonnull loop, int64_t registration, uint32_t interest);
/// Removes a registration; events already fetched for it in this turn are dropped. Does not close the fd.
/// Returns 0, or -ENOENT when it was not registered (removed before). Deregister before closing the fd: epoll
/// removes by fd number, and a number reused meanwhile belongs to someone else.
int cr_fd_deregister(cr_loop *_Nonnull loop, int64_t registration);
/// Tests only: sets the generation the next registration in `slot` gets (to reach the wrap without 2^31 reuses).
void cr_fd_set_generation_for_testing(cr_loop *_Nonnull loop, uint32_t slot, uint32_t generation);
/// Number of live registrations.
size_t cr_fd_count(const cr_loop *_Nonnull loop);
/// Removes any one live registration and returns its target; NULL when none is left. For a loop let go of without
/// its shutdown (each target still holds what its registration took).
void *_Nullable cr_fd_pop_any(cr_loop *_Nonnull loop);

/// Arms a timer at an absolute monotonic deadline. Returns its id (never 0), or 0 when out of memory.
/// Timers with equal deadlines fire in the order they were added. O(log n).
uint64_t cr_timer_add(cr_loop *_Nonnull loop, uint64_t deadline_ns, void *_Nullable target, uint64_t tag);
/// Cancels a timer that has not run yet. Returns 1 and stores its target in *target if it was pending, else 0.
/// O(log n).
int cr_timer_cancel(cr_loop *_Nonnull loop, uint64_t id, void *_Nullable *_Nullable target);
/// Removes any one pending timer without running it and returns its target (NULL when none is left).
/// Used at shutdown to release what the timers hold.
void *_Nullable cr_timer_pop_any(cr_loop *_Nonnull loop);
/// Number of pending timers.
size_t cr_timer_count(const cr_loop *_Nonnull loop);

/// Starts a nonblocking connect (SOCK_NONBLOCK|SOCK_CLOEXEC; TCP_NODELAY for TCP). Returns the fd or -errno.
/// *in_progress is set to 1 when the connect has not finished yet (wait for CR_WRITE, then cr_socket_error).
/// A socket that connected to itself at once is closed, and -ECONNREFUSED returned.
int cr_socket_connect(const struct sockaddr *_Nonnull address, socklen_t length, int *_Nonnull in_progress);
/// The pending error of a socket (SO_ERROR): 0 when a nonblocking connect succeeded. A TCP socket that connected
/// to itself (a local port nobody listens on, picked as its own) reports ECONNREFUSED.
int cr_socket_error(int fd);
/// Sets TCP_USER_TIMEOUT in milliseconds (TCP sockets only). Returns 0 or -errno.
int cr_socket_set_user_timeout(int fd, unsigned int milliseconds);
/// Bytes of the socket's output the peer has acknowledged (TCP_INFO's bytes_acked), or -1 (not TCP, or a kernel
/// without the field).
int64_t cr_socket_bytes_acked(int fd);
/// Creates a nonblocking listening socket with SO_REUSEADDR. Returns the fd or -errno.
int cr_socket_listen(const struct sockaddr *_Nonnull address, socklen_t length, int backlog);
/// Accepts one connection (nonblocking, close-on-exec, TCP_NODELAY for TCP). Returns the fd or -errno.
int cr_socket_accept(int listen_fd);
/// The local port of a bound socket, or -errno.
int cr_socket_local_port(int fd);
/// read(2) with EINTR retried. Returns bytes read, 0 at EOF, or -errno (-EAGAIN when nothing is there).
ssize_t cr_read(int fd, void *_Nonnull buffer, size_t length);
/// write(2) with EINTR retried and SIGPIPE suppressed for sockets. Returns bytes written or -errno.
ssize_t cr_write(int fd, const void *_Nonnull buffer, size_t length);
/// close(2). Returns 0 or -errno.
int cr_close(int fd);
/// Fills a sockaddr_un for a path. Returns its length, or -ENAMETOOLONG.
int cr_make_unix_address(const char *_Nonnull path, struct sockaddr_un *_Nonnull out);
/// Makes `path` free for a Unix listener: nothing there, or a socket nobody listens on any more (a crashed server's;
/// removed). 0 when free; -EEXIST when something else is there (a file, a directory); -EADDRINUSE when a server
/// listens on it; another -errno when it cannot be checked.
int cr_unix_path_claim(const char *_Nonnull path);

#ifdef __cplusplus
}
#endif

#endif  // __linux__
#endif  // CREACTOR_H
