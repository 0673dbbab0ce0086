# minicloud — the targets below are a contract: scripts and CI rely on them.
# See README.md. Everything that needs root assumes it runs as root.

GO       ?= go
BIN      ?= bin
PREFIX   ?= /usr/local
DATA_DIR ?= /var/lib/minicloud
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build install up down clean test test-short images bench generate check-generate lint lab lab-down chaos

all: build

build:
	$(GO) build -o $(BIN)/minicloud ./cmd/minicloud
	$(GO) build -o $(BIN)/minicloudd ./cmd/minicloudd

install: build
	install -m 0755 $(BIN)/minicloud $(BIN)/minicloudd $(PREFIX)/bin/

# Installs host packages if missing, builds, starts the all-in-one in the
# background, creates the defaults and boots a demo VM. Safe to run twice.
up:
	DATA_DIR=$(DATA_DIR) ./hack/up.sh

# Stops the all-in-one and the domains it started (they stay defined, so the
# next `make up` brings them back).
down:
	DATA_DIR=$(DATA_DIR) ./hack/down.sh

# Like down, and also removes every VM, disk, tap, bridge, nftables table and
# the data directory.
clean:
	DATA_DIR=$(DATA_DIR) ./hack/down.sh --purge

# A multi-host cluster on this machine (docs/lab.md): LAB_HOSTS hypervisor
# hosts in namespaces, 3 etcd members, 2 API replicas, 2 schedulers, a VM on
# every host. Safe to run twice, and beside make up.
LAB_HOSTS ?= 3
LAB_DIR   ?= /var/lib/minicloud-lab
lab:
	./hack/setup-host.sh
	./hack/images/build-tiny.sh
	LAB_DIR=$(LAB_DIR) ./hack/lab up --hosts $(LAB_HOSTS)

# Removes every namespace, link, process and directory make lab made.
lab-down:
	LAB_DIR=$(LAB_DIR) ./hack/lab down

# The whole suite: static checks, unit, integration and (as root) end-to-end.
test:
	./hack/test.sh

test-short:
	./hack/test.sh -short

images:
	./hack/images/build-tiny.sh
	./hack/images/build-debian.sh
	./hack/import-images.sh

bench:
	./hack/bench.sh

# Seeded random fault scenarios on a lab of their own, each followed by the
# invariant auditor; rewrites docs/benchmarks.md's chaos section (docs/lab.md).
# Not part of make test. CHAOS_SEED=N repeats a run.
CHAOS_SEED ?= $(shell date +%s)
chaos:
	./hack/chaos run --seed $(CHAOS_SEED)

generate:
	./hack/generate.sh

check-generate:
	./hack/generate.sh
	git diff --exit-code -- api/ || { echo "api/ is stale: run make generate and commit" >&2; exit 1; }

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed" >&2; exit 1; }
	$(GO) vet ./...
