# Shared by the benchmark scripts (sourced).

# block_shapes ELEMENTS: --shapes text for about ELEMENTS elements as 4096-row matrices of up to
# 4096 columns (16M elements each; the last one narrower).
block_shapes() {
  local elements=$1 shapes="" cols i
  for ((i = 0; elements > 0; i++)); do
    cols=$((elements >= 4096 * 4096 ? 4096 : elements / 4096))
    [ "$cols" -gt 0 ] || break
    shapes+="${shapes:+,}blocks.$i.weight=4096x$cols"
    elements=$((elements - 4096 * cols))
  done
  echo "$shapes"
}
