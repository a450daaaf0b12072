// signals.c: SIGINT/SIGTERM for `grpc-cm serve` and the examples. A flag set from the handler (async-signal-safe),
// polled by Swift: Swift 6 cannot hold a global written from a signal handler, and sigwait() would need the mask set
// on every thread before any of them starts, which the Swift concurrency runtime does not allow us to arrange.
#include "CStopSignals.h"

#ifdef __linux__

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

// Lock-free atomics: safe in a signal handler, and read from any thread (the Swift side polls from its concurrency
// threads; a volatile sig_atomic_t is only for the thread the signal interrupted).
static atomic_int css_stop_signal = 0;
static atomic_int css_stop_signals = 0;

static void css_on_stop_signal(int signal_number) {
    int saved_errno = errno;  // the interrupted code may be between a failed call and its errno read
    atomic_store_explicit(&css_stop_signal, signal_number, memory_order_release);
    atomic_fetch_add_explicit(&css_stop_signals, 1, memory_order_acq_rel);
    errno = saved_errno;
}

void css_install_stop_signals(void) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = css_on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaddset(&action.sa_mask, SIGINT);
    sigaddset(&action.sa_mask, SIGTERM);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    // A blocked mask survives exec: a process started by a supervisor (or a test runner) from a thread that blocks
    // these signals would never see them. Unblock them on the calling thread so a process-directed signal lands.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, NULL);
}

int css_stop_signal_received(void) { return atomic_load_explicit(&css_stop_signal, memory_order_acquire); }

int css_stop_signal_count(void) { return atomic_load_explicit(&css_stop_signals, memory_order_acquire); }

#endif  // __linux__
