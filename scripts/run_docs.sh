#!/usr/bin/env bash
# Runs the commands the guide's pages show, in the order they show them, in a scratch folder
# with the files they name made first (the demos' models, the users'-files data set, the test
# ONNX networks under the names the pages use). Each line of each ```bash block is one command;
# the script prints ok/FAIL per command and exits non-zero if any failed.
#
#   scripts/run_docs.sh [PAGE.md ...]      # default: the pages listed below
#
# FM_BIN names the flow-matching binary (default: target/release/flow-matching, built if
# missing). Lines that need what a fresh machine lacks (PyTorch, ONNX Runtime, a GPU, a
# `cargo build`) are skipped and listed. cli/tests/docs.rs checks every command's flags in CI;
# this script checks that they run.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${FM_BIN:-$root/target/release/flow-matching}"
if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --release --locked -p flow-matching-cli) || exit 1
fi
pages=("$@")
if [ ${#pages[@]} -eq 0 ]; then
  pages=(docs/solvers.md docs/driving-scenes.md docs/onnx.md docs/trajectories.md docs/action-experts.md)
fi
work="$(mktemp -d)"
echo "scratch folder: $work"
mkdir -p "$work/bin"
ln -s "$bin" "$work/bin/flow-matching"
export PATH="$work/bin:$PATH"
cd "$work" || exit 1

# The files the pages name.
echo "== preparing the pages' inputs"
flow-matching demo >/dev/null || exit 1
flow-matching demo --data digits --conditional --out-dir demo-digits --n 1000 >/dev/null || exit 1
profile=(--release)
case "$bin" in */debug/*) profile=() ;; esac
(cd "$root" && cargo run "${profile[@]}" --locked -q --example highway_files -- "$work/DIR") >/dev/null || exit 1
cp "$root/tests/data/onnx/traj.onnx" net.onnx
cp "$root/tests/data/onnx/traj_ctx.npy" scene.npy
cp "$root/tests/data/onnx/traj_null.npy" zeros.npy
cp "$root/tests/data/onnx/pointwise.onnx" tokens.onnx

skip_re='^(cargo build|pip |python|LIB=|ORT_DYLIB_PATH|cargo test)|--runtime ort|--device cuda|--python'
failed=0
skipped=()
for page in "${pages[@]}"; do
  file="$root/$page"
  [ -f "$file" ] || { echo "== $page: no such page"; failed=$((failed + 1)); continue; }
  echo "== $page"
  # The lines of the page's ```bash blocks, comments and blank lines dropped.
  mapfile -t cmds < <(awk '/^```bash/{on=1; next} /^```/{on=0} on' "$file" | sed 's/[[:space:]]#.*$//' | grep -v '^[[:space:]]*#' | grep -v '^[[:space:]]*$')
  for c in "${cmds[@]}"; do
    if [[ "$c" =~ $skip_re ]]; then
      skipped+=("$page: $c")
      continue
    fi
    if out=$(bash -c "$c" 2>&1); then
      echo "ok    $c"
    else
      echo "FAIL  $c"
      echo "$out" | tail -3 | sed 's/^/      /'
      failed=$((failed + 1))
    fi
  done
done
if [ ${#skipped[@]} -gt 0 ]; then
  echo "== skipped (need PyTorch, ONNX Runtime, a GPU or a build):"
  printf '      %s\n' "${skipped[@]}"
fi
echo "== $failed failed"
[ "$failed" -eq 0 ]
