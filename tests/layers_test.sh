#!/usr/bin/env bash
# The layers, as the includes show them: each source and header folder may include only its own
# layer and the layers below it (docs/architecture.md). The map is not written here: a layer is a
# folder under src/ with a CMakeLists.txt (its headers under include/gradfix/ of the same name),
# and what it may use is what its target_link_libraries lines name (gradfix_X, gradfix_X_api,
# gradfix_X_stub: layer X), followed through the layers below. The linker checks the calls (every
# layer is a shared library linked with --no-undefined); this checks the headers.
#   layers_test.sh SOURCE_DIR
set -euo pipefail
root=$1
status=0
declare -A direct allowed
layers=()
for file in "$root"/src/*/CMakeLists.txt; do
  layer=$(basename "$(dirname "$file")")
  layers+=("$layer")
  direct[$layer]=$(grep -o 'target_link_libraries(gradfix_[a-z_]*[^)]*' "$file" | sed 's/^target_link_libraries(gradfix_[a-z_]*//' |
                   grep -o 'gradfix_[a-z]*' | sed -e 's/^gradfix_//' | sort -u | tr '\n' ' ' || true)
done
[ "${#layers[@]}" -ge 5 ] || { echo "layers: only ${#layers[@]} layer folders under $root/src" >&2; exit 1; }
is_layer() { for l in "${layers[@]}"; do [ "$l" = "$1" ] && return 0; done; return 1; }
closure() {  # closure LAYER: the layer and every layer it reaches through its link lines
  local seen=" $1 " queue=("$1")
  while [ ${#queue[@]} -gt 0 ]; do
    local next=${queue[0]}
    queue=("${queue[@]:1}")
    for used in ${direct[$next]:-}; do
      is_layer "$used" || continue
      [[ "$seen" == *" $used "* ]] && continue
      seen="$seen$used "
      queue+=("$used")
    done
  done
  echo "$seen"
}
for layer in "${layers[@]}"; do allowed[$layer]=$(closure "$layer"); done
layer_of_include() {
  [ "$1" = "version.hpp" ] && { echo io; return; }
  is_layer "$1" && { echo "$1"; return; }
  echo unknown
}
checked=0
for layer in "${layers[@]}"; do
  for folder in "$root/src/$layer" "$root/include/gradfix/$layer"; do
    [ -d "$folder" ] || continue
    while IFS= read -r line; do
      file=${line%%:*}
      included=$(echo "$line" | sed -n 's/.*#include "gradfix\/\([^/"]*\).*/\1/p')
      [ -n "$included" ] || continue
      target=$(layer_of_include "$included")
      checked=$((checked + 1))
      if [[ "${allowed[$layer]}" != *" $target "* ]]; then
        echo "layers: ${file#$root/} (layer $layer) includes gradfix/$included (layer $target)" >&2
        status=1
      fi
    done < <(grep -H '#include "gradfix/' -r "$folder" || true)
  done
done
for folder in "$root"/include/gradfix/*/; do
  is_layer "$(basename "$folder")" || { echo "layers: include/gradfix/$(basename "$folder") is no layer folder under src/" >&2; status=1; }
done
[ "$checked" -gt 50 ] || { echo "layers: only $checked includes checked: is $root the source tree?" >&2; exit 1; }
for layer in "${layers[@]}"; do echo "layers: $layer may use:${allowed[$layer]}"; done
[ "$status" -eq 0 ] && echo "layers: $checked includes, each within its layer or below"
exit $status
