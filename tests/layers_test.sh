#!/usr/bin/env bash
# The layers, as the includes show them: each source and header folder may include only the
# parts of its own layer and of the layers below it (docs/architecture.md). The linker checks
# calls (every layer is a shared library linked with --no-undefined); this checks the headers.
#   layers_test.sh SOURCE_DIR
set -euo pipefail
root=$1
status=0
# layer name: its parts
declare -A parts=(
  [io]="core io data"
  [algebra]="mask merge"
  [dist]="comm shard signs dist"
  [jobs]="pipeline jobs"
  [model]="model"
  [cli]="cli"
)
# layer name: the layers it may include (itself included)
declare -A allowed=(
  [io]="io"
  [algebra]="io algebra"
  [dist]="io dist"
  [jobs]="io algebra dist jobs"
  [model]="io algebra dist jobs model"
  [cli]="io algebra dist jobs model cli"
)
layer_of_part() {
  for layer in "${!parts[@]}"; do
    for part in ${parts[$layer]}; do [ "$part" = "$1" ] && { echo "$layer"; return; }; done
  done
  [ "$1" = "version.hpp" ] && { echo io; return; }
  echo unknown
}
checked=0
for layer in "${!parts[@]}"; do
  for part in ${parts[$layer]}; do
    for folder in "$root/src/$part" "$root/include/gradfix/$part"; do
      [ -d "$folder" ] || continue
      while IFS= read -r line; do
        file=${line%%:*}
        included=$(echo "$line" | sed -n 's/.*#include "gradfix\/\([^/"]*\).*/\1/p')
        [ -n "$included" ] || continue
        target=$(layer_of_part "$included")
        checked=$((checked + 1))
        if [[ " ${allowed[$layer]} " != *" $target "* ]]; then
          echo "layers: ${file#$root/} (layer $layer) includes gradfix/$included (layer $target)" >&2
          status=1
        fi
      done < <(grep -H '#include "gradfix/' -r "$folder" || true)
    done
  done
done
[ "$checked" -gt 50 ] || { echo "layers: only $checked includes checked: is $root the source tree?" >&2; exit 1; }
[ "$status" -eq 0 ] && echo "layers: $checked includes, each within its layer or below"
exit $status
