# The two commands of the README: `make demo` and `make test`. Both install what is missing first.
SWIFT ?= swift

.PHONY: deps build test demo clean

deps:
	@bash scripts/install-deps.sh

build: deps
	$(SWIFT) build

test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test

demo: build
	@bash scripts/demo.sh

clean:
	rm -rf .build
