"""PyTorch reference of the `waypoint-transformer` model file (docs/waypoint-transformer.md).

The Rust crate and this module read and write the same safetensors file, so a model trained on
one side samples identically on the other. Usage:

    python python/waypoint_transformer.py check MODEL.safetensors   # load, print the config, run
    python python/waypoint_transformer.py golden OUT_DIR            # write a golden case
    python python/waypoint_transformer.py sample MODEL --cond C.npy --per-cond K --out X.npy
    python python/waypoint_transformer.py bench MODEL --batch 6 --steps 10 --reps 20
    python python/waypoint_transformer.py train-bench MODEL --batch 256 --reps 10

Only torch, numpy and safetensors are needed.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file, save_file
from safetensors import safe_open

FORMAT = "waypoint-transformer"
VERSION = "1"
TWO_PI = float(np.float32(2.0 * math.pi))
SQRT2 = float(np.float32(math.sqrt(2.0)))
LN_EPS = 1e-6


def fourier(v, freqs):
    """[..., 1 + 2F]: the value, then sqrt(2) sin and cos of ((2 pi) v) f."""
    a = ((TWO_PI * v).unsqueeze(-1)) * freqs
    return torch.cat([v.unsqueeze(-1), torch.sin(a) * SQRT2, torch.cos(a) * SQRT2], dim=-1)


def layer_norm(h):
    """LayerNorm over the last axis, no affine (eps 1e-6)."""
    return nn.functional.layer_norm(h, (h.shape[-1],), eps=LN_EPS)


class Block(nn.Module):
    """Pre-LN self-attention block with adaptive layer-norm modulation (AdaLN-zero)."""

    def __init__(self, width, heads, mlp_hidden):
        super().__init__()
        self.heads = heads
        self.ada = nn.Linear(width, 6 * width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.SiLU(), nn.Linear(mlp_hidden, width))

    def forward(self, h, s):
        b, l, w = h.shape
        m = self.ada(nn.functional.silu(s)).unsqueeze(1)  # [B, 1, 6W]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=-1)
        a = layer_norm(h) * (1 + scale1) + shift1
        q, k, v = self.qkv(a).chunk(3, dim=-1)
        dh = w // self.heads
        q = q.reshape(b, l, self.heads, dh).transpose(1, 2)
        k = k.reshape(b, l, self.heads, dh).transpose(1, 2)
        v = v.reshape(b, l, self.heads, dh).transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, l, w)
        h = h + gate1 * self.proj(o)
        a = layer_norm(h) * (1 + scale2) + shift2
        return h + gate2 * self.mlp(a)


class CondNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))


class WaypointTransformer(nn.Module):
    """v(x, t [, c]) for x [B, L, C]: one token per waypoint."""

    def __init__(self, x_dims, width=64, depth=3, heads=4, mlp_hidden=128, num_freqs=10, cond_dims=None):
        super().__init__()
        assert len(x_dims) == 2, "x_dims must be [L, C]"
        self.x_dims = list(x_dims)
        self.width, self.depth, self.heads, self.mlp_hidden = width, depth, heads, mlp_hidden
        self.cond_dims = list(cond_dims) if cond_dims else None
        length, chans = x_dims
        f = num_freqs
        # Time in [0, 1]: 1 to 100 cycles (the seed's). Values (normalised, ~N(0, 1)): 0.1 to 10
        # cycles per unit, so the field stays smooth in x (at 100 cycles a unit step in a
        # feature's weight moves v by ~900 per unit of x, and Euler amplifies it).
        self.register_buffer("freqs", torch.logspace(0, 2, f))
        self.register_buffer("value_freqs", torch.logspace(-1, 1, f))
        per = 1 + 2 * f
        self.token_embed = nn.Sequential(nn.Linear((chans + 1) * per, width), nn.SiLU(), nn.Linear(width, width))
        self.pos_embed = nn.Parameter(torch.randn(length, width) * 0.02)
        self.time_embed = nn.Sequential(nn.Linear(per, width), nn.SiLU(), nn.Linear(width, width))
        if self.cond_dims:
            cn = int(np.prod(self.cond_dims))
            self.cond_norm = CondNorm(cn)
            self.cond_embed = nn.Sequential(nn.Linear(cn, width), nn.SiLU(), nn.Linear(width, width))
            self.cond_null = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_hidden) for _ in range(depth)])
        self.final_ada = nn.Linear(width, 2 * width)
        self.final_out = nn.Linear(width, chans)

    def forward(self, x, t, c=None, keep=None):
        """x [B, L, C]; t with B elements; c [B, *cond_dims] or None (the null condition);
        keep [B] (1 = use c, 0 = null) or None."""
        b, length, chans = x.shape
        t = t.reshape(b).to(x.dtype)
        ft = fourier(t, self.freqs)  # [B, P]
        fx = fourier(x, self.value_freqs).reshape(b, length, chans * ft.shape[-1])
        tok = torch.cat([fx, ft.unsqueeze(1).expand(b, length, ft.shape[-1])], dim=-1)
        h = self.token_embed(tok) + self.pos_embed
        s = self.time_embed(ft)
        if self.cond_dims:
            if c is None:
                k = self.cond_null.expand(b, self.width)
            else:
                cn = (c.reshape(b, -1) - self.cond_norm.mean) / self.cond_norm.std
                k = self.cond_embed(cn)
                if keep is not None:
                    kp = keep.reshape(b, 1).to(k.dtype)
                    k = k * kp + (1 - kp) * self.cond_null
            s = s + k
        elif c is not None:
            raise ValueError("this model takes no condition")
        for blk in self.blocks:
            h = blk(h, s)
        shift, scale = self.final_ada(nn.functional.silu(s)).unsqueeze(1).chunk(2, dim=-1)
        h = layer_norm(h) * (1 + scale) + shift
        return self.final_out(h)

    def metadata(self):
        m = {
            "format": FORMAT,
            "version": VERSION,
            "x_dims": ",".join(str(d) for d in self.x_dims),
            "width": str(self.width),
            "depth": str(self.depth),
            "heads": str(self.heads),
            "mlp_hidden": str(self.mlp_hidden),
        }
        if self.cond_dims:
            m["cond_dims"] = ",".join(str(d) for d in self.cond_dims)
        return m

    def save(self, path):
        sd = {k: v.detach().contiguous().float() for k, v in self.state_dict().items()}
        save_file(sd, path, metadata=self.metadata())

    @staticmethod
    def load(path):
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                             f"expected {FORMAT!r} {VERSION!r}")
        sd = load_file(path)
        dims = lambda s: [int(v) for v in s.split(",")] if s else None
        model = WaypointTransformer(
            dims(meta["x_dims"]), int(meta["width"]), int(meta["depth"]), int(meta["heads"]),
            int(meta["mlp_hidden"]), sd["freqs"].shape[0], dims(meta.get("cond_dims", "")))
        # Extra keys (EMA copies, optimiser state of a training checkpoint) are ignored.
        own = model.state_dict()
        for k, v in own.items():
            if k not in sd:
                raise ValueError(f"{path}: missing tensor {k!r} (expected shape {list(v.shape)})")
            if list(sd[k].shape) != list(v.shape):
                raise ValueError(f"{path}: tensor {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
        model.load_state_dict({k: sd[k] for k in own}, strict=True)
        return model


@torch.no_grad()
def euler(model, x, steps, c=None, guidance=None):
    """Euler from t = 0 to 1 on torch.linspace(0, 1, steps + 1); returns every state."""
    ts = torch.linspace(0, 1, steps + 1)
    states = [x]
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        if guidance is None or c is None:
            v = model(x, t, c)
        else:
            vc, vu = model(x, t, c), model(x, t, None)
            v = vu + guidance * (vc - vu)
        x = x + (ts[i + 1] - ts[i]) * v
        states.append(x)
    return torch.stack(states, 1), ts


def golden(out_dir, seed=0):
    """A small conditional model, inputs and PyTorch's outputs for the Rust golden tests."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    model = WaypointTransformer([16, 2], width=32, depth=2, heads=4, mlp_hidden=64, num_freqs=6, cond_dims=[5])
    # Non-zero everywhere (a trained model's AdaLN layers are not zero), scaled like a trained
    # layer (std ~ 1/sqrt(fan_in)) so that the Euler map stays well-conditioned: larger random
    # weights amplify float32 rounding by ~10x per step and no two implementations agree.
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[1] if p.dim() == 2 else 16
            p.copy_(torch.randn_like(p) * (0.4 / math.sqrt(fan_in)))
        model.cond_norm.mean.copy_(torch.randn(5))
        model.cond_norm.std.copy_(torch.rand(5) + 0.5)
    model.save(os.path.join(out_dir, "model.safetensors"))
    b, steps = 6, 4
    x = torch.randn(b, 16, 2)
    t = torch.rand(b)
    c = torch.randn(b, 5) * 2
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        v = model(x, t, c, keep)
        v_null = model(x, t, None)
    x0 = torch.randn(b, 16, 2)
    traj, ts = euler(model, x0, steps, c)
    # Conditioning check: how far does a 1e-5 change of the noise move the result?
    moved, _ = euler(model, x0 + 1e-5 * torch.randn_like(x0), steps, c)
    gain = ((moved[:, -1] - traj[:, -1]).abs().max() / 1e-5).item()
    print(f"sensitivity of the final state to the noise: {gain:.2f}")
    save = lambda n, a: np.save(os.path.join(out_dir, n), a.detach().numpy().astype(np.float32))
    save("x.npy", x)
    save("t.npy", t)
    save("cond.npy", c)
    save("keep.npy", keep)
    save("expected_v.npy", v)
    save("expected_v_null.npy", v_null)
    save("x_init.npy", x0)
    save("expected_traj.npy", traj)
    save("expected_final.npy", traj[:, -1])
    save("expected_times.npy", ts)
    case = {"x_dims": [16, 2], "batch": b, "steps": steps, "method": "euler",
            "model": FORMAT, "cond_dims": [5], "torch": torch.__version__,
            "tolerance": {"abs": 1e-5, "rel": 1e-4}}
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(case, f, indent=2)


