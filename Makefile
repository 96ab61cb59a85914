# vetassist_auth — every target installs what it needs first (scripts/ensure-toolchain.sh).
# PG=16 (or 17, 18) builds and tests against that PostgreSQL instead of Debian's 15; it is
# installed on first use outside the repository (scripts/ensure-postgres.sh).
SHELL      := /bin/bash
PG         ?= 15
# The pg_config of PostgreSQL $(PG); everything (clusters, tests, bench, demo) follows it.
PG_CONFIG  ?= $(shell scripts/ensure-postgres.sh $(PG))
export PG_CONFIG
# make bench BENCH="audit chain" runs only those sections (crypto tokens sessions audit chain;
# citus runs only when named).
BENCH      ?=
SUDO_FLAG  := $(if $(filter 0,$(shell id -u)),,--sudo)
SUDO       := $(if $(filter 0,$(shell id -u)),,sudo)
# The versions `make test` also checks (build, pg_regress, upgrade, integration without load).
OTHER_PG   ?= $(filter-out $(PG),$(ALL_PG))
ALL_PG     := 15 16 17 18

# Installs the extension (a debug build; $(call pgrx_install,--release) for a release one).
# cargo pgrx install copies the upgrade scripts but not the first release's base script, from
# which Postgres builds every released version (sql/RELEASED; the upgrade test needs them).
pgrx_install = cargo pgrx install $(1) $(SUDO_FLAG) --pg-config $(PG_CONFIG) \
	&& $(SUDO) install -m 644 sql/vetassist_auth--0.1.0.sql "$$($(PG_CONFIG) --sharedir)/extension/"

.PHONY: all toolchain install install-release lint pg-test check fuzz test test-one test-compat test-all demo citus-demo bench clean package

all: test

toolchain:
	@scripts/ensure-toolchain.sh $(PG)

install: toolchain
	$(call pgrx_install)

install-release: toolchain
	$(call pgrx_install,--release)

lint: toolchain
	cargo fmt --check
	python3 scripts/layers.py
	cargo clippy --all-targets --no-default-features --features "pg$(PG) pg_test" -- -D warnings

# CI runs exactly this: the whole suite on $(PG), then the compatibility suite on each other
# supported version.
test: test-one
	@for v in $(OTHER_PG); do pg_config=$$(scripts/ensure-postgres.sh $$v) && $(MAKE) --no-print-directory test-compat PG=$$v PG_CONFIG=$$pg_config || exit 1; done

# The crypto unit tests and the in-process tests (src/pg_tests.rs), in a cluster that cargo pgrx
# starts as the postgres OS user (initdb refuses root). It installs a test build of the
# extension, so the targets below install the real one after it.
pg-test: toolchain
	$(SUDO) install -d -o postgres target/pg-test
	cargo pgrx test pg$(PG) --no-default-features --runas postgres --pgdata $(CURDIR)/target/pg-test/pg$(PG)

# The fast loop (a few minutes): lint, unit and in-process tests, pg_regress and one pytest file,
# FILE=test_keys.py by default (FILE=test_keys.py::test_name runs one test).
FILE       ?= test_keys.py
check: lint pg-test
	$(call pgrx_install)
	REGRESS_ONLY=1 tests/run.sh
	target/venv/bin/pytest -q tests/integration/$(FILE)

# The log fuzzer for longer than make test runs it: 5000 cases, a random seed
# (VETASSIST_FUZZ_SEED=N replays one; tests/integration/test_log_fuzz.py).
fuzz: install-release
	VETASSIST_FUZZ_CASES=5000 target/venv/bin/pytest -q tests/integration/test_log_fuzz.py

# The whole suite on one version: unit and in-process tests, pg_regress, integration tests,
# clients.
test-one: lint pg-test
	$(call pgrx_install)
	tests/run.sh

# Another version: clippy, unit and in-process tests, pg_regress, the upgrade test and the
# integration tests that need no load run.
test-compat: lint pg-test
	$(call pgrx_install)
	COMPAT=1 tests/run.sh

# Everything on every version.
test-all:
	@for v in $(ALL_PG); do pg_config=$$(scripts/ensure-postgres.sh $$v) && $(MAKE) --no-print-directory test-one PG=$$v PG_CONFIG=$$pg_config || exit 1; done

demo: install-release
	target/venv/bin/python scripts/demo.py

# A coordinator and two workers under target/clusters/citus-demo-* (docs/citus.md, "Scale-out on Citus").
citus-demo: install-release
	scripts/ensure-citus.sh $(PG_CONFIG)
	target/venv/bin/python scripts/citus_demo.py

# Release Debian packages under target/packages, postgresql-NN-vetassist-auth_<version>_<arch>.deb,
# one per supported major, or only PG=NN's (`make package PG=17`); built by `cargo pgrx package`,
# which installs nothing (scripts/package.sh; README, "Install in your own cluster").
package:
	scripts/package.sh $(if $(filter command line,$(origin PG)),$(PG),$(ALL_PG))

bench: install-release
	scripts/ensure-pgsodium.sh $(PG_CONFIG)
	$(if $(filter citus,$(BENCH)),scripts/ensure-citus.sh $(PG_CONFIG))
	target/venv/bin/python bench/bench.py $(BENCH)

clean:
	-for d in target/clusters/*/; do scripts/cluster.sh stop "$$(basename $$d)"; done
	cargo clean
