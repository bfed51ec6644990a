"""Builds the ONNX test fixtures and the results PyTorch gets with them.

Run from the repository root:  /work/venv/bin/python tests/data/onnx/make_fixtures.py
(needs torch, onnx, numpy; onnxruntime optional, to cross-check the exports).

Writes into tests/data/onnx/:
- mlp.onnx         x [B, 3], t [B]: an MLP with GELU and LayerNorm, dynamic batch.
- traj.onnx        x [B, 64, 2], t [B, 1, 1], ctx [B, 4, 8]: a tiny waypoint transformer with
                   self- and cross-attention, dynamic batch.
- traj_fixed2.onnx the same network exported with a fixed batch of 2.
- pointwise.onnx   x [B, N, 2], t [B, 1, 1] with N symbolic too (needs explicit x_dims).
- bernoulli.onnx   a graph with an operator tract does not implement (Bernoulli).
- *.npy            initial noise, conditions and the solvers' results in float32.

The solvers mirror the crate's: times on torch.linspace(0, 1, T + 1) in float32 (or an explicit
grid), dt = float32(t1) - float32(t0), x + dt * v with no fused multiply-add.
"""

import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import nets  # noqa: E402


def save(name, arr):
    np.save(os.path.join(HERE, name), np.ascontiguousarray(arr, dtype=np.float32))


def time_like(t, x, per_row_shape):
    """A time per row in the network's declared layout ([B] or [B, 1, 1])."""
    return torch.full(per_row_shape(x.shape[0]), float(t), dtype=torch.float32)


def integrate(field, x, grid, method):
    """Fixed-step integration along `grid` (python floats, already rounded to float32)."""
    x = x.clone()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = float(np.float32(t1) - np.float32(t0))
        if method == "euler":
            x = x + dt * field(x, t0)
        elif method == "midpoint":
            k1 = field(x, t0)
            k2 = field(x + (0.5 * dt) * k1, t0 + 0.5 * dt)
            x = x + dt * k2
        elif method == "heun":
            k1 = field(x, t0)
            k2 = field(x + dt * k1, t1)
            x = x + (0.5 * dt) * (k1 + k2)
        elif method == "rk4":
            h = 0.5 * dt
            k1 = field(x, t0)
            k2 = field(x + h * k1, t0 + h)
            k3 = field(x + h * k2, t0 + h)
            k4 = field(x + dt * k3, t1)
            x = x + (dt / 6.0) * ((k1 + k4) + 2.0 * (k2 + k3))
        else:
            raise ValueError(method)
    return x


def uniform(steps):
    return [float(v) for v in torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)]


def cosine(steps):
    u = np.array(uniform(steps), dtype=np.float64)
    return [float(np.float32(0.5 * (1.0 - np.cos(np.pi * v)))) for v in u]


CUSTOM = [0.0, 0.1, 0.3, 0.6, 1.0]


