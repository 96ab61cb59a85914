# vetassist_auth — every target installs what it needs first (scripts/ensure-toolchain.sh).
SHELL      := /bin/bash
PG_CONFIG  ?= /usr/lib/postgresql/15/bin/pg_config
# make bench BENCH="audit chain" runs only those sections (crypto tokens sessions audit chain).
BENCH      ?=
SUDO_FLAG  := $(if $(filter 0,$(shell id -u)),,--sudo)

.PHONY: all toolchain install install-release lint test demo bench clean

all: test

toolchain:
	@scripts/ensure-toolchain.sh

install: toolchain
	cargo pgrx install $(SUDO_FLAG) --pg-config $(PG_CONFIG)

install-release: toolchain
	cargo pgrx install --release $(SUDO_FLAG) --pg-config $(PG_CONFIG)

lint: toolchain
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# The whole suite: crypto unit tests, pg_regress, integration tests. CI runs exactly this.
test: lint install
	cargo test --lib
	tests/run.sh

demo: install-release
	target/venv/bin/python scripts/demo.py

bench: install-release
	target/venv/bin/python bench/bench.py $(BENCH)

clean:
	-for d in target/clusters/*/; do scripts/cluster.sh stop "$$(basename $$d)"; done
	cargo clean
