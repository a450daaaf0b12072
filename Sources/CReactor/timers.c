// timers.c: every timer of the loop (call deadlines, keepalive, backoff), in a sorted list or a min-heap, after
// libuv's timer.c.
//
// Timers live in a slot array. Most are armed for "now plus the same interval" (a call's deadline, a keepalive), so
// each is due no earlier than the ones armed before it: those join the end of a list sorted by (deadline, sequence)
// in O(1), and, as most call deadlines are cancelled when the call ends, leave it in O(1). A timer due earlier than
// the last few in the list goes to a min-heap of slot indices instead (each slot remembers its heap position): add
// and cancel O(log n), with no search. The earliest timer is the list's head or the heap's top. At 64 calls in
// flight, each with a deadline, the list saves about 120 instructions a call over the heap alone (sifting the last
// entry down after every cancel). Ids are (generation << 32 | slot + 1): a cancelled or fired timer's id stops
// matching as soon as its slot is reused.
//
// Expired timers are first all moved out of the list and the heap into `ready`, then run: a callback that re-arms
// a timer for "now" cannot starve the loop, and a callback may cancel another timer of the same batch (it is then
// skipped).
#include "loop_internal.h"

#ifdef __linux__

#include <errno.h>
#include <limits.h>
#include <stdlib.h>

#define CR_NO_SLOT UINT32_MAX

// How far back from the list's end a new timer may go (past timers due later than it) before it goes to the heap.
enum { CR_LIST_SEARCH = 4 };

int cr_timers_init(cr_loop *loop) {
    loop->timer_free_head = CR_NO_SLOT;
    loop->list_head = CR_NO_SLOT;
    loop->list_tail = CR_NO_SLOT;
    return 0;
}

void cr_timers_free(cr_loop *loop) {
    free(loop->timers);
    free(loop->heap);
    free(loop->ready);
    loop->timers = NULL;
    loop->heap = NULL;
    loop->ready = NULL;
}

static inline int cr_timer_less(const cr_loop *loop, uint32_t a, uint32_t b) {
    const cr_timer *x = &loop->timers[a];
    const cr_timer *y = &loop->timers[b];
    if (x->deadline != y->deadline) return x->deadline < y->deadline;
    return x->sequence < y->sequence;
}

static inline void cr_heap_place(cr_loop *loop, uint32_t index, uint32_t slot) {
    loop->heap[index] = slot;
    loop->timers[slot].heap_index = index;
}

static void cr_heap_sift_up(cr_loop *loop, uint32_t index) {
    uint32_t slot = loop->heap[index];
    while (index > 0) {
        uint32_t parent = (index - 1) / 2;
        if (!cr_timer_less(loop, slot, loop->heap[parent])) break;
        cr_heap_place(loop, index, loop->heap[parent]);
        index = parent;
    }
    cr_heap_place(loop, index, slot);
}

static void cr_heap_sift_down(cr_loop *loop, uint32_t index) {
    uint32_t slot = loop->heap[index];
    uint32_t count = loop->heap_count;
    for (;;) {
        uint32_t child = 2 * index + 1;
        if (child >= count) break;
        if (child + 1 < count && cr_timer_less(loop, loop->heap[child + 1], loop->heap[child])) child++;
        if (!cr_timer_less(loop, loop->heap[child], slot)) break;
        cr_heap_place(loop, index, loop->heap[child]);
        index = child;
    }
    cr_heap_place(loop, index, slot);
}

static void cr_heap_remove(cr_loop *loop, uint32_t index) {
    uint32_t last = --loop->heap_count;
    if (index == last) return;
    cr_heap_place(loop, index, loop->heap[last]);
    if (index > 0 && cr_timer_less(loop, loop->heap[index], loop->heap[(index - 1) / 2])) {
        cr_heap_sift_up(loop, index);
    } else {
        cr_heap_sift_down(loop, index);
    }
}

