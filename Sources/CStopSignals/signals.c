// signals.c: SIGINT/SIGTERM for `grpc-cm serve` and the examples. A flag set from the handler (async-signal-safe),
// polled by Swift: Swift 6 cannot hold a global written from a signal handler, and sigwait() would need the mask set
// on every thread before any of them starts, which the Swift concurrency runtime does not allow us to arrange.
#include "CStopSignals.h"

#ifdef __linux__

#include <pthread.h>
#include <signal.h>
#include <string.h>

static volatile sig_atomic_t css_stop_signal = 0;
static volatile sig_atomic_t css_stop_signals = 0;

static void css_on_stop_signal(int signal_number) {
    css_stop_signal = signal_number;
    css_stop_signals = css_stop_signals + 1;  // only this handler writes it, and it does not nest (sa_mask below)
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

int css_stop_signal_received(void) { return (int)css_stop_signal; }

int css_stop_signal_count(void) { return (int)css_stop_signals; }

#endif  // __linux__