def check_ort(path, feeds, want):
    """Cross-checks an export against onnxruntime when it is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    err = np.abs(got - want.numpy()).max()
    assert err < 1e-4, f"{path}: onnxruntime differs from PyTorch by {err}"


@torch.no_grad()
def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    # --- the MLP: x [B, 3], t [B] ---
    mlp = nets.Mlp(dim=3, width=32, depth=2, freqs=8).eval()
    x0 = torch.randn(5, 3, generator=gen)
    path = os.path.join(HERE, "mlp.onnx")
    nets.export(mlp, (x0, torch.zeros(5)), path, ["x", "t"])
    check_ort(path, {"x": x0, "t": torch.full((5,), 0.3)}, mlp(x0, torch.full((5,), 0.3)))
    save("mlp_x0.npy", x0)

    def mlp_field(x, t):
        return mlp(x, time_like(t, x, lambda b: (b,)))

    save("mlp_euler10.npy", integrate(mlp_field, x0, uniform(10), "euler"))
    save("mlp_midpoint8.npy", integrate(mlp_field, x0, uniform(8), "midpoint"))
    save("mlp_heun8.npy", integrate(mlp_field, x0, uniform(8), "heun"))
    save("mlp_rk4_5.npy", integrate(mlp_field, x0, uniform(5), "rk4"))
    save("mlp_rk4_64.npy", integrate(mlp_field, x0, uniform(64), "rk4"))
    save("mlp_euler_cosine6.npy", integrate(mlp_field, x0, cosine(6), "euler"))
    save("mlp_euler_custom.npy", integrate(mlp_field, x0, CUSTOM, "euler"))
    # encode: data at t = 1 back to t = 0 along the reversed uniform grid
    save("mlp_encode_euler10.npy", integrate(mlp_field, x0, uniform(10)[::-1], "euler"))

    # --- the waypoint transformer: x [B, 64, 2], t [B, 1, 1], ctx [B, 4, 8] ---
    traj = nets.WaypointTransformer(width=16, blocks=2, heads=2, ctx_dim=8, freqs=4).eval()
    xt = torch.randn(4, 64, 2, generator=gen)
    ctx = torch.randn(4, 4, 8, generator=gen)
    null = torch.zeros(1, 4, 8)
    path = os.path.join(HERE, "traj.onnx")
    nets.export(traj, (xt, torch.zeros(4, 1, 1), ctx), path, ["x", "t", "ctx"])
    tt = torch.full((4, 1, 1), 0.7)
    check_ort(path, {"x": xt, "t": tt, "ctx": ctx}, traj(xt, tt, ctx))
    fixed = os.path.join(HERE, "traj_fixed2.onnx")
    nets.export(traj, (xt[:2], torch.zeros(2, 1, 1), ctx[:2]), fixed, ["x", "t", "ctx"], dynamic=False)
    save("traj_x0.npy", xt)
    save("traj_ctx.npy", ctx)
    save("traj_null.npy", null)

    def traj_field(c):
        def f(x, t):
            return traj(x, time_like(t, x, lambda b: (b, 1, 1)), c.expand(x.shape[0], -1, -1))

        return f

    save("traj_euler10.npy", integrate(traj_field(ctx), xt, uniform(10), "euler"))
    save("traj_rk4_4.npy", integrate(traj_field(ctx), xt, uniform(4), "rk4"))
    # one context row broadcast to every sample
    save("traj_euler10_ctx0.npy", integrate(traj_field(ctx[:1]), xt, uniform(10), "euler"))

    # classifier-free guidance against the zero context, w = 2.5
    def guided(x, t):
        vc = traj_field(ctx)(x, t)
        vu = traj_field(null)(x, t)
        return vu + 2.5 * (vc - vu)

    save("traj_guided_euler10.npy", integrate(guided, xt, uniform(10), "euler"))

    # --- a per-token net whose token count is symbolic too ---
    pw = nets.Pointwise(channels=2, width=16, freqs=4).eval()
    xp = torch.randn(3, 5, 2, generator=gen)
    path = os.path.join(HERE, "pointwise.onnx")
    torch.onnx.export(
        pw,
        (xp, torch.zeros(3, 1, 1)),
        path,
        input_names=["x", "t"],
        output_names=["v"],
        dynamic_axes={"x": {0: "batch", 1: "tokens"}, "t": {0: "batch"}, "v": {0: "batch", 1: "tokens"}},
        opset_version=17,
        dynamo=False,
    )
    save("pointwise_x0.npy", xp)
    save(
        "pointwise_euler10.npy",
        integrate(lambda x, t: pw(x, time_like(t, x, lambda b: (b, 1, 1))), xp, uniform(10), "euler"),
    )

    # --- an operator tract lacks ---
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [
            helper.make_node("Sigmoid", ["x"], ["p"], name="gate"),
            helper.make_node("Bernoulli", ["p"], ["m"], name="dropout_mask"),
            helper.make_node("Mul", ["m", "x"], ["v"], name="apply"),
        ],
        "bernoulli",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"]),
        ],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", 2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(HERE, "bernoulli.onnx"))


if __name__ == "__main__":
    main()