// Puts `slot` in the sorted list when at most CR_LIST_SEARCH listed timers are due after it. Returns 0 when more are
// (the caller puts it in the heap). A timer due at the same time as a listed one goes after it (its sequence is
// larger): ties stay in insertion order.
static int cr_list_insert(cr_loop *loop, uint32_t slot) {
    uint32_t after = loop->list_tail;
    for (int passed = 0; after != CR_NO_SLOT && cr_timer_less(loop, slot, after); passed++) {
        if (passed == CR_LIST_SEARCH) return 0;
        after = loop->timers[after].list_prev;
    }
    uint32_t before = after == CR_NO_SLOT ? loop->list_head : loop->timers[after].list_next;
    cr_timer *timer = &loop->timers[slot];
    timer->list_prev = after;
    timer->list_next = before;
    if (after == CR_NO_SLOT) {
        loop->list_head = slot;
    } else {
        loop->timers[after].list_next = slot;
    }
    if (before == CR_NO_SLOT) {
        loop->list_tail = slot;
    } else {
        loop->timers[before].list_prev = slot;
    }
    loop->list_count++;
    timer->state = CR_TIMER_LISTED;
    return 1;
}

static void cr_list_remove(cr_loop *loop, uint32_t slot) {
    cr_timer *timer = &loop->timers[slot];
    if (timer->list_prev == CR_NO_SLOT) {
        loop->list_head = timer->list_next;
    } else {
        loop->timers[timer->list_prev].list_next = timer->list_next;
    }
    if (timer->list_next == CR_NO_SLOT) {
        loop->list_tail = timer->list_prev;
    } else {
        loop->timers[timer->list_next].list_prev = timer->list_prev;
    }
    loop->list_count--;
}

// Takes an armed timer out of the list or the heap (a READY one is in neither).
static void cr_timer_disarm(cr_loop *loop, uint32_t slot) {
    cr_timer *timer = &loop->timers[slot];
    if (timer->state == CR_TIMER_LISTED) {
        cr_list_remove(loop, slot);
    } else if (timer->state == CR_TIMER_ARMED) {
        cr_heap_remove(loop, timer->heap_index);
    }
}

// The armed timer due first: the list's head or the heap's top. CR_NO_SLOT when none is armed.
static uint32_t cr_timers_earliest(const cr_loop *loop) {
    uint32_t listed = loop->list_head;
    if (loop->heap_count == 0) return listed;
    uint32_t top = loop->heap[0];
    if (listed == CR_NO_SLOT || cr_timer_less(loop, top, listed)) return top;
    return listed;
}

static int cr_timers_grow(cr_loop *loop) {
    uint32_t old = loop->timer_capacity;
    uint32_t capacity = old ? old * 2 : 256;
    cr_timer *timers = realloc(loop->timers, capacity * sizeof(*timers));
    if (timers == NULL) return -ENOMEM;
    loop->timers = timers;
    uint32_t *heap = realloc(loop->heap, capacity * sizeof(*heap));
    if (heap == NULL) return -ENOMEM;
    loop->heap = heap;
    uint64_t *ready = realloc(loop->ready, capacity * sizeof(*ready));
    if (ready == NULL) return -ENOMEM;
    loop->ready = ready;
    loop->ready_capacity = capacity;
    for (uint32_t i = capacity; i > old; i--) {
        uint32_t slot = i - 1;
        timers[slot] = (cr_timer){.generation = 1, .state = CR_TIMER_FREE, .next_free = loop->timer_free_head};
        loop->timer_free_head = slot;
    }
    loop->timer_capacity = capacity;
    return 0;
}

static void cr_timer_release_slot(cr_loop *loop, uint32_t slot) {
    cr_timer *timer = &loop->timers[slot];
    timer->state = CR_TIMER_FREE;
    timer->target = NULL;
    timer->generation++;
    if (timer->generation == 0) timer->generation = 1;
    timer->next_free = loop->timer_free_head;
    loop->timer_free_head = slot;
}

