#!/usr/bin/env bash
# Hugging Face model directories in and out (issue 8): a directory holding one model.safetensors
# is read as a checkpoint; a directory output carries config.json (torch_dtype following
# --out-dtype) and the other model files, gets its own README.md model card instead of the
# input's, replaces an earlier output whole, refuses a directory that is not a checkpoint unless
# --force (and one holding a subdirectory even then); every output's metadata keeps the chain of
# operations (the merge behind a task vector survives the apply that uses it). At 1 and 3 ranks.
# Also the progress lines of long runs (rank 0 only, --quiet silences them).
#   model_directory_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
work=$(mktemp -d /tmp/gradfix-model-dir-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# A save_pretrained-style small model: one model.safetensors beside config.json and a card.
mkdir base
"$gradfix" generate --mlp 16,8,4 --dtype F32 --seed 1 --out base/model.safetensors >/dev/null
printf '{"model_type": "toy", "torch_dtype": "float32"}\n' >base/config.json
printf '{"eos_token_id": 2}\n' >base/generation_config.json
printf '# The base model card\n' >base/README.md
check "inspect reads a directory holding one model.safetensors" bash -c "'$gradfix' inspect base | grep -q '^layers.0.weight '"
for i in 1 2; do "$gradfix" generate --like base --noise 0.1 --seed $((i + 1)) --out "ft$i" >/dev/null; done

for ranks in 1 3; do
  g=(mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix")
  out=p$ranks
  mkdir "$out"
  "${g[@]}" taskvector --base base --finetuned ft1 --out "$out/t1.safetensors" >/dev/null
  "${g[@]}" taskvector --base base --finetuned ft2 --out "$out/t2.safetensors" >/dev/null
  "${g[@]}" merge --task-vector "$out/t1.safetensors" --task-vector "$out/t2.safetensors" --method ties --out "$out/merged.safetensors" >/dev/null
  "${g[@]}" apply --base base --task-vector "$out/merged.safetensors" --alpha 0.25 --out "$out/model" --out-dtype bfloat16 >/dev/null
  check "P=$ranks: config.json and generation_config.json are carried" test -f "$out/model/generation_config.json"
  check "P=$ranks: torch_dtype follows --out-dtype" grep -q '"torch_dtype": "bfloat16"' "$out/model/config.json"
  check "P=$ranks: the input's README.md is not copied" bash -c "! grep -q 'The base model card' '$out/model/README.md'"
  check "P=$ranks: the model card names the operation and alpha" bash -c \
    "grep -q 'gradfix apply' '$out/model/README.md' && grep -q '| alpha | 0.25 |' '$out/model/README.md'"
  check "P=$ranks: the model card shows the merge behind the task vector" grep -q 'task_vector: `merge`.*"method":"ties"' "$out/model/README.md"
  check "P=$ranks: the card has transformers front matter" grep -q '^library_name: transformers' "$out/model/README.md"
  "$gradfix" inspect "$out/model" >inspect.txt
  check "P=$ranks: metadata keeps this operation" grep -q '^metadata gradfix.operation = apply' inspect.txt
  check "P=$ranks: metadata keeps the merge that made the task vector" grep -q '^metadata gradfix.input.task_vector.gradfix.operation = merge' inspect.txt
  check "P=$ranks: ... and the task vectors it merged" grep -q '^metadata gradfix.input.task_vector.gradfix.input.task_vector.1.gradfix.operation = taskvector' inspect.txt
  check "P=$ranks: format pt is kept for transformers" grep -q '^metadata format = pt' inspect.txt
  # An earlier output with more shards is replaced whole: no stale shard remains.
  "${g[@]}" convert base "$out/sharded" --max-shard-size 300 >/dev/null
  shards_before=$(ls "$out/sharded" | grep -c '^model-')
  "${g[@]}" convert base "$out/sharded" >/dev/null
  check "P=$ranks: a rerun replaces the directory whole ($shards_before shards before, one model.safetensors after)" \
    test "$(ls "$out/sharded" | grep -c 'safetensors')" -eq 1 -a -f "$out/sharded/model.safetensors"
  # A directory that is not a checkpoint is refused unless --force; with a subdirectory, always.
  mkdir "$out/notes" && printf 'mine\n' >"$out/notes/todo.txt"
  expect_exit2 "P=$ranks: a directory that is not a checkpoint" "is not a checkpoint.*--force" \
    "${g[@]}" convert base "$out/notes"
  check "P=$ranks: the refused directory is untouched" grep -q mine "$out/notes/todo.txt"
  "${g[@]}" convert base "$out/notes" --force >/dev/null
  check "P=$ranks: --force replaces it" bash -c "test ! -e '$out/notes/todo.txt' && test -f '$out/notes/model.safetensors'"
  mkdir -p "$out/nested/sub"
  expect_exit2 "P=$ranks: a directory holding a subdirectory, even with --force" "not a regular file" \
    "${g[@]}" convert base "$out/nested" --force
  check "P=$ranks: its subdirectory is untouched" test -d "$out/nested/sub"
  check "P=$ranks: no temporary left beside the outputs" bash -c "! ls -a '$out' | grep -q tmp"
done
check "outputs are equal at 1 and 3 ranks" "$repo/tests/support/same_tensors.py" p1/model p3/model

# Progress: rank 0 alone reports on stderr (every GRADFIX_PROGRESS_SECONDS off a terminal), the
# last line at 100%; --quiet reports nothing; stdout keeps the summary, no progress.
"$gradfix" generate --shapes "w=300x300,v=300x100" --seed 4 --out big.safetensors >/dev/null
GRADFIX_PROGRESS_SECONDS=0 mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" convert big.safetensors big.h5 --chunk-elements 20000 \
  >stdout.txt 2>stderr.txt
check "progress lines count chunks and bytes" grep -qE '^convert: [0-9]+/[0-9]+ chunks, .* of .* \([0-9]+%\), .*/s' stderr.txt
check "the last progress line is at 100%" bash -c "grep '^convert: ' stderr.txt | tail -1 | grep -q '(100%)'"
check "one rank reports: rank 0's 3 chunks, then the final line" test "$(grep -c '^convert: ' stderr.txt)" -eq 4
check "no progress line on stdout" bash -c "! grep -q 'chunks, ' stdout.txt && grep -q '^convert: 2 tensors' stdout.txt"
GRADFIX_PROGRESS_SECONDS=0 "$gradfix" convert big.safetensors big2.h5 --chunk-elements 20000 --quiet >/dev/null 2>quiet.txt
check "--quiet: no progress" test ! -s quiet.txt
finish
