#!/usr/bin/env bash
# go test -exec program of hack/test.sh: runs one package's test binary
# ("$@") while holding $MINICLOUD_TEST_LOCK, so test binaries still run one
# at a time (they share one libvirtd, and the hypervisor adapter's tests
# restart it on purpose) while go test compiles and links the next
# packages' binaries meanwhile. go test runs the binary in its package's
# directory; the seconds it ran (the wait for the lock left out) go to
# $MINICLOUD_TEST_TIMES, for the table hack/test.sh prints at the end.
set -uo pipefail
pkg=$(realpath --relative-to="${MINICLOUD_TEST_ROOT:?}" "$PWD")
# -o: the lock is not passed on to the binary's children, so a daemon a
# test leaves running (a libvirtd it restarted) cannot keep holding it.
exec flock -o "${MINICLOUD_TEST_LOCK:?}" bash -c '
  pkg=$1; shift
  start=$EPOCHREALTIME
  "$@"
  code=$?
  awk -v s="$start" -v e="$EPOCHREALTIME" -v p="$pkg" "BEGIN { printf \"%8.1f s  %s\n\", e - s, p }" >> "$MINICLOUD_TEST_TIMES"
  exit $code' bash "$pkg" "$@"
