#!/usr/bin/env bash
# cmake --install into a fresh prefix, then a program outside the tree finds the package with
# find_package(gradfix CONFIG REQUIRED COMPONENTS io), links gradfix::io, and reads a
# safetensors file: the values must be right, and neither its link line nor its direct
# dependencies may name MPI.
#   install_test.sh BUILD_DIR GRADFIX_BINARY
set -euo pipefail
build=$1
gradfix=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../mpi/common.sh"
work=$(mktemp -d /tmp/gradfix-install-XXXXXX)
trap 'rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" >"$work/install.log"
check "the package configuration is installed" test -n "$(find "$work/prefix" -name gradfixConfig.cmake)"
check "the version header is installed" test -f "$work/prefix/include/gradfix/version.hpp"

cmake -S "$here/consumer" -B "$work/consumer" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release >"$work/configure.log"
cmake --build "$work/consumer" --verbose >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
link_line=$(grep -h -- '-o list_tensors' "$work/build.log" || grep -h 'list_tensors ' "$work/consumer/CMakeFiles/list_tensors.dir/link.txt")
check "the consumer linked against the installed gradfix::io" grep -q "libgradfix_io" <<<"$link_line"
check "no MPI library on the consumer's link line" bash -c "! grep -qi 'mpi' <<<'$link_line'"
check "no MPI library among the consumer's direct dependencies" bash -c "! readelf -d '$work/consumer/list_tensors' | grep NEEDED | grep -qi mpi"

# a = [1, 2, 3, 4] * 0.5 + 0 noise, b = 0: the sums are known exactly.
"$gradfix" generate --shapes "a=2x2,b=3" --noise 0 --seed 1 --out "$work/zero.safetensors" >/dev/null
"$work/consumer/list_tensors" "$work/zero.safetensors" >"$work/listing.txt"
check "the consumer reads the version" grep -q "^gradfix [0-9]" "$work/listing.txt"
check "the consumer reads tensor a" grep -q "^a F32 \[2, 2\] sum 0$" "$work/listing.txt"
check "the consumer reads tensor b" grep -q "^b F32 \[3\] sum 0$" "$work/listing.txt"
"$gradfix" generate --shapes "a=2x2" --noise 1 --seed 7 --out "$work/noisy.safetensors" >/dev/null
expected=$(python3 -c "
import json,struct
raw=open('$work/noisy.safetensors','rb').read()
n=struct.unpack('<Q',raw[:8])[0]
h=json.loads(raw[8:8+n]); b,e=h['a']['data_offsets']
print(sum(struct.unpack('<4f',raw[8+n+b:8+n+e])))")
"$work/consumer/list_tensors" "$work/noisy.safetensors" >"$work/listing2.txt"
got=$(sed -n 's/^a F32 \[2, 2\] sum //p' "$work/listing2.txt")
check "the consumer's sum of a random tensor matches Python's ($got vs $expected)" \
  python3 -c "import sys; sys.exit(0 if abs($got - $expected) <= 1e-5 * max(1, abs($expected)) else 1)"
set +e
"$work/consumer/list_tensors" "$work/missing.safetensors" 2>"$work/error.txt"
code=$?
set -e
check "a missing file is exit 2 through the library (got $code)" test "$code" -eq 2
check "the library's message names the file" grep -q "missing.safetensors" "$work/error.txt"
# The whole package (no COMPONENTS) from a C++-only project: MPI found without C enabled.
check "find_package(gradfix CONFIG REQUIRED) configures in a project(x CXX)" \
  cmake -S "$here/consumer_all" -B "$work/consumer_all" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release
check "the C++-only consumer links the installed gradfix::dist" cmake --build "$work/consumer_all"
"$work/consumer_all/plan_pieces" >"$work/plan.txt"
check "the C++-only consumer's plan covers the 18 elements over 3 ranks" python3 -c "
rows = [line.split() for line in open('$work/plan.txt')]
assert [r[1] for r in rows] == ['0', '1', '2'] and sum(int(r[2]) for r in rows) == 18, rows"
finish
