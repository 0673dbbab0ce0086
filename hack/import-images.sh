#!/usr/bin/env bash
# make images (last step): import the built guest images into the running
# cloud, if it is up: images/out/tiny as `tiny`, images/out/debian as
# `debian`. Images that already exist are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/bin"

if ! command -v minicloud >/dev/null || ! minicloud image list >/dev/null 2>&1; then
  echo "the cloud is not up (make up): images built in images/out/, not imported"
  exit 0
fi
# default users as `minicloud vm ssh` logs in: the tiny image has only root,
# Debian cloud images make "debian" (cloud-init's default_user).
declare -A user=([tiny]=root [debian]=debian)
for name in tiny debian; do
  dir=images/out/$name
  [ -f "$dir/disk.qcow2" ] || continue
  if minicloud image show "$name" >/dev/null 2>&1; then
    echo "image $name already imported"
    continue
  fi
  minicloud image create "$name" --file "$dir/disk.qcow2" \
    --kernel "$dir/vmlinuz" --initrd "$dir/initrd.img" --cmdline "$(cat "$dir/cmdline")" --default-user "${user[$name]}" --public
done
minicloud image list
