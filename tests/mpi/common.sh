# Shared by the MPI test scripts: the mpirun command line and small assertions.
mpirun_flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && mpirun_flags+=(--allow-run-as-root)
passed=0
failed=0

check() {  # check DESCRIPTION COMMAND...
  local description=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAILED: $description" >&2
  fi
}

# expect_exit2 DESCRIPTION PATTERN COMMAND...: it exits 2 and says PATTERN. The output goes to
# $expect_output (default out.txt in the current directory; scripts that run inside the source
# tree point it at their work directory).
expect_exit2() {
  local description=$1 pattern=$2 output=${expect_output:-out.txt}
  shift 2
  set +e
  "$@" >"$output" 2>&1
  local code=$?
  set -e
  check "$description: exit 2 (got $code)" test "$code" -eq 2
  check "$description: message" grep -q -- "$pattern" "$output"
}

# file_job_inputs GRADFIX SHAPES: the inputs of the file jobs in the current directory: a BF16
# base of these tensors, a fine-tune of it, a second task vector, and two statistics files.
file_job_inputs() {
  "$1" generate --shapes "$2" --dtype BF16 --noise 0.1 --seed 1 --out base.safetensors >/dev/null
  "$1" generate --like base.safetensors --noise 0.01 --seed 2 --out ft.safetensors >/dev/null
  "$1" generate --like base.safetensors --like-scale 0 --noise 1 --seed 3 --out signs.h5 >/dev/null
  "$1" generate --like base.safetensors --like-scale 0 --noise 0.01 --seed 4 --out tau2.safetensors >/dev/null
  "$1" generate --like base.safetensors --like-scale 0 --noise 1 --seed 5 --out signs2.safetensors >/dev/null
}

finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
