# The two commands of the README: `make demo` and `make test`. Both install what is missing first.
SWIFT ?= swift
# A bound on each run of the suite (plain, TSan, ASan; each takes 3 to 5 minutes here): a test that hangs fails the
# run after this many seconds, naming itself as the last one started, instead of holding CI to its own limit.
TEST_TIMEOUT ?= 1200
BOUNDED = bash $(CURDIR)/scripts/bounded.sh $(TEST_TIMEOUT)

.PHONY: deps build-deps build test test-unit fuzz sanitizers tsan asan perf-gate demo demo-tls bench bench-bus bench-transport docs clean

# build-deps: what building and the demo need (Debian packages); deps: that plus what the tests need (python peers,
# valgrind). See scripts/install-deps.sh.
build-deps:
	@bash scripts/install-deps.sh build

deps:
	@bash scripts/install-deps.sh test

build: build-deps
	$(SWIFT) build

# Everything CI runs: the test suite, the fuzzers, the suite again under ThreadSanitizer and AddressSanitizer, then
# the instruction-count gate (Perf/gate.py).
test: test-unit fuzz sanitizers perf-gate

test-unit: deps
	$(SWIFT) build --build-tests
	$(BOUNDED) $(SWIFT) test --no-parallel

# libFuzzer over the wire rules (deframer, response headers, percent-encoding and base64), FUZZ_SECONDS each.
fuzz: deps
	bash Fuzz/run.sh

# The whole suite under each sanitizer, each in a build folder of its own (a sanitizer build shares nothing).
sanitizers: tsan asan

tsan: deps
	$(SWIFT) build --build-tests --sanitize=thread --scratch-path .build-tsan
	TSAN_OPTIONS=suppressions=$(CURDIR)/scripts/tsan.supp $(BOUNDED) $(SWIFT) test --no-parallel --sanitize=thread --scratch-path .build-tsan

# print_suppressions=0: the ASan-built grpc-cm that the CLI tests run would otherwise add LeakSanitizer's
# "Suppressions used" table to the stderr they compare.
asan: deps
	$(SWIFT) build --build-tests --sanitize=address --scratch-path .build-asan
	LSAN_OPTIONS=suppressions=$(CURDIR)/scripts/lsan.supp:print_suppressions=0 $(BOUNDED) $(SWIFT) test --no-parallel --sanitize=address --scratch-path .build-asan

# Fails when a unary call costs more than 5 % above the user-space instructions committed in
# Perf/callgrind-baseline.json (callgrind: the same count whatever else the machine does). About a minute.
perf-gate: deps
	python3 Perf/gate.py

demo: build
	@bash scripts/demo.sh

demo-tls: build
	@bash scripts/demo-tls.sh

# The perf runs against the peers of Perf/peers, each writing its section of Perf/RESULTS.md: the unary matrix
# (about 25 minutes), the streaming ping-pong runs (about 5), open-loop tail latency with CDF plots in Perf/plots
# (about 3); plus 10-20 minutes for the first build of the grpc-swift-2 peer (BENCH_ARGS="--no-swift" leaves that
# peer out).
bench: deps
	python3 Perf/bench.py $(BENCH_ARGS)
	python3 Perf/bench_streams.py $(BENCH_ARGS)
	python3 Perf/bench_tail.py

# The generated grpc-swift-2 client over our transport vs grpc-swift-nio-transport; writes Perf/RESULTS-transport.md
# (the first release build with SwiftNIO takes 10-20 minutes).
bench-transport: deps
	python3 Perf/transport_bench.py $(BENCH_ARGS)

bench-bus: deps
	$(SWIFT) build -c release --product bus-bench
	.build/release/bus-bench 5000000

# The DocC documentation of the library (getting started, the callback contract, the grpc-swift-2 transport, the API)
# into .build/docs.
docs: build-deps
	$(SWIFT) package --allow-writing-to-directory .build/docs generate-documentation --target GRPCConnectionManager \
		--output-path .build/docs --transform-for-static-hosting --disable-indexing

clean:
	rm -rf .build