def check(path, x_init=None, cond=None, expected=None, steps=10):
    """Loads a file (e.g. written by Rust) and, given inputs, compares Euler samples."""
    model = WaypointTransformer.load(path)
    print(json.dumps(model.metadata()))
    if x_init is None:
        return 0
    x0 = torch.from_numpy(np.load(x_init))
    c = torch.from_numpy(np.load(cond)) if cond else None
    traj, _ = euler(model, x0, steps, c)
    if expected:
        want = torch.from_numpy(np.load(expected))
        err = (traj[:, -1] - want).abs().max().item()
        ok = torch.allclose(traj[:, -1], want, atol=1e-4, rtol=1e-3)
        print(f"max |torch - expected| = {err:.3g}: {'ok' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    return 0


def bench(path, batch, steps, reps, threads):
    torch.set_num_threads(threads)
    model = WaypointTransformer.load(path).eval()
    l, ch = model.x_dims
    c = torch.randn(1, *model.cond_dims).expand(batch, *model.cond_dims) if model.cond_dims else None
    x0 = torch.randn(batch, l, ch)
    euler(model, x0, steps, c)
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        euler(model, x0, steps, c)
        times.append(time.perf_counter() - s)
    print(json.dumps({"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times)}))


def train_bench(path, batch, reps, threads, drop=0.1):
    """Median time of one training step (loss, backward, AdamW) at `batch` samples, PyTorch
    eager: the crate's `train_traj_b256` figure. The condition (when the model has one) is a
    random feature row per sample, a `drop` share of rows replaced by the null condition."""
    torch.set_num_threads(threads)
    model = WaypointTransformer.load(path).train()
    length, ch = model.x_dims
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, ch, generator=g)
    noise = torch.randn(batch, length, ch, generator=g)
    t = torch.rand(batch, generator=g)
    tb = t.reshape(batch, 1, 1)
    noisy = tb * x + (1 - tb) * noise
    target = x - noise
    c = keep = None
    if model.cond_dims:
        c = torch.randn(batch, *model.cond_dims, generator=g)
        keep = (torch.rand(batch, generator=g) >= drop).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(noisy, t, c, keep) - target) ** 2).mean()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        step()
        times.append(time.perf_counter() - s)
    print(json.dumps({"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times)}))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("golden")
    g.add_argument("out_dir")
    c = sub.add_parser("check")
    c.add_argument("model")
    c.add_argument("--x-init")
    c.add_argument("--cond")
    c.add_argument("--expected")
    c.add_argument("--steps", type=int, default=10)
    b = sub.add_parser("bench")
    b.add_argument("model")
    b.add_argument("--batch", type=int, default=6)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--reps", type=int, default=20)
    b.add_argument("--threads", type=int, default=2)
    tb = sub.add_parser("train-bench")
    tb.add_argument("model")
    tb.add_argument("--batch", type=int, default=256)
    tb.add_argument("--reps", type=int, default=10)
    tb.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.cmd == "golden":
        golden(a.out_dir)
        return 0
    if a.cmd == "check":
        return check(a.model, a.x_init, a.cond, a.expected, a.steps)
    if a.cmd == "bench":
        bench(a.model, a.batch, a.steps, a.reps, a.threads)
        return 0
    if a.cmd == "train-bench":
        train_bench(a.model, a.batch, a.reps, a.threads)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
