#!/usr/bin/env bash
# The whole suite, as `make test` and CI run it. Extra arguments go to go test
# (e.g. -short, -run X).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' | grep -v '^api/minicloud/') 2>/dev/null || true)
if [ -n "$unformatted" ]; then
  echo "gofmt needed in:" $unformatted >&2
  exit 1
fi

echo "== go vet"
go vet ./...

echo "== api/ is generated from proto/"
./hack/generate.sh
git diff --exit-code --stat -- api/ || { echo "api/ is stale: run make generate and commit" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then
  # Integration and end-to-end tests drive libvirt, bridges and namespaces.
  ./hack/setup-host.sh >/dev/null
else
  echo "not root: libvirt, network and end-to-end tests will skip" >&2
fi

echo "== go test"
# -p 1: packages share one libvirtd, and the hypervisor adapter's tests
# restart it on purpose; run one package at a time so no test sees another
# package's restart. (Each package's own tests are what take the time.)
go test -count=1 -p 1 -timeout 60m "$@" ./...
