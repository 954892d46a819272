#!/usr/bin/env bash
# The regression catalogue of the defects issue: each crafted input that once crashed, hung or
# was mishandled, with the exit code and message it must give now, and nothing left behind in
# the output directory. (A 120 s guard stops a hang; it is not a measure of speed.)
#   regressions.sh GRADFIX_BINARY MAKE_HOSTILE_HDF5
set -euo pipefail
gradfix=$1
make_hostile_hdf5=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$(dirname "$0")/../mpi/common.sh"
work=$(mktemp -d /tmp/gradfix-regressions-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir out

expect() {  # expect DESCRIPTION CODE PATTERN ARGS...
  local description=$1 want=$2 pattern=$3
  shift 3
  set +e
  timeout 120 "$gradfix" "$@" >output.txt 2>&1
  local code=$?
  set -e
  check "$description: exit $want (got $code)" test "$code" -eq "$want"
  [ -z "$pattern" ] || check "$description: says '$pattern'" grep -q -- "$pattern" output.txt
  if [ "$want" -eq 0 ]; then
    check "$description: output written, no temporary left" test -n "$(ls -A out)" -a -z "$(ls -A out | grep tmp || true)"
  else
    check "$description: nothing left in the output directory" test -z "$(ls -A out)"
  fi
  rm -rf out && mkdir out
}

# A safetensors file from a header given on standard input (Python's standard library).
header_file() {  # header_file PATH DATA_BYTES < HEADER_TEXT
  python3 -c '
import struct, sys
text = sys.stdin.read().strip().encode()
text += b" " * ((8 - len(text) % 8) % 8)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(text)) + text + b"\0" * int(sys.argv[2]))' "$1" "$2"
}

# 1. A shape nested 100,000 levels deep: was a stack overflow (SIGSEGV).
python3 -c "print('{\"t\": {\"dtype\": \"F32\", \"shape\": ' + '[' * 100000 + ']' * 100000 + ', \"data_offsets\": [0, 4]}}')" |
  header_file deep.safetensors 4
expect "a shape nested 100,000 levels deep" 2 "nests deeper than 16 levels" inspect deep.safetensors
expect "the same through convert" 2 "nests deeper than 16 levels" convert deep.safetensors out/deep.safetensors
# 2. 5 MB of nested brackets in data_offsets.
python3 -c "print('{\"t\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": ' + '[' * 2500000 + ']' * 2500000 + '}}')" |
  header_file brackets.safetensors 4
expect "5 MB of nested brackets" 2 "nests deeper than 16 levels" inspect brackets.safetensors

# 3. Patterns on a 100,000-character tensor name: libstdc++'s regex recursed per character.
python3 -c "print('{\"' + 'a' * 100000 + '\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}')" |
  header_file long.safetensors 4
expect "--include 'a.*a' on a 100,000-character name" 0 "" convert long.safetensors out/long.safetensors --include 'a.*a'
expect "--exclude '(x|y)+\$' on a 100,000-character name" 0 "" convert long.safetensors out/long.safetensors --exclude '(x|y)+$' --allow-nonfinite
# 4. '(a+)+$' on a 31-character name: exponential backtracking before.
python3 -c "print('{\"' + 'a' * 30 + '!\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}')" |
  header_file backtrack.safetensors 4
