#include "CReactor.h"

// A thread-local in C: Swift has none of its own, and pthread keys cost a call and a lookup each time.
static _Thread_local int thread_loop_count;

int cr_thread_loop_count(void) { return thread_loop_count; }

void cr_thread_loop_count_add(int delta) { thread_loop_count += delta; }

