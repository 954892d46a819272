#!/usr/bin/env bash
# Writes that fail for want of space: outputs (safetensors, HDF5, a sharded directory) written
# into a 256 KiB tmpfs that the test mounts, at 1 and 3 ranks. Every run must exit non-zero with
# an error naming the file and "No space left on device", publish nothing and leave no
# temporary file behind. Skipped (exit 77) where a tmpfs cannot be mounted (not root, or a
# container without the capability).
#   full_disk_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
work=$(mktemp -d /tmp/gradfix-full-disk-XXXXXX)
disk=$work/disk
mkdir "$disk"
cleanup() {
  mountpoint -q "$disk" && umount "$disk"
  rm -rf "$work"
}
trap cleanup EXIT
if ! mount -t tmpfs -o size=256k tmpfs "$disk" 2>/dev/null; then
  echo "full_disk_test: skipped: cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)"
  exit 77
fi
cd "$work"
"$gradfix" generate --shapes "w=600x600,b=600" --seed 1 --out big.safetensors >/dev/null  # 1.4 MB: does not fit

for ranks in 1 3; do
  for out in out.safetensors out.h5 outdir; do
    set +e
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" convert big.safetensors "$disk/$out" >log.txt 2>&1
    code=$?
    set -e
    check "$out at $ranks rank(s): exit non-zero (got $code)" test "$code" -ne 0
    check "$out at $ranks rank(s): the error names the file and the reason" \
      grep -q "$disk/.*No space left on device" log.txt
    check "$out at $ranks rank(s): nothing published, no temporary left" test -z "$(ls -A "$disk")"
    [ "$failed" -eq 0 ] || { cat log.txt >&2; break 2; }
  done
done
# A write that fits still works on the same file system afterwards.
"$gradfix" generate --shapes "w=10x10" --seed 1 --out "$disk/small.safetensors" >/dev/null
check "a small output fits and is published" test -s "$disk/small.safetensors"
finish
