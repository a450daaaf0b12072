// CStopSignals: SIGINT/SIGTERM for programs that serve until told to stop (`grpc-cm serve`, the examples).
// Not part of the reactor: a library never installs signal handlers; only a program's main does.
#ifndef CSTOPSIGNALS_H
#define CSTOPSIGNALS_H

#ifdef __cplusplus
extern "C" {
#endif

/// Installs SIGINT/SIGTERM handlers that only record the signal (for the main thread to poll).
void css_install_stop_signals(void);
/// The signal number recorded by those handlers, or 0.
int css_stop_signal_received(void);
/// How many SIGINT/SIGTERM have arrived (a second one asks a graceful stop to hurry).
int css_stop_signal_count(void);

#ifdef __cplusplus
}
#endif

#endif
