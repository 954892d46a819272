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

finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
