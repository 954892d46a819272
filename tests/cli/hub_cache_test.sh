#!/usr/bin/env bash
# Models in the Hugging Face hub cache (issue 28 item 2), laid out as huggingface_hub lays them
# out: models--ORG--NAME/{blobs/HASH, refs/main, snapshots/COMMIT/FILE -> ../../blobs/HASH}.
# Every file of a snapshot is a link: gradfix reads the weights, the index and config.json through
# them, carries config.json, generation_config.json and the tokenizer files into a directory
# output (regular files there), accepts ORG/NAME and ORG/NAME@REV wherever a model is read, and
# refuses by name any link that leads outside the cache repository (weights, index or carried
# file alike), publishing nothing. At 1 and 2 ranks.
#   hub_cache_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/decoders
work=$(mktemp -d /tmp/gradfix-hub-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# snapshot_of CACHE ORG NAME COMMIT SOURCE_DIR: the files of SOURCE_DIR as blobs, linked from
# the snapshot, and refs/main naming the commit.
snapshot_of() {
  local repository=$1/models--$2--$3 commit=$4 source=$5
  mkdir -p "$repository/blobs" "$repository/refs" "$repository/snapshots/$commit"
  for file in "$source"/*; do
    local hash
    hash=$(sha256sum "$file" | cut -c1-64)
    cp "$file" "$repository/blobs/$hash"
    ln -s "../../blobs/$hash" "$repository/snapshots/$commit/$(basename "$file")"
  done
  printf '%s' "$commit" >"$repository/refs/main"
}

commit=0123456789abcdef0123456789abcdef01234567
mkdir llama
cp "$fixtures/llama/model/"* llama/
printf '{"version": "1.0", "model": {"type": "BPE"}}\n' >llama/tokenizer.json
printf '{"tokenizer_class": "PreTrainedTokenizerFast"}\n' >llama/tokenizer_config.json
snapshot_of cache tester Tiny-Llama-3.1 "$commit" llama
snapshot=cache/models--tester--Tiny-Llama-3.1/snapshots/$commit
check "the snapshot holds links only" test "$(find "$snapshot" -type l | wc -l)" -eq "$(ls "$snapshot" | wc -l)"
export HF_HUB_CACHE=$work/cache

"$gradfix" convert "$fixtures/llama/tokens.safetensors" tokens.h5 >/dev/null
"$gradfix" generate --like "$snapshot" --noise 0.01 --seed 3 --out tau.safetensors >/dev/null
"$gradfix" inspect "$snapshot" | grep -v "$snapshot" >by_path.txt
for name in tester/Tiny-Llama-3.1 tester/Tiny-Llama-3.1@main "tester/Tiny-Llama-3.1@$commit"; do
  "$gradfix" inspect "$name" | grep -v "$snapshot" >by_name.txt
  check "inspect $name reads the snapshot" bash -c "cmp -s by_path.txt by_name.txt && grep -q '^model.embed_tokens.weight ' by_name.txt"
done
# The model subcommands (a build with LibTorch; the sanitizer build has none) resolve names alike.
torch=0
"$gradfix" --version | grep -q "libtorch  yes" && torch=1
if [ "$torch" = 1 ]; then
  "$gradfix" eval --weights "$snapshot" --data tokens.h5 --results by_path.json >/dev/null
  for name in tester/Tiny-Llama-3.1 "tester/Tiny-Llama-3.1@$commit"; do
    "$gradfix" eval --weights "$name" --data tokens.h5 --results by_name.json >/dev/null
    check "eval --weights $name reads the snapshot" cmp -s by_path.json by_name.json
  done
fi
HF_HUB_CACHE= HF_HOME=$work/hf XDG_CACHE_HOME= bash -c "mkdir -p '$work/hf' && ln -sfn '$work/cache' '$work/hf/hub' &&
  '$gradfix' inspect tester/Tiny-Llama-3.1 >inspect_home.txt"
check "HF_HOME/hub is the cache when HF_HUB_CACHE is unset" grep -q '^model.embed_tokens.weight ' inspect_home.txt

for ranks in 1 2; do
  g=(mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix")
  out=Tiny-Llama-3.1-moved.p$ranks
  "${g[@]}" apply --base tester/Tiny-Llama-3.1 --task-vector tau.safetensors --alpha 0.5 --out "$out" >/dev/null
  for file in config.json generation_config.json tokenizer.json tokenizer_config.json; do
    check "P=$ranks: $file is carried as a regular file" bash -c "test -f '$out/$file' && test ! -L '$out/$file' && cmp -s '$out/$file' 'llama/$file'"
  done
  check "P=$ranks: the weights are written" test -f "$out/model.safetensors"
  check "P=$ranks: the output is a checkpoint gradfix reads back" bash -c "'$gradfix' inspect '$out' | grep -q '^model.embed_tokens.weight '"
done

# Links that lead outside the cache repository: refused by name, nothing published.
printf 'a private file\n' >private.txt
bad=cache/models--tester--Leaky/snapshots/$commit
snapshot_of cache tester Leaky "$commit" llama
ln -s "$work/private.txt" "$bad/notes.txt"
expect_exit2 "a carried file linked outside the cache repository" "notes.txt: a symbolic link to .*private.txt, outside .*models--tester--Leaky" \
  "$gradfix" apply --base tester/Leaky --task-vector tau.safetensors --out leaky_out
check "nothing is published after the refusal" test ! -e leaky_out
rm "$bad/notes.txt"
shard=$(readlink "$bad/model-00002-of-00003.safetensors")
cp "$bad/$shard" outside.safetensors
ln -sfn "$work/outside.safetensors" "$bad/model-00002-of-00003.safetensors"
expect_exit2 "a shard linked outside the cache repository" "model-00002-of-00003.safetensors: a symbolic link to .*outside.safetensors, outside" \
  "$gradfix" inspect "$bad"
ln -sfn "$shard" "$bad/model-00002-of-00003.safetensors"
ln -sfn "$work/llama/config.json" "$bad/config.json"
expect_exit2 "config.json linked outside the cache repository" "config.json: a symbolic link to .*llama/config.json, outside" \
  "$gradfix" apply --base tester/Leaky --task-vector tau.safetensors --out leaky_out
[ "$torch" = 0 ] || expect_exit2 "config.json linked outside, read by a model subcommand" "config.json: a symbolic link to .*llama/config.json, outside" \
  "$gradfix" eval --weights tester/Leaky --data tokens.h5
ln -sfn "../../blobs/missing" "$bad/model-00002-of-00003.safetensors"
expect_exit2 "a dangling link (an unfinished download)" "model-00002-of-00003.safetensors: a symbolic link that leads nowhere" \
  "$gradfix" inspect "$bad"

# A directory outside any cache: links within it are followed, links out of it refused.
mkdir plain
cp llama/* plain/
mv plain/config.json plain/config.real.json
ln -s config.real.json plain/config.json
"$gradfix" apply --base plain --task-vector tau.safetensors --alpha 0.5 --out plain_out >/dev/null
check "a link inside a plain model directory is followed" cmp -s plain_out/config.json llama/config.json
ln -sfn "$work/llama/config.json" plain/config.json
expect_exit2 "a link out of a plain model directory" "plain/config.json: a symbolic link to .*, outside .*plain" \
  "$gradfix" apply --base plain --task-vector tau.safetensors --out plain_out2

# Hub names that the cache does not hold.
expect_exit2 "a model not in the cache" "'tester/Absent' is no path here.*does not download.*huggingface-cli download tester/Absent" \
  "$gradfix" inspect tester/Absent
expect_exit2 "a revision not in the cache" "no revision 'v9'.*huggingface-cli download tester/Tiny-Llama-3.1 --revision v9" \
  "$gradfix" inspect tester/Tiny-Llama-3.1@v9
finish
