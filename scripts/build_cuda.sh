#!/usr/bin/env bash
# Builds the `--features cuda` command line and CUDA test binaries on a machine with no GPU and
# no system CUDA, for scripts/gpu_check.sh to run on a GPU machine with no Rust toolchain.
#
# The toolkit comes from NVIDIA's PyPI wheels, CUDA 13.0 to match a 580 driver (PTX from a
# newer nvcc would not load there): in a venv,
#   pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
#       nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
#       nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
# CUDA_ROOT (below) is then a folder with bin, include and nvvm linked to the wheels'
# nvidia/cu13 ones, lib64 holding each library's soname link plus an unversioned libX.so link
# for the linker, and lib64/stubs/libcuda.so: a stub (soname libcuda.so.1) defining every
# driver function cudarc declares, since the driver itself is only on the GPU machine.
#
#   CUDA_ROOT=/work/cuda-root scripts/build_cuda.sh [DEST]     # DEST defaults to .gpu
set -euo pipefail
: "${CUDA_ROOT:?set CUDA_ROOT to the toolkit folder described above}"
DEST=${1:-.gpu}
export CUDA_HOME=$CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
export LD_LIBRARY_PATH=$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs

cargo build --release --features cuda -p flow-matching-cli
# Both packages selected, so the library is built once, with the command line's features.
log=$(cargo test --release -p flow-matching -p flow-matching-cli --features flow-matching-cli/cuda \
    --test cuda --test core --no-run 2>&1)
echo "$log"
exe() { echo "$log" | sed -n "s|.*Executable tests/$1.rs (\(.*\))|\1|p" | tail -1; }
mkdir -p "$DEST"
strip -o "$DEST/flow-matching" "$CARGO_TARGET_DIR/release/flow-matching"
strip -o "$DEST/cuda-tests" "$(exe cuda)"
strip -o "$DEST/core-tests" "$(exe core)"
cp bench/pytorch_reference.py scripts/gpu_check.sh "$DEST/"
# One xz stream with a dictionary larger than a binary stores the shared bytes once.
(cd "$DEST" && tar cf - flow-matching cuda-tests core-tests |
    xz -T2 -9 --lzma2=dict=192MiB >binaries.tar.xz && rm flow-matching cuda-tests core-tests)
ls -la "$DEST"
