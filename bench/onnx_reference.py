#!/usr/bin/env python3
"""PyTorch eager and onnxruntime references for the `onnx_traj_b6` figure of `flow-matching bench`.

The workload: the waypoint transformer of tests/data/onnx/nets.py at benchmark size (width 128,
2 blocks, 4 heads, cross-attention to 16 context tokens of 32 features), 6 trajectories for one
scene (the scene's context repeated 6 times), 10 Euler steps.

    python3 bench/onnx_reference.py --export DIR     # writes DIR/traj_bench.onnx, .pt, x0/ctx .npy
    python3 bench/onnx_reference.py --dir DIR [--reps 20] [--threads 2]

The second form times PyTorch eager on the same module and onnxruntime on the same file, and
prints one JSON object a line: {"figure": ..., "value": milliseconds}.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "onnx"))
import nets  # noqa: E402

BATCH, STEPS, WIDTH, BLOCKS, HEADS, CTX_TOKENS, CTX_DIM = 6, 10, 128, 2, 4, 16, 32


def build():
    torch.manual_seed(0)
    return nets.WaypointTransformer(width=WIDTH, blocks=BLOCKS, heads=HEADS, ctx_dim=CTX_DIM).eval()


def export(d):
    os.makedirs(d, exist_ok=True)
    m = build()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(BATCH, 64, 2, generator=g)
    ctx = torch.randn(1, CTX_TOKENS, CTX_DIM, generator=g)
    with torch.no_grad():
        nets.export(m, (x0, torch.zeros(BATCH, 1, 1), ctx.expand(BATCH, -1, -1).contiguous()),
                    os.path.join(d, "traj_bench.onnx"), ["x", "t", "ctx"])
    torch.save(m.state_dict(), os.path.join(d, "traj_bench.pt"))
    np.save(os.path.join(d, "x0.npy"), x0.numpy())
    np.save(os.path.join(d, "ctx.npy"), ctx.numpy())


def euler(field, x):
    ts = torch.linspace(0.0, 1.0, STEPS + 1, dtype=torch.float32)
    for i in range(STEPS):
        dt = float(ts[i + 1] - ts[i])
        x = x + dt * field(x, float(ts[i]))
    return x


def median_ms(reps, f):
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--export")
    p.add_argument("--dir")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.export:
        export(a.export)
        return
    torch.set_num_threads(a.threads)
    m = build()
    m.load_state_dict(torch.load(os.path.join(a.dir, "traj_bench.pt")))
    x0 = torch.from_numpy(np.load(os.path.join(a.dir, "x0.npy")))
    ctx1 = torch.from_numpy(np.load(os.path.join(a.dir, "ctx.npy")))

    @torch.no_grad()
    def torch_run():
        ctx = ctx1.expand(BATCH, -1, -1)
        return euler(lambda x, t: m(x, torch.full((BATCH, 1, 1), t), ctx), x0)

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(a.dir, "traj_bench.onnx"), so, providers=["CPUExecutionProvider"])
    ctx_np = np.ascontiguousarray(np.broadcast_to(ctx1.numpy(), (BATCH, CTX_TOKENS, CTX_DIM)))

    def ort_run():
        def field(x, t):
            tt = np.full((BATCH, 1, 1), t, dtype=np.float32)
            return torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": tt, "ctx": ctx_np})[0])

        return euler(field, x0)

    ref = torch_run()
    np.save(os.path.join(a.dir, "torch_out.npy"), ref.numpy())
    diff = (ref - ort_run()).abs().max().item()
    if diff > 1e-3:
        print(f"onnxruntime and PyTorch disagree by {diff}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"figure": "onnx_traj_b6", "value": median_ms(a.reps, torch_run)}))
    print(json.dumps({"figure": "onnx_traj_b6_ort", "value": median_ms(a.reps, ort_run)}))


if __name__ == "__main__":
    main()
