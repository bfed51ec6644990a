#!/usr/bin/env bash
# The GPU check of issue 13 (item 4), run on a CUDA machine that has no Rust toolchain: the
# binaries are built elsewhere with `--features cuda` (see scripts/build_cuda.sh) and carried
# in a folder (as they are, or packed in binaries.tar.xz), which holds
#   flow-matching          the command line, built with --features cuda, stripped
#   cuda-tests             tests/cuda.rs's test binary (cargo test --features cuda --no-run)
#   core-tests             tests/core.rs's test binary (its one CUDA test is run)
#   pytorch_reference.py   bench/pytorch_reference.py
# It runs from the repository root (tests/data/golden is read from there), prints the GPU,
# finds the CUDA libraries (the toolkit's, or those of python3's PyTorch wheels), runs the
# tests that touch the GPU, then `bench --device cuda` against python3's PyTorch on CUDA.
# Logs go to $OUT (default ./gpu-out). Every stage has its own time limit.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh [FOLDER]      # FOLDER defaults to .gpu
set -u
DIR=${1:-.gpu}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
ROUNDS=${ROUNDS:-3}
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== $(date -u +%FT%TZ) gpu_check in $(pwd), binaries from $DIR"
# The three binaries share most of their bytes (candle's kernels): they travel as one
# tar.xz (about 13 MiB instead of 210), unpacked here with Python's tarfile.
if [ -f "$DIR/binaries.tar.xz" ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$DIR/binaries.tar.xz" "$DIR" && echo "unpacked $DIR/binaries.tar.xz"
fi
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
command -v nvcc >/dev/null && nvcc --version | tail -2

# The libraries the binaries link: libcuda.so.1 (driver), libcublas(Lt).so.13,
# libcurand.so.10, libnvrtc.so.13, libcudart.so.13.
dirs=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu \
    /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && dirs="$dirs:$d"
done
for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    for d in "$sp"/nvidia/cu13/lib "$sp"/nvidia/*/lib; do
        [ -d "$d" ] && dirs="$dirs:$d"
    done
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for b in flow-matching cuda-tests core-tests; do
    [ -x "$DIR/$b" ] || { echo "missing $DIR/$b"; continue; }
    echo "-- ldd $b:"
    ldd "$DIR/$b" | grep -E "cuda|cublas|curand|nvrtc|not found" || true
done

status=0
echo "== CUDA tests (tests/cuda.rs), one thread"
timeout 150 "$DIR/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$OUT/cuda_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "CUDA TESTS FAILED"; status=1; }
echo "== tests/core.rs's CUDA test"
timeout 60 "$DIR/core-tests" --exact error_wrong_device_from_the_step_function --nocapture 2>&1
[ "${PIPESTATUS[0]}" = 0 ] || { echo "CORE CUDA TEST FAILED"; status=1; }

echo "== bench --device cuda against $(python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' 2>&1)"
echo "command: $DIR/flow-matching bench --device cuda --python python3 --script $DIR/pytorch_reference.py --rounds $ROUNDS --json"
timeout 300 "$DIR/flow-matching" bench --device cuda --python python3 \
    --script "$DIR/pytorch_reference.py" --rounds "$ROUNDS" --json \
    > "$OUT/bench_cuda.jsonl" 2> "$OUT/bench_cuda.err"
rc=$?
cat "$OUT/bench_cuda.jsonl" "$OUT/bench_cuda.err"
if [ "$rc" != 0 ]; then
    echo "BENCH FAILED (exit $rc); ours alone (no PyTorch column):"
    status=1
    timeout 120 "$DIR/flow-matching" bench --device cuda --python /nonexistent \
        --rounds "$ROUNDS" --json > "$OUT/bench_cuda.jsonl" 2>> "$OUT/bench_cuda.err"
    cat "$OUT/bench_cuda.jsonl"
fi
python3 - "$OUT/bench_cuda.jsonl" <<'EOF' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
for r in rows:
    if r.get("header"):
        print("GPU:", r.get("gpu"), "| host CPU:", r.get("cpu"))
print(f"{'figure':<14} {'ours':>10} {'pytorch':>10} {'ratio':>7}  unit")
for r in rows:
    if "figure" in r:
        p = r["pytorch"]
        print(f"{r['figure']:<14} {r['ours']:>10.3f} {p if p is None else round(p, 3)!s:>10} "
              f"{(r['ratio'] or 0):>6.2f}x  {r['unit']}")
EOF
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
echo "== $(date -u +%FT%TZ) done, status $status"
exit $status