static cr_timer *cr_timer_lookup(cr_loop *loop, uint64_t id, uint32_t *slot_out) {
    if (id == 0) return NULL;
    uint32_t slot = (uint32_t)(id & 0xffffffffu) - 1;
    uint32_t generation = (uint32_t)(id >> 32);
    if (slot >= loop->timer_capacity) return NULL;
    cr_timer *timer = &loop->timers[slot];
    if (timer->state == CR_TIMER_FREE || timer->generation != generation) return NULL;
    *slot_out = slot;
    return timer;
}

uint64_t cr_timer_add(cr_loop *loop, uint64_t deadline_ns, void *target, uint64_t tag) {
    if (loop->timer_free_head == CR_NO_SLOT && cr_timers_grow(loop) != 0) return 0;
    uint32_t slot = loop->timer_free_head;
    cr_timer *timer = &loop->timers[slot];
    loop->timer_free_head = timer->next_free;
    timer->deadline = deadline_ns;
    timer->sequence = loop->next_sequence++;
    timer->target = target;
    timer->tag = tag;
    if (!cr_list_insert(loop, slot)) {
        timer->state = CR_TIMER_ARMED;
        uint32_t index = loop->heap_count++;
        loop->heap[index] = slot;
        timer->heap_index = index;
        cr_heap_sift_up(loop, index);
    }
    return ((uint64_t)timer->generation << 32) | (uint64_t)(slot + 1);
}

int cr_timer_cancel(cr_loop *loop, uint64_t id, void **target) {
    uint32_t slot;
    cr_timer *timer = cr_timer_lookup(loop, id, &slot);
    if (timer == NULL) return 0;
    if (target != NULL) *target = timer->target;
    cr_timer_disarm(loop, slot);
    // A READY timer is only in the `ready` batch; freeing the slot makes the batch skip it.
    cr_timer_release_slot(loop, slot);
    return 1;
}

void *cr_timer_pop_any(cr_loop *loop) {
    uint32_t slot;
    if (loop->heap_count > 0) {
        slot = loop->heap[--loop->heap_count];
    } else if (loop->list_tail != CR_NO_SLOT) {
        slot = loop->list_tail;
        cr_list_remove(loop, slot);
    } else {
        return NULL;
    }
    void *target = loop->timers[slot].target;
    cr_timer_release_slot(loop, slot);
    return target;
}

size_t cr_timer_count(const cr_loop *loop) { return (size_t)loop->heap_count + loop->list_count; }

int cr_timers_timeout_ms(const cr_loop *loop) {
    uint32_t earliest = cr_timers_earliest(loop);
    if (earliest == CR_NO_SLOT) return -1;
    uint64_t deadline = loop->timers[earliest].deadline;
    uint64_t now = cr_clock_now();
    if (deadline <= now) return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;  // round up: never wake before the deadline
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

void cr_timers_run_expired(cr_loop *loop) {
    uint64_t now = loop->now;
    uint32_t ready_count = 0;
    for (;;) {
        uint32_t slot = cr_timers_earliest(loop);
        if (slot == CR_NO_SLOT) break;
        cr_timer *timer = &loop->timers[slot];
        if (timer->deadline > now) break;
        cr_timer_disarm(loop, slot);
        timer->state = CR_TIMER_READY;
        loop->ready[ready_count++] = ((uint64_t)timer->generation << 32) | (uint64_t)(slot + 1);
    }
    for (uint32_t i = 0; i < ready_count; i++) {
        uint32_t slot;
        cr_timer *timer = cr_timer_lookup(loop, loop->ready[i], &slot);
        if (timer == NULL || timer->state != CR_TIMER_READY) continue;  // cancelled by an earlier callback
        void *target = timer->target;
        uint64_t tag = timer->tag;
        cr_timer_release_slot(loop, slot);
        loop->callbacks.on_timer(loop->ctx, target, tag);
    }
}

#endif  // __linux__
