// reactor.c: the event loop. Read this file first.
//
// One turn of the loop (cr_loop_run_once):
//   1. compute the wait from the earliest timer (rounded up to a whole millisecond, so a sub-millisecond deadline
//      never turns into a busy poll);
//   2. epoll_wait into the reused `fired` batch (it doubles when a turn fills it);
//   3. refresh the cached clock once;
//   4. dispatch each fired event, re-checking first that its registration is still live (a callback earlier in the
//      same batch may have removed it, or removed it and reused the slot: the generation in the id tells);
//   5. collect every expired timer, then run them (timers.c);
//   6. call the after-turn hook: connections coalesce everything they produced this turn into one write.
//
// Level-triggered, on purpose. Edge-triggered epoll requires draining every fd until EAGAIN on every event (mio's
// "Draining readiness" rule), which lets one busy connection starve the others and turns a forgotten drain into a
// hang. With level triggering a handler may read a bounded amount and return; epoll reports the fd again next turn.
// The price, repeated EPOLLOUT reports, is avoided by asking for CR_WRITE only while bytes are waiting to go out.
//
// Wake-ups follow libuv's async.c: cr_loop_wake() writes the eventfd only when the pending flag was clear, and the
// loop clears the flag *before* it calls on_wake to drain the submission queue, so no submission is ever stranded.
#include "loop_internal.h"

#ifdef __linux__

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/// epoll_data for the eventfd; registration ids always have a non-zero generation in the high half, so never clash.
#define CR_WAKE_ID UINT64_C(0)

uint64_t cr_clock_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

void cr_loop_set_context(cr_loop *loop, void *ctx) { loop->ctx = ctx; }

uint64_t cr_loop_now(const cr_loop *loop) { return loop->now; }

void cr_loop_update_time(cr_loop *loop) { loop->now = cr_clock_now(); }

cr_loop *cr_loop_create(void *ctx, cr_callbacks callbacks) {
    cr_loop *loop = calloc(1, sizeof(*loop));
    if (loop == NULL) return NULL;
    loop->ctx = ctx;
    loop->callbacks = callbacks;
    loop->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    loop->wake_fd = -1;
    if (loop->epoll_fd < 0) goto fail;
    loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->wake_fd < 0) goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = CR_WAKE_ID};
    if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, loop->wake_fd, &ev) != 0) goto fail;
    atomic_init(&loop->wake_pending, 0);
    loop->fired_capacity = 64;
    loop->fired = calloc((size_t)loop->fired_capacity, sizeof(struct epoll_event));
    if (loop->fired == NULL) goto fail;
    if (cr_timers_init(loop) != 0) goto fail;
    loop->now = cr_clock_now();
    return loop;
fail: {
    int saved = errno;
    if (loop->wake_fd >= 0) close(loop->wake_fd);
    if (loop->epoll_fd >= 0) close(loop->epoll_fd);
    free(loop->fired);
    cr_timers_free(loop);
    free(loop);
    errno = saved ? saved : ENOMEM;
    return NULL;
}
}

void cr_loop_destroy(cr_loop *loop) {
    close(loop->wake_fd);
    close(loop->epoll_fd);
    free(loop->fired);
    free(loop->registrations);
    free(loop->free_registrations);
    cr_timers_free(loop);
    free(loop);
}

void cr_loop_wake(cr_loop *loop) {
    // This may (will!) be called from outside the loop thread.
    if (atomic_exchange_explicit(&loop->wake_pending, 1, memory_order_acq_rel) == 0) {
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(loop->wake_fd, &one, sizeof(one));
        } while (n < 0 && errno == EINTR);
        // EAGAIN means the counter is saturated: the loop is going to wake anyway.
    }
}

static void cr_drain_wake(cr_loop *loop) {
    uint64_t value;
    ssize_t n;
    do {
        n = read(loop->wake_fd, &value, sizeof(value));
    } while (n < 0 && errno == EINTR);
    atomic_store_explicit(&loop->wake_pending, 0, memory_order_release);
    loop->callbacks.on_wake(loop->ctx);
}

// MARK: registrations

