#!/usr/bin/env bash
# gradfix transport on a Hugging Face decoder directory, parameters sharded over 1-4 ranks:
# the transported directory and the results are byte-identical at every rank count, the written
# model is exactly what signs -> mask -> apply at the chosen alpha writes, the zero-shot and
# upper-bound rows are what eval measures, and bad inputs are refused with exit 2 and nothing
# published.
#   decoder_transport_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
model=$repo/tests/fixtures/decoders/llama/model
work=$(mktemp -d /tmp/gradfix-decoder-transport-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Token data for a small task (each sequence counts upwards mod 96 from a random start, loss on
# every next token).
"$repo/tests/support/token_data.py" pool.safetensors 24 8 1
"$repo/tests/support/token_data.py" test.safetensors 8 8 2
"$gradfix" convert pool.safetensors pool.h5 >/dev/null
# A source task vector and B's own fine-tune: noisy copies of B stand in for real fine-tunes here
# (the mechanics are under test, not the method's benefit).
"$gradfix" generate --like "$model" --like-scale 1 --noise 0.01 --seed 5 --out A_ft >/dev/null
"$gradfix" taskvector --base "$model" --finetuned A_ft --out tau.safetensors >/dev/null
"$gradfix" generate --like "$model" --like-scale 1 --noise 0.01 --seed 6 --out B_ft >/dev/null

transport=(transport --target "$model" --task-vector tau.safetensors --target-finetuned B_ft --data pool.h5
           --test-data test.safetensors --num-samples 4 --seed 3 --support-size 8 --alphas 0.5,1,2)
GRADFIX_PROGRESS_SECONDS=0 "$gradfix" "${transport[@]}" --out T1 --results R1.json >transport.log 2>transport.err
check "transport's progress counts every sample it passes through the model, to the total" \
  bash -c "grep -q '^transport: [0-9]*/[0-9]* samples ([0-9]*%)' transport.err && tail -1 transport.err | grep -q '^transport: \([0-9]*\)/\1 samples (100%)'"
check "transport prints every row" bash -c "grep -q 'B zero-shot' transport.log && grep -q 'naive' transport.log &&
  grep -q 'GradFix (max, normal)' transport.log && grep -q 'oracle mask' transport.log && grep -q 'upper bound' transport.log"
check "transport says the parameters are sharded" grep -q "parameters sharded over 1 rank(s)" transport.log
check "the transported directory carries config.json" cmp -s "$model/config.json" T1/config.json
for ranks in 2 3 4; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" "${transport[@]}" --out "T$ranks" --results "R$ranks.json" >/dev/null
  check "transported directory byte-identical at 1 and $ranks ranks" diff -r T1 "T$ranks"
  check "results byte-identical at 1 and $ranks ranks" cmp -s R1.json "R$ranks.json"
done

# The same steps one by one: signs on the same shots, mask, apply at the alpha transport chose.
alpha=$(python3 -c "import json; print([r for r in json.load(open('R1.json'))['rows'] if r['method'].startswith('GradFix')][0]['alpha'])")
GRADFIX_PROGRESS_SECONDS=0 "$gradfix" signs --weights "$model" --data pool.h5 --num-samples 4 --seed 3 --out votes.safetensors >/dev/null 2>signs.err
check "signs reports progress layer by layer, to the last sample" \
  bash -c "grep -q '^signs: [123]/4 samples' signs.err && tail -1 signs.err | grep -q '^signs: 4/4 samples (100%)'"
"$gradfix" mask --task-vector tau.safetensors --signs votes.safetensors --out masked.safetensors >/dev/null
"$gradfix" apply --base "$model" --task-vector masked.safetensors --alpha "$alpha" --out steps >/dev/null
same_tensors=$repo/tests/support/same_tensors.py
check "transport writes exactly signs -> mask -> apply at the chosen alpha ($alpha)" "$same_tensors" T1 steps
check "the GradFix model differs from B" bash -c "! '$same_tensors' T1 '$model'"
"$gradfix" eval --weights "$model" --data test.safetensors --results zero.json >/dev/null
"$gradfix" eval --weights B_ft --data test.safetensors --results upper.json >/dev/null
check "the zero-shot row is eval of B on the test set" python3 -c "
import json
rows = {r['method']: r for r in json.load(open('R1.json'))['rows']}
zero, upper = json.load(open('zero.json')), json.load(open('upper.json'))
assert rows['B zero-shot']['test_loss'] == zero['mean_loss'] and rows['B zero-shot']['test_accuracy'] == zero['token_accuracy'], rows
assert rows['B fine-tuned (upper bound)']['test_loss'] == upper['mean_loss'], rows
assert rows['B + alpha tau_A (naive)']['kept'] == 1.0 and rows['oracle mask sign(tau_B)']['sign_agreement_with_tau_b'] == 1.0"
# Mean-mode statistics and a soft mask run the same way at 1 and 2 ranks.
"$gradfix" "${transport[@]}" --sign-mode mean --mask-mode soft3 --results M1.json >/dev/null
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" "${transport[@]}" --sign-mode mean --mask-mode soft3 --results M2.json >/dev/null
check "mean / soft3 results equal at 1 and 2 ranks" cmp -s M1.json M2.json
check "mean / soft3 names its row" grep -q '"GradFix (mean, soft3)"' M1.json
# --source-base / --source-finetuned instead of a task vector: the same rows.
"$gradfix" transport --target "$model" --source-base "$model" --source-finetuned A_ft --data pool.h5 --test-data test.safetensors \
  --num-samples 4 --seed 3 --support-size 8 --alphas 0.5,1,2 --results S1.json >/dev/null
check "source pair gives the naive and GradFix rows of the task vector" python3 -c "
import json
a = [r for r in json.load(open('R1.json'))['rows'] if not r['method'].startswith(('oracle', 'B fine'))]
b = json.load(open('S1.json'))['rows']
for r in a: r['sign_agreement_with_tau_b'] = -1
assert a == b, (a, b)"

# --statistics-cache: the first run computes both gradient passes (the votes, and the mean
# gradient for <g, d>) and keeps them; later runs with the same B, shots and sign mode read them,
# at any P and for any mask mode, and give the rows of a run without the cache. An entry that is
# corrupt or of another key is recomputed, never trusted.
cache_counts() {  # cache_counts RESULTS HITS MISSES
  python3 -c "import json,sys; c = json.load(open('$1'))['statistics_cache']; sys.exit(0 if (c['hits'], c['misses']) == ($2, $3) else 1)"
}
same_rows() {  # same_rows A B: the results' rows are equal
  python3 -c "import json,sys; sys.exit(0 if json.load(open('$1'))['rows'] == json.load(open('$2'))['rows'] else 1)"
}
"$gradfix" "${transport[@]}" --statistics-cache cache --results C1.json >c1.log
check "a first run with a cache computes two passes" cache_counts C1.json 0 2
check "a first run with a cache keeps two entries" test "$(ls cache/*.safetensors | wc -l)" -eq 2
check "a first run with a cache gives the rows of a run without" same_rows C1.json R1.json
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" "${transport[@]}" --statistics-cache cache --results C2.json >c2.log
check "a second run at 2 ranks reads both passes" cache_counts C2.json 2 0
check "a second run says where it read them" grep -q "max statistics read from cache/[0-9a-f]*.safetensors" c2.log
check "a second run gives the same rows" same_rows C2.json R1.json
"$gradfix" "${transport[@]}" --statistics-cache cache --mask-mode soft3 --sign-mode max --results C3.json >/dev/null
"$gradfix" "${transport[@]}" --mask-mode soft3 --results N3.json >/dev/null
check "another mask mode reuses both passes" cache_counts C3.json 2 0
check "another mask mode: the rows of a run without the cache" same_rows C3.json N3.json
others=(--data pool.h5 --test-data test.safetensors --num-samples 4 --support-size 8 --alphas 0.5,1,2 --statistics-cache cache)
"$gradfix" transport --target "$model" --task-vector tau.safetensors --target-finetuned B_ft --seed 4 "${others[@]}" --results C4.json >/dev/null
check "other shots (another seed) are a miss" cache_counts C4.json 0 2
"$gradfix" transport --target B_ft --task-vector tau.safetensors --seed 3 "${others[@]}" --results C5.json >/dev/null
check "another B is a miss" cache_counts C5.json 0 2
entries=(cache/*.safetensors)
check "each pass of each run has its own entry" test "${#entries[@]}" -eq 6
votes_entry=$(grep -o "max statistics read from cache/[0-9a-f]*.safetensors" c2.log | grep -o "cache/.*")
truncate -s 200 "$votes_entry"
"$gradfix" "${transport[@]}" --statistics-cache cache --results C6.json >/dev/null
check "a truncated entry is recomputed" cache_counts C6.json 1 1
check "a truncated entry: the same rows" same_rows C6.json R1.json
mean_entry=$(ls cache/*.safetensors | grep -v "$votes_entry" | head -1)
cp "$mean_entry" "$votes_entry"
"$gradfix" "${transport[@]}" --statistics-cache cache --results C7.json >/dev/null
check "an entry holding another key's statistics is recomputed" cache_counts C7.json 1 1
check "an entry of another key: the same rows" same_rows C7.json R1.json
# --vote-precision bf16: the votes' products in bfloat16 are another entry; the mean gradient's
# pass (<g, d>) stays float32 and is read from the cache.
"$gradfix" "${transport[@]}" --statistics-cache cache --vote-precision bf16 --results C8.json >c8.log
check "bf16 votes are a miss, the float32 mean gradient a hit" cache_counts C8.json 1 1
check "the bf16 votes' entry is a new one" test "$(ls cache/*.safetensors | wc -l)" -eq 7
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" "${transport[@]}" --vote-precision bf16 --results C9.json >/dev/null
check "bf16 votes: the rows at 2 ranks without the cache equal the cached run's" same_rows C9.json C8.json

# A sweep over two mask modes and two seeds runs the gradient passes once per seed (two passes
# each) and reuses them in the other mask mode's points, with the rows of the runs above.
cat >sweep.ini <<EOF
[sweep]
out = sweep
tasks = count
mask-mode = normal,soft3
seed = 3,4
[transport]
target = $model
task-vector = tau.safetensors
target-finetuned = B_ft
test-data = test.safetensors
num-samples = 4
support-size = 8
alphas = 0.5,1,2
[task.count]
data = pool.h5
EOF
"$gradfix" sweep --config sweep.ini >sweep.log
check "the sweep's table does not depend on what the cache held" bash -c "! grep -q 'statistics cache' sweep/table.md"
check "the sweep says 2 of 4 points reused cached statistics and 4 passes ran" \
  grep -q "sweep: statistics cache: 2 of 4 points reused cached statistics; 4 gradient passes ran" sweep.log
check "the sweep's cache holds 4 entries" test "$(ls sweep/statistics/*.safetensors | wc -l)" -eq 4
check "a sweep point's rows equal the single run's" python3 -c "
import glob, json, sys
found = glob.glob('sweep/points/count/mask-mode=soft3_seed=3-*.json')
sys.exit(0 if len(found) == 1 and json.load(open(found[0]))['rows'] == json.load(open('N3.json'))['rows'] else 1)"
"$gradfix" init --arch mlp --dims 784,16,10 --out mlp.safetensors >/dev/null
expect_exit2 "--statistics-cache on a classifier" "statistics-cache is for model directories" "$gradfix" transport --target mlp.safetensors \
  --task-vector mlp.safetensors --data pool.h5 --test-data test.safetensors --statistics-cache cache --results bad.json
expect_exit2 "--vote-precision bf16 on a classifier" "vote-precision bf16 is for model directories (decoders, CLIP), .*mlp.safetensors is a built-in" \
  "$gradfix" transport --target mlp.safetensors --task-vector mlp.safetensors --data pool.h5 --test-data test.safetensors --vote-precision bf16 \
  --results bad.json
expect_exit2 "--vote-precision bf16 with --sign-mode mean" "vote-precision bf16 narrows the products of per-sample votes (--sign-mode max)" \
  "$gradfix" "${transport[@]}" --sign-mode mean --vote-precision bf16 --results bad.json
expect_exit2 "an unknown --vote-precision" "unknown --vote-precision 'fp8'; valid: f32|bf16" "$gradfix" "${transport[@]}" --vote-precision fp8 \
  --results bad.json

# Bad inputs: exit 2, what is wrong named, nothing published.
expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$gradfix" "$@"
  check "$description: nothing published" test ! -e bad -a ! -e bad.json
}
base=(transport --target "$model" --data pool.h5 --test-data test.safetensors --support-size 8 --alphas 0.5,1 --out bad --results bad.json)
expect_bad "no shots chosen" "takes its shots with --num-samples" "${base[@]}" --task-vector tau.safetensors
expect_bad "every sample a shot" "no samples are left\|--num-samples 24 but the pool holds 24" "${base[@]}" --task-vector tau.safetensors --num-samples 24
"$gradfix" convert tau.safetensors tau_small.safetensors --include 'layers\.0\.' >/dev/null
"$gradfix" transport --target "$model" --task-vector tau_small.safetensors --data pool.h5 --test-data test.safetensors --num-samples 4 \
  --support-size 8 --alphas 0.5,1 --results part.json >/dev/null
check "a task vector of part of the model is taken (the rest is zero)" test -s part.json
"$gradfix" init --arch llama --config-file "$repo/configs/tiny-llama.json" --out other >/dev/null
expect_bad "a task vector of another model" "other/model.safetensors does not match .*'model.embed_tokens.weight' is \[256, 64\], the config needs \[96, 32\]" \
  "${base[@]}" --num-samples 4 --task-vector other
expect_bad "a task vector with tensors the model lacks" "the config does not have: 'input_ids'" "${base[@]}" --num-samples 4 --task-vector pool.safetensors
expect_bad "--finetune-freeze on a decoder" "finetune-freeze is for classifiers; .* is a model directory" "${base[@]}" --num-samples 4 \
  --task-vector tau.safetensors --finetune-freeze 'layers'
expect_bad "--save-support on a decoder" "save-support is for classifiers" "${base[@]}" --num-samples 4 --task-vector tau.safetensors \
  --save-support support.txt
expect_bad "no test data" "--test-data is required" transport --target "$model" --data pool.h5 --num-samples 4 --task-vector tau.safetensors \
  --out bad --results bad.json
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" "${base[@]}" --num-samples 4 --task-vector tau.safetensors --target-finetuned tau_small.safetensors \
  >out.txt 2>&1 && code=0 || code=$?
check "an incomplete B_ft at 2 ranks: exit 2 (got $code)" test "$code" -eq 2
check "an incomplete B_ft: the missing tensors named" grep -q "tau_small.safetensors does not match .* tensor(s) missing" out.txt
check "an incomplete B_ft: nothing published" test ! -e bad -a ! -e bad.json
finish
