#!/usr/bin/env bash
# bounded.sh SECONDS COMMAND...: runs COMMAND; past SECONDS it is stopped, with every process it started (swift test
# runs the test bundle in a process group of its own, which timeout(1) does not reach, and the bundle starts the
# peers). A test that hangs then fails the run, the last test started in the log, instead of holding CI to its own
# limit. Exits with COMMAND's status, or 124 when stopped (as timeout does).
set -u
limit=$1
shift
"$@" &
pid=$!

# Read from /proc, not ps: a fresh Debian image has no procps. The fields after the command name's closing
# parenthesis are the state, then the parent's pid.
children() {
    local stat line fields pid
    for stat in /proc/[0-9]*/stat; do
        { read -r line < "$stat"; } 2>/dev/null || continue
        read -r -a fields <<< "${line##*) }"
        if [ "${fields[1]:-}" = "$1" ]; then
            pid=${stat#/proc/}
            echo "${pid%/stat}"
        fi
    done
}

descendants() {
    local child
    for child in $(children "$1"); do
        echo "$child"
        descendants "$child"
    done
}

(
    sleep "$limit" </dev/null >/dev/null 2>&1
    echo "bounded.sh: '$*' ran past ${limit} s: stopped" >&2
    touch "/tmp/bounded-$pid"
    started=$(descendants "$pid")
    kill -TERM $started "$pid" 2>/dev/null
    sleep 20 </dev/null >/dev/null 2>&1
    # Those seen at first too: once their parent is gone they are no longer its descendants.
    kill -KILL $started $(descendants "$pid") "$pid" 2>/dev/null
) &
watchdog=$!

wait "$pid"
status=$?
if [ -e "/tmp/bounded-$pid" ]; then
    # Stopped: the watchdog finishes its work (the KILL 20 s on) by itself.
    rm -f "/tmp/bounded-$pid"
    exit 124
fi
kill $(descendants "$watchdog") "$watchdog" 2>/dev/null
exit "$status"