static uint32_t cr_epoll_bits(uint32_t interest) {
    // EPOLLERR and EPOLLHUP are always reported; RDHUP lets a reader see a half-close without another read. Only a
    // reader: it stays raised (level-triggered) once the peer has shut down its side, so a writer, or a paused
    // watcher, would be woken by it every turn.
    uint32_t bits = 0;
    if (interest & CR_READ) bits |= EPOLLIN | EPOLLRDHUP;
    if (interest & CR_WRITE) bits |= EPOLLOUT;
    return bits;
}

static int cr_registration_grow(cr_loop *loop) {
    uint32_t old = loop->registration_capacity;
    uint32_t capacity = old ? old * 2 : 64;
    cr_registration *regs = realloc(loop->registrations, capacity * sizeof(*regs));
    if (regs == NULL) return -ENOMEM;
    loop->registrations = regs;
    uint32_t *free_slots = realloc(loop->free_registrations, capacity * sizeof(*free_slots));
    if (free_slots == NULL) return -ENOMEM;
    loop->free_registrations = free_slots;
    for (uint32_t i = old; i < capacity; i++) {
        regs[i] = (cr_registration){.fd = -1, .generation = 1};
    }
    // Push new slots so that the lowest index is handed out first.
    for (uint32_t i = capacity; i > old; i--) {
        loop->free_registrations[loop->free_registration_count++] = i - 1;
    }
    loop->registration_capacity = capacity;
    return 0;
}

static cr_registration *cr_lookup(cr_loop *loop, int64_t id) {
    if (id <= 0) return NULL;
    uint32_t slot = (uint32_t)((uint64_t)id & 0xffffffffu);
    uint32_t generation = (uint32_t)((uint64_t)id >> 32);
    if (slot >= loop->registration_capacity) return NULL;
    cr_registration *reg = &loop->registrations[slot];
    if (!reg->live || reg->generation != generation) return NULL;
    return reg;
}

int64_t cr_fd_register(cr_loop *loop, int fd, uint32_t interest, void *target) {
    if (loop->free_registration_count == 0) {
        int rc = cr_registration_grow(loop);
        if (rc != 0) return rc;
    }
    uint32_t slot = loop->free_registrations[--loop->free_registration_count];
    cr_registration *reg = &loop->registrations[slot];
    int64_t id = (int64_t)(((uint64_t)reg->generation << 32) | slot);
    struct epoll_event ev = {.events = cr_epoll_bits(interest), .data.u64 = (uint64_t)id};
    if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        int err = errno;
        loop->free_registrations[loop->free_registration_count++] = slot;
        return -err;
    }
    // Added first all the same: epoll is what refuses an fd it cannot watch (closed, a regular file).
    if (interest == 0) (void)epoll_ctl(loop->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
    reg->fd = fd;
    reg->interest = interest;
    reg->target = target;
    reg->live = 1;
    loop->registration_count++;
    return id;
}

int cr_fd_set_interest(cr_loop *loop, int64_t id, uint32_t interest) {
    cr_registration *reg = cr_lookup(loop, id);
    if (reg == NULL) return -ENOENT;
    if (reg->interest == interest) return 0;
    // No interest at all means out of epoll: the kernel reports EPOLLERR and EPOLLHUP whatever the mask, and
    // level-triggered, a paused fd whose peer reset it would wake every turn.
    int op = interest == 0 ? EPOLL_CTL_DEL : reg->interest == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    struct epoll_event ev = {.events = cr_epoll_bits(interest), .data.u64 = (uint64_t)id};
    if (epoll_ctl(loop->epoll_fd, op, reg->fd, &ev) != 0) return -errno;
    reg->interest = interest;
    return 0;
}

