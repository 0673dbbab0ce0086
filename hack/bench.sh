#!/usr/bin/env bash
# make bench: runs every benchmark harness in turn, each in its quick or
# bounded mode, and each rewrites its own section of docs/benchmarks.md:
#
#   api        go run ./hack/apibench            (raw etcd txns, then API creates, at 16 and 64 clients: 4 x 10 s)
#   api-fill   go run ./hack/apibench -fill 1000,50000   (creates/s at 1,000 and at 50,000 VMs in one /16; ~3-5 min)
#   list       go run ./hack/listbench           (10,000 VMs in etcd: ListVMs pages, watch memory; ~1 min)
#   scheduler  go run ./hack/schedbench --quick  (1,000 hosts, 2,000 VMs)
#   metadata   go run ./hack/metabench -duration 10s
#   agent      go run ./hack/agentbench          (real VMs under libvirt, ~2-4 min)
#   density    go run ./hack/densitybench        (agent per-pass cost at 10/50/1,000 VMs, fake hypervisor, ~1 min)
#   density-vms go run ./hack/agentbench -density 10,50 (10 then 50 real tiny VMs booted, at rest, agent restarted; ~10-20 min)
#   image      go run ./hack/imagebench          (cold 1 GiB image fetch vs cp, 8 concurrent fetches; ~1 min, ~3 GiB in /var/tmp)
#   bootbench  go run ./hack/bootbench           (real Debian boots; when hack/bootbench exists)
#   lab        go run ./hack/labbench            (its own 3-host lab: 2x30 creates, VM network RTT/TCP, ~5 min)
#
# Needs root: agentbench, bootbench and labbench drive libvirt, bridges, taps and
# nftables, and metabench runs nginx on loopback addresses; run
# hack/setup-host.sh once first. The machine is shared, so the numbers are
# noisy: every harness records the load average next to its table.
#
# BENCH_ONLY="api agent" runs a subset; BENCH_DOCS=FILE writes the tables
# into FILE instead (a copy, say). Every harness runs even when an earlier
# one failed; the script then exits non-zero naming the failures.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

docs=${BENCH_DOCS:-docs/benchmarks.md}
logs=$(mktemp -d "${TMPDIR:-/tmp}/minicloud-bench.XXXXXX")

if [ ! -f "$docs" ]; then
	echo "make bench: $docs does not exist" >&2
	exit 1
fi
if [ "$(id -u)" != 0 ]; then
	echo "make bench needs root: agentbench and bootbench drive libvirt, bridges, taps and nftables; metabench serves on loopback addresses. Run: sudo make bench" >&2
	exit 1
fi

# name, then the command that rewrites the section "name".
harnesses=(
	"api|go run ./hack/apibench -docs $docs"
	"api-fill|go run ./hack/apibench -fill 1000,50000 -clients 64 -duration 5s -docs $docs"
	"list|go run ./hack/listbench -docs $docs"
	"scheduler|go run ./hack/schedbench --quick -docs $docs"
	"metadata|go run ./hack/metabench -duration 10s -docs $docs"
	"agent|go run ./hack/agentbench -docs $docs"
	"density|go run ./hack/densitybench -docs $docs"
	"density-vms|go run ./hack/agentbench -density 10,50 -docs $docs"
	"image|nice -n 10 go run ./hack/imagebench -docs $docs"
)
if [ -d hack/bootbench ]; then
	harnesses+=("bootbench|go run ./hack/bootbench -docs $docs")
fi
harnesses+=("lab|go run ./hack/labbench -docs $docs")

failed=()
ran=0
for h in "${harnesses[@]}"; do
	name=${h%%|*} cmd=${h#*|}
	if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then
		continue
	fi
	ran=$((ran + 1))
	echo "== $name: $cmd (load average $(cut -d' ' -f1-3 /proc/loadavg))"
	start=$(date +%s)
	# shellcheck disable=SC2086 # cmd is a word list
	$cmd 2>&1 | tee "$logs/$name.log"
	rc=${PIPESTATUS[0]}
	if [ "$rc" != 0 ]; then
		echo "== $name FAILED (exit $rc) after $(($(date +%s) - start)) s; log: $logs/$name.log" >&2
		failed+=("$name")
	else
		echo "== $name done in $(($(date +%s) - start)) s"
	fi
done

if [ "$ran" = 0 ]; then
	echo "BENCH_ONLY=\"$BENCH_ONLY\" matches no harness (api api-fill list scheduler metadata agent density density-vms image bootbench lab)" >&2
	exit 1
fi
echo
if [ -z "${BENCH_DOCS:-}" ]; then
	echo "Results: the tables in $docs (git diff $docs shows what changed); logs in $logs"
else
	echo "Results: the tables in $docs; logs in $logs"
fi
if [ ${#failed[@]} -gt 0 ]; then
	echo "make bench: FAILED: ${failed[*]} (their sections were not rewritten; logs above)" >&2
	exit 1
fi
