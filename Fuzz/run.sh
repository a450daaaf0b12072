#!/usr/bin/env bash
# make fuzz: builds each libFuzzer target of Fuzz/ with -sanitize=fuzzer,address over the pure wire rules
# (Sources/GRPCCMWire, which depends on nothing but libc) and runs it for FUZZ_SECONDS (default 30) each.
# A crash or a broken invariant fails the run and leaves the input in .build-fuzz/crash-*; the corpus grows in
# .build-fuzz/corpus-TARGET between runs on one machine.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
mkdir -p .build-fuzz
rm -f .build-fuzz/crash-*
for source in Fuzz/*.swift; do
    target=$(basename "$source" .swift)
    echo "fuzz: building $target"
    # The toolchain's gold linker warns about every ASan symbol it cannot export; the warnings mean nothing here.
    swiftc -sanitize=fuzzer,address -parse-as-library -O -package-name fuzz -module-name "Fuzz_$target" \
        Sources/GRPCCMWire/*.swift "$source" -o ".build-fuzz/$target" 2>&1 | { grep -v "ld.gold: warning" || true; }
    mkdir -p ".build-fuzz/corpus-$target"
    echo "fuzz: running $target for ${seconds}s"
    ".build-fuzz/$target" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix=".build-fuzz/crash-$target-" ".build-fuzz/corpus-$target" 2>&1 \
        | grep -E "^(Done|INFO: seed corpus|stat::number_of_executed_units)|ERROR|SUMMARY|deadly|Fatal|precondition" || true
    # libFuzzer exits non-zero on a crash; the pipeline above hides it, so check the artifacts instead.
    if ls .build-fuzz/crash-"$target"-* >/dev/null 2>&1; then
        echo "fuzz: $target found a crash: $(ls .build-fuzz/crash-"$target"-*)" >&2
        exit 1
    fi
done
echo "fuzz: no crash"
