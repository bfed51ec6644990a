#!/usr/bin/env bash
# Scores `flow-matching train` with its defaults on a validation source this project did not
# write (scripts/validation/README.md): logged poses -> the seed's actions (traj-to-actions,
# each channel scaled by its standard deviation over the training set), train, sample 6
# futures per held-out scene, minADE_6 against constant velocity and, where the source has
# one, the oracle (6 fresh true futures per scene).
#
#   scripts/validation/evaluate.sh SRC_DIR WORK_DIR [extra train flags...]
#
# SRC_DIR holds train/ and test/ with hist_xyz, hist_yaw, fut_xyz, fut_yaw and cond .npy files
# (and test/oracle_fut_xyz.npy, oracle_fut_yaw.npy when there is an oracle). FM names the
# binary (default target/release/flow-matching), PY a Python with numpy.
set -euo pipefail
src=$1
work=$2
shift 2
fm=${FM:-target/release/flow-matching}
py=${PY:-python3}
mkdir -p "$work"

# Raw units first (scale 1), to read each channel's spread off the training set.
"$fm" traj-to-actions --hist-xyz "$src/train/hist_xyz.npy" --hist-rot "$src/train/hist_yaw.npy" \
  --fut-xyz "$src/train/fut_xyz.npy" --fut-rot "$src/train/fut_yaw.npy" \
  --accel-std 1 --curv-std 1 --out "$work/raw.npy"
read -r accel_std curv_std < <("$py" -c "
import numpy as np
a = np.load('$work/raw.npy')
print(f'{a[..., 0].std():.6g} {a[..., 1].std():.6g}')")
echo "action scales from the training set: accel-std $accel_std, curv-std $curv_std"
scales=(--accel-std "$accel_std" --curv-std "$curv_std")

for part in train test; do
  "$fm" traj-to-actions --hist-xyz "$src/$part/hist_xyz.npy" --hist-rot "$src/$part/hist_yaw.npy" \
    --fut-xyz "$src/$part/fut_xyz.npy" --fut-rot "$src/$part/fut_yaw.npy" \
    "${scales[@]}" --out "$work/${part}_x.npy" --v0-out "$work/${part}_v0.npy"
done
"$py" -c "
import numpy as np
for p in ('train', 'test'):
    c = np.load('$src/' + p + '/cond.npy').astype(np.float32)
    np.save('$work/' + p + '_c.npy', c)
x = np.load('$work/test_x.npy')
# Constant velocity: zero acceleration and curvature (in the scaled units, mean 0), 6 copies.
np.save('$work/cv.npy', np.zeros((x.shape[0] * 6,) + x.shape[1:], np.float32))"

oracle=()
if [ -f "$src/test/oracle_fut_xyz.npy" ]; then
  # The oracle's futures start from the same histories: each test history 6 times.
  "$py" -c "
import numpy as np
for n in ('hist_xyz', 'hist_yaw'):
    np.save('$work/oracle_' + n + '.npy', np.repeat(np.load('$src/test/' + n + '.npy'), 6, axis=0))"
  "$fm" traj-to-actions --hist-xyz "$work/oracle_hist_xyz.npy" --hist-rot "$work/oracle_hist_yaw.npy" \
    --fut-xyz "$src/test/oracle_fut_xyz.npy" --fut-rot "$src/test/oracle_fut_yaw.npy" \
    "${scales[@]}" --out "$work/oracle.npy"
  oracle=(--samples "$work/oracle.npy")
fi

start=$(date +%s.%N)
"$fm" train --data "$work/train_x.npy" --cond "$work/train_c.npy" --out "$work/model.safetensors" "$@"
end=$(date +%s.%N)
echo "train wall time: $(echo "$end - $start" | bc) s"
"$fm" sample --model "$work/model.safetensors" --cond "$work/test_c.npy" --per-cond 6 --out "$work/samples.npy"
"$fm" eval-traj --samples "$work/samples.npy" --samples "$work/cv.npy" "${oracle[@]}" \
  --truth "$work/test_x.npy" --v0 "$work/test_v0.npy" "${scales[@]}"
