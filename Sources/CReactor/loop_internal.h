// Private layout of cr_loop, shared by reactor.c and timers.c.
#ifndef CR_LOOP_INTERNAL_H
#define CR_LOOP_INTERNAL_H

#ifndef _GNU_SOURCE
#error "CReactor must be compiled with _GNU_SOURCE (set in Package.swift cSettings)"
#endif

#include "CReactor.h"
#include <stdatomic.h>

/// One fd registration. Ids handed out are (generation << 32 | slot), so an event fetched for a registration that
/// a callback removed earlier in the same turn (or whose slot was reused) is recognised and dropped.
typedef struct cr_registration {
    int fd;
    uint32_t interest;
    uint32_t generation;
    int live;
    void *target;
} cr_registration;

/// Timer slot states.
/// ARMED: in the heap; LISTED: in the sorted list (timers.c says which goes where).
enum { CR_TIMER_FREE = 0, CR_TIMER_ARMED = 1, CR_TIMER_READY = 2, CR_TIMER_LISTED = 3 };

typedef struct cr_timer {
    uint64_t deadline;
    uint64_t sequence;  // tie-breaker: equal deadlines fire in insertion order
    void *target;
    uint64_t tag;
    uint32_t heap_index;  // position in the heap while ARMED
    uint32_t generation;
    uint32_t state;
    uint32_t next_free;
    uint32_t list_prev;  // neighbours in the sorted list while LISTED (UINT32_MAX: none)
    uint32_t list_next;
} cr_timer;

struct cr_loop {
    int epoll_fd;
    int wake_fd;
    atomic_int wake_pending;
    void *ctx;
    cr_callbacks callbacks;
    uint64_t now;

    struct epoll_event *fired;  // reused batch, grows when full
    int fired_capacity;

    cr_registration *registrations;
    uint32_t registration_capacity;
    uint32_t registration_count;
    uint32_t *free_registrations;  // stack of free slots
    uint32_t free_registration_count;

    cr_timer *timers;  // slots
    uint32_t timer_capacity;
    uint32_t timer_free_head;  // UINT32_MAX when empty
    uint32_t *heap;  // slot indices, min-heap by (deadline, sequence)
    uint32_t heap_count;
    uint32_t list_head;  // the sorted list's earliest and latest slots (UINT32_MAX when empty)
    uint32_t list_tail;
    uint32_t list_count;
    uint64_t next_sequence;
    uint64_t *ready;  // ids collected before any of them runs
    uint32_t ready_capacity;
};

int cr_timers_init(cr_loop *loop);
void cr_timers_free(cr_loop *loop);
/// Milliseconds until the earliest deadline, rounded up; -1 when there is none.
int cr_timers_timeout_ms(const cr_loop *loop);
/// Collects every expired timer, then runs them.
void cr_timers_run_expired(cr_loop *loop);

#endif
