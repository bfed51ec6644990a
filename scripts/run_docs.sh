#!/usr/bin/env bash
# Runs the commands the guide's pages show, in the order they show them, in a scratch folder
# with the files they name made first (the demos' models, the users'-files data set, the test
# ONNX networks, the golden action expert and its cache under the names the pages use). Each
# command of each ```bash or ```sh block is run (a line, with its `\` continuations; a variable
# set on a line of its own holds for the rest of the page; `cargo run` runs in the checkout);
# the script prints ok/FAIL per command and exits non-zero if any failed.
#
#   scripts/run_docs.sh [PAGE.md ...]      # default: every page under docs/
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
  pages=()
  for p in "$root"/docs/*.md; do pages+=("docs/$(basename "$p")"); done
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
# The action expert of docs/action-experts.md: the golden Qwen3 expert and its prefix cache.
cp -r "$root/tests/data/golden/expert-qwen3/model" expert
cp "$root/tests/data/golden/expert-qwen3/kv.safetensors" kv.safetensors
# Pages that read the checkout's test data name it from the root (tests/data/...).
ln -s "$root/tests" tests

skip_re='^(cargo build|pip |python|LIB=|ORT_DYLIB_PATH|cargo test)|--runtime ort|--device cuda|--python'
failed=0
skipped=()
for page in "${pages[@]}"; do
  file="$root/$page"
  [ -f "$file" ] || { echo "== $page: no such page"; failed=$((failed + 1)); continue; }
  echo "== $page"
  # The commands of the page's ```bash and ```sh blocks: comments and blank lines dropped,
  # lines ending in a backslash joined to the next.
  mapfile -t cmds < <(awk '/^```(bash|sh)$/{on=1; next} /^```/{on=0} on' "$file" \
    | grep -v '^[[:space:]]*#' | sed 's/[[:space:]]#.*$//' | grep -v '^[[:space:]]*$' \
    | awk '{ if (sub(/\\$/, "")) { acc = acc $0 } else { print acc $0; acc = "" } }')
  vars=""
  for c in "${cmds[@]}"; do
    if [[ "$c" =~ $skip_re ]]; then
      skipped+=("$page: $c")
      continue
    fi
    if [[ "$c" =~ ^[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*$ ]]; then
      vars+="$c; "
      continue
    fi
    dir="$work"
    [[ "$c" =~ ^cargo\ run ]] && dir="$root"
    if out=$(cd "$dir" && bash -c "$vars$c" 2>&1); then
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
