#!/usr/bin/env bash
# Refreshes the web console's vendored browser libraries
# (api/webui/static/vendor) from their npm packages at the versions pinned
# below, with their licences. The files are committed, so `go build` (and
# go:embed) needs neither npm nor the network; run this only to upgrade.
set -euo pipefail

cd "$(dirname "$0")/.."
out=api/webui/static/vendor

# Pinned versions: htmx 2 (its 4.x line changes the request model), xterm.js
# 5.5 with the fit addon of the same generation.
HTMX=htmx.org@2.0.11
XTERM=@xterm/xterm@5.5.0
XTERM_FIT=@xterm/addon-fit@0.10.0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$HTMX" "$XTERM" "$XTERM_FIT" >/dev/null)
for t in "$tmp"/*.tgz; do
	d=$tmp/$(basename "$t" .tgz)
	mkdir -p "$d"
	tar -xzf "$t" -C "$d"
done

mkdir -p "$out"
rm -f "$out"/*
cp "$tmp"/htmx.org-*/package/dist/htmx.min.js "$out/htmx.min.js"
cp "$tmp"/htmx.org-*/package/LICENSE "$out/htmx.LICENSE"
cp "$tmp"/xterm-xterm-*/package/lib/xterm.js "$out/xterm.js"
cp "$tmp"/xterm-xterm-*/package/css/xterm.css "$out/xterm.css"
cp "$tmp"/xterm-xterm-*/package/LICENSE "$out/xterm.LICENSE"
cp "$tmp"/xterm-addon-fit-*/package/lib/addon-fit.js "$out/addon-fit.js"
cp "$tmp"/xterm-addon-fit-*/package/LICENSE "$out/addon-fit.LICENSE"
printf '%s\n' "$HTMX" "$XTERM" "$XTERM_FIT" >"$out/VERSIONS"
echo "webui-vendor: $(tr '\n' ' ' <"$out/VERSIONS")-> $out"