expect "--include '(a+)+\$' on a 31-character name selects nothing" 2 "no tensor is selected" convert backtrack.safetensors out/b.safetensors --include '(a+)+$'
# 5. A pattern RE2 cannot compile is bad input naming it.
expect "a broken pattern" 2 "--include pattern '(unclosed'" convert long.safetensors out/x.safetensors --include '(unclosed'
# 6. Tens of thousands of tensors (a mixture of experts): was quadratic (the header's parse and
#    the lookups); now linear, so these finish far inside the guard.
python3 - <<'PY'
import json, struct
n = 30000
header, offset = {}, 0
for i in range(n):
    header["model.layers.%d.experts.%d.w" % (i // 1000, i % 1000)] = {"dtype": "F32", "shape": [2], "data_offsets": [offset, offset + 8]}
    offset += 8
text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
open("experts.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + b"\0" * offset)
PY
expect "30,000 tensors through apply" 0 "" apply --base experts.safetensors --task-vector experts.safetensors --out out/e.safetensors
# 7. A directory where a safetensors file is expected: was exit 3 "cannot memory-map".
mkdir dir.safetensors
expect "a directory named like a safetensors file" 2 "is a directory, not a file" inspect dir.safetensors
expect "the same as apply's base" 2 "is a directory, not a file" apply --base dir.safetensors --task-vector experts.safetensors --out out/x.safetensors
# 8. An index whose weight_map leads out of the checkpoint's directory, or names nothing.
mkdir -p outside ckpt
"$gradfix" generate --shapes "w=2" --seed 1 --out outside/s.safetensors >/dev/null
for bad in "../outside/s.safetensors" "" "." ".."; do
  printf '{"metadata": {"total_size": 8}, "weight_map": {"w": "%s"}}\n' "$bad" >ckpt/model.safetensors.index.json
  expect "a weight_map entry '$bad'" 2 "shard names must be plain file names" convert ckpt out/c.safetensors
done
# 9. Names that cannot be HDF5 dataset paths: was exit 3 with the temporary left behind.
echo '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a/b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}' |
  header_file group.safetensors 8
expect "tensors 'a' and 'a/b' to HDF5" 2 "cannot both be HDF5 datasets" convert group.safetensors out/g.h5
echo '{"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' | header_file empty_name.safetensors 4
expect "an empty tensor name to HDF5" 2 "a tensor without a name cannot be written" convert empty_name.safetensors out/e.h5
# 10. Non-finite results from finite inputs: were written with exit 0.
"$gradfix" generate --shapes "w=64x8,b=64" --seed 1 --out finite.safetensors >/dev/null
"$gradfix" generate --like finite.safetensors --like-scale 9e37 --noise 0 --seed 1 --out big.safetensors >/dev/null
expect "apply --alpha 1e300" 2 "came out NaN or beyond the range of F32 from finite inputs" \
  apply --base finite.safetensors --task-vector finite.safetensors --alpha 1e300 --out out/a.safetensors
expect "mask --mask-mode soft3 --soft-c -1" 2 "--soft-c must be positive" \
  mask --task-vector finite.safetensors --signs finite.safetensors --mask-mode soft3 --soft-c -1 --out out/m.safetensors
expect "merge --method sum of two files near the float range" 2 "NaN or beyond the range of F32" \
  merge --task-vector big.safetensors --task-vector big.safetensors --method sum --out out/s.safetensors
expect "apply to an F16 output past 65504" 2 "beyond the range of F16" \
  apply --base finite.safetensors --task-vector finite.safetensors --alpha 1e6 --out-dtype F16 --out out/h.safetensors
expect "--allow-nonfinite writes them" 0 "" \
  apply --base finite.safetensors --task-vector finite.safetensors --alpha 1e300 --allow-nonfinite --out out/a.safetensors
set +e
mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" apply --base finite.safetensors --task-vector finite.safetensors --alpha 1e300 \
  --out out/a3.safetensors >output.txt 2>&1
code=$?
set -e
check "at 3 ranks: exit 2 (got $code)" test "$code" -eq 2
check "at 3 ranks: reported once" test "$(grep -c 'gradfix: error' output.txt)" -eq 1
check "at 3 ranks: nothing left" test -z "$(ls -A out)"
# 12. An index that leaves out a shard of its set: convert used to exit 0 without its tensors.
"$gradfix" generate --shapes "a=64x64,b=64x64,c=64x64" --seed 2 --max-shard-size 20KB --out set >/dev/null
python3 - <<'PY'
import json
index = json.load(open("set/model.safetensors.index.json"))
index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model-00002-of-00003.safetensors"}
json.dump(index, open("set/model.safetensors.index.json", "w"))
PY
expect "an index that leaves out a shard file beside it" 2 "names shards of a set of 3 but not 'model-00002-of-00003.safetensors'" \
  convert set out/set.safetensors
"$gradfix" generate --shapes "a=64x64" --seed 2 --out solo/model.safetensors.index.json >/dev/null  # a set of one, indexed
cp set/model-00002-of-00003.safetensors solo/
expect "a shard of another set lying beside the index" 2 "does not name 'model-00002-of-00003.safetensors'" \
  convert solo out/solo.safetensors

# 11. SIGINT while MPI starts: was lost (the run went on, published and exited 0).
# A background job of a script starts with SIGINT ignored (POSIX); a terminal's Ctrl-C reaches a
# process whose SIGINT is at its default. With job control on (set -m) a background job keeps the
# default, as under a terminal, so a signal before main() (a sanitizer build starts slowly) kills
# the run as the default action does.
"$gradfix" generate --shapes "a=512x512,b=512x512" --seed 1 --out slow.safetensors >/dev/null
set -m
mkdir -p signal-tmp
for delay in 0.02 0.1 0.3; do
  rm -rf out && mkdir out
  GRADFIX_TEST_PAUSE_MS=100 TMPDIR=$work/signal-tmp "$gradfix" apply --base slow.safetensors --task-vector slow.safetensors \
    --chunk-elements 16384 --out out/interrupted.safetensors >/dev/null 2>&1 &
  pid=$!
  sleep "$delay"
  kill -INT "$pid"
  set +e
  wait "$pid"
  code=$?
  set -e
  check "SIGINT after $delay s stops the run with 130 (got $code)" test "$code" -eq 130
  check "SIGINT after $delay s leaves nothing" test -z "$(ls -A out)"
  check "SIGINT after $delay s leaves no MPI session directory" test -z "$(ls -A signal-tmp)"
done
set +m
rm -rf out && mkdir out
# 12. HDF5 files whose tensors are not inside them, or whose sizes do not exist: external
# storage was read (copying another file's bytes), links skipped without a word, a null dataspace
# called truncation, 2^40 unwritten floats read for hours, (2^32)^3 counted as 0 elements.
mkdir hostile && "$make_hostile_hdf5" hostile
# A 3.5 KB file found by the HDF5 fuzz harness on which libhdf5 1.10.8 itself crashes (a copy into
# a null pointer under H5Lvisit): probed in a child process, refused with exit 2, under mpirun too.
expect "a file that crashes libhdf5" 2 "libhdf5 crashed (signal [0-9]*) reading the file's structure in a probe process" \
  convert "$here/../fuzz/seeds/hdf5/libhdf5-null-copy.h5" out/x.safetensors
set +e
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" inspect "$here/../fuzz/seeds/hdf5/libhdf5-null-copy.h5" >mpi_probe.txt 2>&1
code=$?
set -e
check "a file that crashes libhdf5, at 2 ranks: exit 2 (got $code)" test "$code" -eq 2
check "a file that crashes libhdf5, at 2 ranks: one message" test "$(grep -c 'libhdf5 crashed' mpi_probe.txt)" -eq 1
expect "HDF5 external storage" 2 "keeps its data in another file ('.*secret.bin', external storage)" convert hostile/external_storage.h5 out/x.safetensors
expect "an HDF5 external link" 2 "'linked' is an external link to 'other.h5:/w'" inspect hostile/external_link.h5
expect "an HDF5 soft link" 2 "'alias' is a soft link" convert hostile/soft_link.h5 out/x.safetensors
expect "an HDF5 null dataspace" 2 "dataset 'nothing' has a null dataspace" inspect hostile/null_space.h5
expect "2^40 floats declared, never written" 2 "dataset 'huge' declares 4398046511104 bytes but its storage was never written" \
  convert hostile/unwritten.h5 out/x.safetensors
expect "2^40 floats declared, compared with itself" 2 "its storage was never written" inspect hostile/unwritten.h5 hostile/unwritten.h5
expect "(2^32)^3 elements" 2 "declares shape \[4294967296, 4294967296, 4294967296\]: its element count or byte size overflows" \
  inspect hostile/overflow_elements.h5
expect "(2^21)^3 floats" 2 "declares shape \[2097152, 2097152, 2097152\]: its element count or byte size overflows" convert hostile/overflow_bytes.h5 out/x.h5
# The dataset cases need the model subcommands (a build with LibTorch; the sanitizer build has none).
if "$gradfix" --version | grep -q "libtorch  yes"; then
"$gradfix" init --arch mlp --dims 4,3,2 --out mlp.safetensors >/dev/null
expect "2 TB of dataset inputs declared" 2 "huge_inputs.h5: dataset 'inputs' declares 2199023255552 bytes but its storage was never written" \
  eval --weights mlp.safetensors --data hostile/huge_inputs.h5
expect "a label of INT64_MAX in eval" 2 "label 9223372036854775807 is not below 16777216" eval --weights mlp.safetensors --data hostile/huge_label.h5
expect "a label of INT64_MAX in signs" 2 "label 9223372036854775807 is not below 16777216" \
  signs --weights mlp.safetensors --data hostile/huge_label.h5 --out out/v.safetensors
# An IDX header whose dimensions multiply past 64 bits.
python3 -c "
import struct
open('big-images-idx3-ubyte', 'wb').write(struct.pack('>IIII', 0x803, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF))
open('big-labels-idx1-ubyte', 'wb').write(struct.pack('>II', 0x801, 0xFFFFFFFF))"
expect "IDX dimensions that overflow" 2 "the IDX header declares more than 8589934592 bytes" \
  eval --weights mlp.safetensors --data big-images-idx3-ubyte --transform rotate90
else
  echo "SKIPPED: the dataset cases (this build has no LibTorch)"
fi

# 13. Names that are not valid UTF-8, or that would recolour a terminal: escaped when printed,
# refused where a JSON header must hold them.
python3 - <<'PY'
import json, struct
def write(path, names):
    header, offset = {}, 0
    for name in names:
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}
        offset += 4
    text = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogateescape")
    text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + b"\0" * offset)
write("colour.safetensors", ["\x1b[31mred", "caf\u00e9"])
PY
"$gradfix" inspect colour.safetensors --json out/../colour.json >inspect.txt
check "an escape sequence in a tensor name is printed escaped" grep -q '\\x1b\[31mred' inspect.txt
check "no raw escape byte reaches the terminal" bash -c "! grep -q $'\x1b' inspect.txt"
check "valid UTF-8 is printed as it is" grep -q "café" inspect.txt
check "inspect --json stays valid JSON with the escaped name" python3 -c "
import json; names = [t['name'] for t in json.load(open('colour.json'))['tensors']]; assert '\\\\x1b[31mred' in names, names"
"$gradfix" convert colour.safetensors colour.h5 >/dev/null
python3 - <<'PY'
# Rename the HDF5 dataset to bytes that are not UTF-8 by patching the name in place (same length).
data = bytearray(open("colour.h5", "rb").read())
at = data.find(b"caf\xc3\xa9")
assert at >= 0
data[at + 3] = 0xFF
open("bad_utf8.h5", "wb").write(bytes(data))
PY
expect "a tensor name that is not UTF-8 into safetensors" 2 "tensor name 'caf\\\\xff\\\\xa9' is not valid UTF-8" convert bad_utf8.h5 out/x.safetensors
expect "a tensor name that is not UTF-8 into a sharded directory" 2 "is not valid UTF-8" convert bad_utf8.h5 out/x
"$gradfix" inspect bad_utf8.h5 --json bad_utf8.json >/dev/null
check "inspect --json escapes a name that is not UTF-8" python3 -c "
import json; names = [t['name'] for t in json.load(open('bad_utf8.json'))['tensors']]; assert 'caf\\\\xff\\\\xa9' in names, names"
# 14. Two runs, one output directory: the shards of both were mixed, and a rewrite left stale
# shards beside the new ones. A directory is now built under a temporary name and exchanged whole.
"$gradfix" generate --shapes "a=512x512,b=512x512,c=512x512,d=512x512" --seed 3 --out base.safetensors >/dev/null
"$gradfix" generate --shapes "a=512x512,b=512x512,c=512x512,d=512x512" --seed 4 --out tau.safetensors >/dev/null
mkdir runs
mixed=0
for round in 1 2 3 4 5 6; do
  "$gradfix" apply --base base.safetensors --task-vector tau.safetensors --alpha 1 --max-shard-size 1MB --out runs/shared >/dev/null 2>a.err &
  first=$!
  "$gradfix" apply --base base.safetensors --task-vector tau.safetensors --alpha 2 --max-shard-size 1MB --out runs/shared >/dev/null 2>b.err &
  second=$!
  wait "$first" && wait "$second" || mixed=$((mixed + 100))
  alphas=$(cat runs/shared/*.safetensors | grep -ao '"gradfix.alpha":"[0-9.]*"' | sort -u | wc -l)
  [ "$alphas" -eq 1 ] || mixed=$((mixed + 1))
  [ "$(ls runs/shared | wc -l)" -eq 6 ] || mixed=$((mixed + 1))  # 4 shards, the index, the model card
  # The model card belongs to the same run as the shards.
  grep -q "| alpha | $(grep -ao '"gradfix.alpha":"[0-9]' runs/shared/model-00001-of-00004.safetensors | tail -c 2)" runs/shared/README.md ||
    mixed=$((mixed + 1))
done
check "two concurrent writers of one directory: both exit 0, the directory always holds one run's whole output (bad rounds: $mixed)" test "$mixed" -eq 0
check "no staging directory is left beside the output" test "$(ls -A runs)" = "shared"
"$gradfix" apply --base base.safetensors --task-vector tau.safetensors --alpha 3 --out runs/shared >/dev/null
check "a rewrite into one file leaves no stale shard or index" test "$(ls runs/shared)" = "$(printf 'README.md\nmodel.safetensors')"
mkdir -p notes && echo "my notes" >notes/README.md
expect "a directory that is not a checkpoint is not replaced" 2 "notes: the existing directory is not a checkpoint" \
  apply --base base.safetensors --task-vector tau.safetensors --out notes
check "the refused directory is untouched" test "$(cat notes/README.md)" = "my notes"
mkdir -p nested/inner && cp runs/shared/* nested/
expect "a checkpoint directory holding a subdirectory is not replaced" 2 "holds 'inner', which is not a regular file" \
  apply --base base.safetensors --task-vector tau.safetensors --out nested
# 15. 20,000 metadata entries in HDF5: writing took 9 s and reading over a minute (attributes
# looked up one by one by index). Now dense attribute storage and one pass; the file is the same
# at any number of ranks and the entries all come back.
python3 -c "
import json, struct
meta = {'key%05d' % i: 'value %d' % i for i in range(20000)}
header = {'__metadata__': meta, 'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}}
text = json.dumps(header).encode(); text += b' ' * ((8 - len(text) % 8) % 8)
open('meta.safetensors', 'wb').write(struct.pack('<Q', len(text)) + text + b'\0' * 8)"
"$gradfix" convert meta.safetensors meta1.h5 >/dev/null
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" convert meta.safetensors meta2.h5 >/dev/null 2>&1
check "20,000 metadata entries: the HDF5 file is byte-identical at 1 and 2 ranks" cmp -s meta1.h5 meta2.h5
check "20,000 metadata entries all come back from HDF5" test "$("$gradfix" inspect meta1.h5 | grep -c '^metadata key')" -eq 20000
# Text holding a Boost placeholder (%value%, %invalid_line%, ...): Boost.Program_options' error
# formatting substituted it into itself forever (the config fuzz harness found two such hangs).
# gradfix refuses a %word% in arguments and option files before Boost sees them, and converts
# numbers itself.
expect "--timeout %value%" 2 "holds '%value%': a %word% cannot appear in options" inspect --timeout '%value%' x.safetensors
expect "--chunk-elements 12x" 2 "'12x' is not a whole number" inspect --chunk-elements 12x x.safetensors
printf '[signs]\nseed = %%value%%\n' >percent.ini
expect "%value% in a config file" 2 "percent.ini: line 2 holds '%value%'" signs --config percent.ini --weights x --data y --out z
printf '[mask]\n%%invalid_line%%\n' >syntax.ini
expect "%invalid_line% in a config file" 2 "syntax.ini: line 2 holds '%invalid_line%'" mask --config syntax.ini --task-vector a --signs b --out c
printf '[sweep]\nout = o\nseed = 1\n[task.a]\ndata = %%option%%\n' >percent-sweep.ini
expect "%option% in a sweep file" 2 "percent-sweep.ini: line 5 holds '%option%'" sweep --config percent-sweep.ini --count
# The defects found with a real model (issue 28). 6: numbers in provenance keep every digit:
# apply --alpha 1e-7 recorded "0.000000" before.
"$gradfix" generate --shapes "w=3x2" --seed 1 --out small.safetensors >/dev/null
"$gradfix" apply --base small.safetensors --task-vector small.safetensors --alpha 1e-7 --out alpha.safetensors >/dev/null
"$gradfix" inspect alpha.safetensors >alpha.txt
check "apply --alpha 1e-7 records gradfix.alpha = 1e-07 (the shortest text that reads back)" grep -qx 'metadata gradfix.alpha = 1e-07' alpha.txt
"$gradfix" apply --base small.safetensors --task-vector small.safetensors --alpha 0.1 --out alpha_dir >/dev/null
check "a model card records alpha 0.1 as 0.1" grep -q '| alpha | 0.1 |' alpha_dir/README.md
# 3. Output names with a dot: a new path whose suffix is no checkpoint format is a directory
# output (model names carry dots); an existing file of another kind keeps its kind and is refused.
expect "convert --out Llama-3.1-8B-moved (a name with dots)" 0 "" convert small.safetensors out/Llama-3.1-8B-moved
"$gradfix" convert small.safetensors out.v2 >/dev/null
check "--out out.v2 writes a model directory" test -f out.v2/model.safetensors -a -f out.v2/README.md
for job in "apply --base small.safetensors --task-vector small.safetensors --alpha 1" "taskvector --base small.safetensors --finetuned small.safetensors" \
           "mask --task-vector small.safetensors --signs small.safetensors"; do
  # shellcheck disable=SC2086
  "$gradfix" $job --out "v1.2-${job%% *}" >/dev/null
  check "${job%% *} --out v1.2-${job%% *} writes a directory" test -f "v1.2-${job%% *}/model.safetensors"
done
printf 'not a checkpoint' >pytorch_model.bin
expect "an existing file of another kind" 2 "pytorch_model.bin': unknown checkpoint format" inspect pytorch_model.bin
# 4. A parser's message quotes the bytes it stopped at: they are escaped like tensor names, so
# invalid UTF-8 and control characters from a stranger's file never reach the terminal raw.
python3 -c '
import struct
text = b"{\"t\": \xff\xfe\x1b[31m}"
text += b" " * ((8 - len(text) % 8) % 8)
open("raw_bytes.safetensors", "wb").write(struct.pack("<Q", len(text)) + text)'
expect "a header that is not JSON, with invalid UTF-8 and an escape byte" 2 "is not valid JSON" inspect raw_bytes.safetensors
"$gradfix" inspect raw_bytes.safetensors >raw.txt 2>&1 || true
check "the parser's message is valid UTF-8 without an escape byte" python3 -c "
text = open('raw.txt', 'rb').read()
text.decode('utf-8')
assert b'\x1b' not in text, text"
# 7. inspect A B: the columns of a row ran together when a value filled its column (norms in the millions).
"$gradfix" generate --shapes "w=1000x1000" --noise 1000 --seed 1 --out wide_a.safetensors >/dev/null
"$gradfix" generate --shapes "w=1000x1000" --noise 1000 --seed 2 --out wide_b.safetensors >/dev/null
"$gradfix" inspect wide_a.safetensors wide_b.safetensors >columns.txt
check "inspect A B: every row has its four values apart (label, agree, cosine, norm_a, norm_b)" python3 - columns.txt <<'PY'
import sys
rows = [line.split() for line in open(sys.argv[1]) if line.startswith(("w", "(overall"))]
assert len(rows) == 2, rows
for fields in rows:
    agree, cosine, norm_a, norm_b = fields[-4:]
    assert agree.endswith("%") and abs(float(cosine)) <= 1 and float(norm_a) > 9e5 and float(norm_b) > 9e5, fields
PY
# 2. Hugging Face cache snapshots: every file is a link into ../../blobs/; the links to
# config.json and the tokenizer files were left out of outputs. A link that leads out of the
# cache repository is refused by name; ORG/NAME is read from the cache.
commit=89abcdef0123456789abcdef0123456789abcdef
snapshot=hub/models--someone--Tiny-1.5/snapshots/$commit
mkdir -p hub/models--someone--Tiny-1.5/blobs hub/models--someone--Tiny-1.5/refs "$snapshot"
cp small.safetensors hub/models--someone--Tiny-1.5/blobs/aa01
printf '{"model_type": "toy"}\n' >hub/models--someone--Tiny-1.5/blobs/aa02
printf '{"version": "1.0"}\n' >hub/models--someone--Tiny-1.5/blobs/aa03
ln -s ../../blobs/aa01 "$snapshot/model.safetensors"
ln -s ../../blobs/aa02 "$snapshot/config.json"
ln -s ../../blobs/aa03 "$snapshot/tokenizer.json"
printf '%s' "$commit" >hub/models--someone--Tiny-1.5/refs/main
HF_HUB_CACHE=$work/hub expect "apply --base ORG/NAME from the hub cache" 0 "" \
  apply --base someone/Tiny-1.5 --task-vector small.safetensors --alpha 1 --out out/moved
HF_HUB_CACHE=$work/hub "$gradfix" apply --base someone/Tiny-1.5 --task-vector small.safetensors --alpha 1 --out moved >/dev/null
check "config.json and tokenizer.json of a cache snapshot are carried" test -f moved/config.json -a -f moved/tokenizer.json
ln -s /etc/hostname "$snapshot/notes.txt"
HF_HUB_CACHE=$work/hub expect "a snapshot link that leads out of the cache repository" 2 "notes.txt: a symbolic link to /etc/hostname, outside" \
  apply --base someone/Tiny-1.5 --task-vector small.safetensors --out out/leak
HF_HUB_CACHE=$work/hub expect "a hub name the cache does not hold" 2 "gradfix does not download models: run .huggingface-cli download someone/Other" \
  inspect someone/Other
if "$gradfix" --version | grep -q "libtorch  yes"; then
  # 1. A real model's config.json was refused for "unk_token_id": 0. Keys that cannot change the
  # math are ignored, unknown ones named in a notice (--strict-config refuses them), keys that
  # change the math refused by name.
  python3 - "$here/../fixtures/configs/published/SmolLM2-135M-Instruct.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config.update({"unk_token_id": 0, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 2})
json.dump(config, open("smol.json", "w"))
config["a_new_setting"] = True
json.dump(config, open("smol_unknown.json", "w"))
config.pop("a_new_setting")
config["num_local_experts"] = 8
json.dump(config, open("smol_moe.json", "w"))
PY
  expect "init from a published config with unk_token_id" 0 "" init --arch llama --config-file smol.json --out out/smol
  expect "an unknown key: a notice, and the job goes on" 0 "notice: smol_unknown.json: 1 key(s) gradfix does not know.*'a_new_setting'" \
    init --arch llama --config-file smol_unknown.json --out out/smol
  expect "an unknown key under --strict-config" 2 '"a_new_setting": true is not supported.*--strict-config' \
    init --arch llama --config-file smol_unknown.json --out out/smol --strict-config
  expect "a key that changes the math" 2 '"num_local_experts": 8 is not supported: this key changes the model.s math' \
    init --arch llama --config-file smol_moe.json --out out/smol
fi
# A one-rank start without a launcher runs as an MPI singleton without Open MPI's daemon, in a
# session directory of its own (docs/cluster.md): concurrent starts must not race on a shared one
# (session 16's first CI run lost one start in 120 that way), and the directory goes when the
# command ends, after an error too.
mkdir -p private-tmp
for i in 1 2 3 4 5 6 7 8; do
  (code=0; TMPDIR=$work/private-tmp "$gradfix" inspect --timeout '%value%' x.safetensors >"concurrent-$i.txt" 2>&1 || code=$?
   echo "$code" >"concurrent-$i.code") &
done
wait
check "eight concurrent one-rank starts all run (exit 2 for their bad option, none failing in MPI_Init)" \
  bash -c "cat concurrent-*.code | sort -u | tr -d '\n' | grep -qx 2 && ! grep -q MPI_Init concurrent-*.txt"
TMPDIR=$work/private-tmp "$gradfix" --version >/dev/null
check "one-rank starts leave no session directory behind, after success or error" bash -c "test -z \"\$(ls -A private-tmp)\""
# (A start whose MPI_Init fails leaves its empty session directory: Open MPI ends the process
# itself then. Hence a private TMPDIR here too.)
mkdir -p failed-tmp
OMPI_MCA_pml=no-such-pml TMPDIR=$work/failed-tmp "$gradfix" --version >pml.txt 2>&1 && pml_code=0 || pml_code=$?
check "a user's own OMPI_MCA_pml is kept (a transport that does not exist stops MPI_Init)" test "$pml_code" -ne 0
finish