int cr_fd_deregister(cr_loop *loop, int64_t id) {
    cr_registration *reg = cr_lookup(loop, id);
    if (reg == NULL) return -ENOENT;
    // The registration ends whatever epoll answers (ENOENT, EBADF for an fd closed first): the owner must get its
    // handler back. Closing first is the owner's mistake: epoll keeps the entry while another descriptor of the same
    // file is open (dup, fork), and a reused fd number makes this delete remove another registration's entry.
    if (reg->interest != 0) (void)epoll_ctl(loop->epoll_fd, EPOLL_CTL_DEL, reg->fd, NULL);
    reg->live = 0;
    reg->fd = -1;
    reg->target = NULL;
    // 31 bits: the id (generation << 32 | slot) must stay positive, negative ones are errors. Generation 0 is
    // reserved for the wake-up id. A slot reused 2^31 times (days of reconnects) wraps here instead.
    reg->generation = (reg->generation + 1) & 0x7fffffffu;
    if (reg->generation == 0) reg->generation = 1;
    uint32_t slot = (uint32_t)((uint64_t)id & 0xffffffffu);
    loop->free_registrations[loop->free_registration_count++] = slot;
    loop->registration_count--;
    return 0;
}

size_t cr_fd_count(const cr_loop *loop) { return loop->registration_count; }

void *cr_fd_pop_any(cr_loop *loop) {
    for (uint32_t slot = 0; slot < loop->registration_capacity; slot++) {
        cr_registration *reg = &loop->registrations[slot];
        if (!reg->live) continue;
        void *target = reg->target;
        (void)cr_fd_deregister(loop, (int64_t)reg->generation << 32 | slot);
        return target;
    }
    return NULL;
}

void cr_fd_set_generation_for_testing(cr_loop *loop, uint32_t slot, uint32_t generation) {
    if (slot < loop->registration_capacity && !loop->registrations[slot].live) {
        loop->registrations[slot].generation = generation;
    }
}

// MARK: the turn

int cr_loop_run_once(cr_loop *loop, int block) { return cr_loop_run_once_for(loop, block ? -1 : 0); }

int cr_loop_next_timer_ms(const cr_loop *loop) { return cr_timers_timeout_ms(loop); }

int cr_loop_fd(const cr_loop *loop) { return loop->epoll_fd; }

int cr_loop_run_once_for(cr_loop *loop, int max_wait_ms) {
    // Sleep until the earliest timer, or less when the caller says so (a host loop that drives ours).
    int timeout = cr_timers_timeout_ms(loop);
    if (max_wait_ms >= 0 && (timeout < 0 || max_wait_ms < timeout)) timeout = max_wait_ms;
    int n = epoll_wait(loop->epoll_fd, loop->fired, loop->fired_capacity, timeout);
    int err = n < 0 ? errno : 0;
    loop->now = cr_clock_now();
    if (n < 0 && err != EINTR) return -err;
    if (n < 0) n = 0;

    for (int i = 0; i < n; i++) {
        uint64_t id = loop->fired[i].data.u64;
        uint32_t bits = loop->fired[i].events;
        if (id == CR_WAKE_ID) {
            cr_drain_wake(loop);
            continue;
        }
        cr_registration *reg = cr_lookup(loop, (int64_t)id);
        if (reg == NULL) continue;  // removed earlier in this turn
        // Only what it still asks for: a handler earlier in this turn may have paused it (out of epoll) or changed
        // its interest, and the next turn's epoll_wait would not report the rest either. Errors and hang-ups come
        // whatever the mask, as epoll reports them, unless the registration is out of epoll.
        if (reg->interest == 0) continue;
        bits &= cr_epoll_bits(reg->interest) | EPOLLERR | EPOLLHUP;
        if (bits == 0) continue;
        uint32_t events = 0;
        if (bits & EPOLLIN) events |= CR_READ;
        if (bits & EPOLLOUT) events |= CR_WRITE;
        if (bits & EPOLLERR) events |= CR_ERROR | CR_READ;
        if (bits & (EPOLLHUP | EPOLLRDHUP)) events |= CR_HUP | CR_READ;
        loop->callbacks.on_fd(loop->ctx, reg->target, events);
    }

    if (n == loop->fired_capacity && loop->fired_capacity < 8192) {
        struct epoll_event *bigger = realloc(loop->fired, (size_t)loop->fired_capacity * 2 * sizeof(*bigger));
        if (bigger != NULL) {
            loop->fired = bigger;
            loop->fired_capacity *= 2;
        }
    }

    cr_timers_run_expired(loop);
    loop->callbacks.after_turn(loop->ctx);
    return n;
}


#endif  // __linux__
