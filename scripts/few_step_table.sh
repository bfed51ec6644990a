#!/usr/bin/env bash
# The README's few-step table: quality (sliced W2 to fresh data, and its ratio to the
# data-to-data floor) against the number of Euler steps for base (independent coupling),
# OT-coupled and reflowed models, every model trained with the CLI's default sizes, on each
# built-in 2-D data set and on a 20,000-row user data set (a spiral inside a ring, written by
# the user_data example). One process per data set, so a multi-core machine runs them side by
# side; the rows are printed in order at the end.
#
#   scripts/few_step_table.sh [OUT_DIR]      (default: few-step-table/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-few-step-table}
mkdir -p "$out"
cargo build --release -q -p flow-matching-cli --example few_step_table --example user_data
bin=target/release/examples
"$bin/user_data" "$out/user.npy" 20000 0
"$bin/user_data" "$out/user-heldout.npy" 2000 1
pids=()
for d in moons 8gaussians checkerboard circles swissroll; do
  "$bin/few_step_table" --data "$d" > "$out/$d.md" 2> "$out/$d.log" &
  pids+=($!)
done
"$bin/few_step_table" --data "" --user "$out/user.npy:$out/user-heldout.npy" > "$out/user.md" 2> "$out/user.log" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
head -n 2 "$out/moons.md"
for d in moons 8gaussians checkerboard circles swissroll user; do
  grep '^| [a-z0-9]' "$out/$d.md" | grep -v '^| data'
done
