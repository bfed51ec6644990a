#!/usr/bin/env python3
"""PyTorch eager reference for `flow-matching bench`.

Loads a velocity-mlp file (shared/spec/velocity-mlp.md) with the `safetensors` package into a
torch module that follows the spec, and times the same figures as the Rust side with
torch.set_num_threads(2). Prints one JSON object a line: {"figure": ..., "value": ...}.

    python3 bench/pytorch_reference.py --model m.safetensors [--cond-model c.safetensors]
        [--reps-scale 1] [--install]
    python3 bench/pytorch_reference.py --model m.safetensors --peak-rss   # one batch-4096 sample
    python3 bench/pytorch_reference.py --model m.safetensors --device cuda
        # sample_b1, sample_b64, sample_b4096 and train_b4096 on GPU 0, synchronised per call

`--install` runs `pip install torch safetensors numpy` first (never in CI).
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cond-model", help="a conditional velocity-mlp for sample_cfg_b1")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--install", action="store_true")
    p.add_argument("--peak-rss", action="store_true")
    p.add_argument("--reps-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (GPU figures only)")
    return p.parse_args()


def build(path, torch):
    from safetensors import safe_open

    nn = torch.nn
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    x_dims = [int(v) for v in meta["x_dims"].split(",")]
    hidden, depth = int(meta["hidden"]), int(meta["depth"])
    num_classes = int(meta["num_classes"])

    class VelocityMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_dims = x_dims
            self.register_buffer("freqs", t["time_embed.freqs"].clone())
            d = math.prod(x_dims)
            f = self.freqs.numel()
            k = t["cond_embed.weight"].shape[1] if num_classes > 0 else 0
            self.cond_embed = nn.Embedding(num_classes + 1, k) if num_classes > 0 else None
            layers = []
            width = d + 2 * f + k
            for i in range(depth):
                layers += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            layers.append(nn.Linear(width, d))
            self.net = nn.Sequential(*layers)

        def forward(self, x, t_, c=None):
            b = x.shape[0]
            a = ((2 * math.pi) * t_.reshape(b, 1)) * self.freqs
            parts = [x.reshape(b, -1), torch.sin(a), torch.cos(a)]
            if self.cond_embed is not None:
                if c is None:
                    c = torch.full((b,), num_classes, dtype=torch.long, device=x.device)
                parts.append(self.cond_embed(c))
            return self.net(torch.cat(parts, 1)).reshape(x.shape)

    m = VelocityMlp()
    state = {k: v for k, v in t.items() if k != "time_embed.freqs"}
    m.load_state_dict({**state, "freqs": t["time_embed.freqs"]}, strict=False)
    for i in range(depth + 1):
        assert torch.equal(m.net[2 * i].weight, t[f"net.{2 * i}.weight"])
    return m, x_dims, num_classes


def sample(model, x0, steps, torch):
    ts = torch.linspace(0, 1, steps + 1, device=x0.device)
    x = x0
    b = x.shape[0]
    with torch.inference_mode():
        for i in range(steps):
            v = model(x, ts[i].expand(b))
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def sample_rk4(model, x0, steps, torch):
    """Classical RK4 on the uniform grid, 4 evaluations a step."""
    ts = torch.linspace(0, 1, steps + 1)
    x = x0
    b = x.shape[0]
    with torch.inference_mode():
        for i in range(steps):
            t0, dt = ts[i], ts[i + 1] - ts[i]
            k1 = model(x, t0.expand(b))
            k2 = model(x + 0.5 * dt * k1, (t0 + 0.5 * dt).expand(b))
            k3 = model(x + 0.5 * dt * k2, (t0 + 0.5 * dt).expand(b))
            k4 = model(x + dt * k3, ts[i + 1].expand(b))
            x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def sample_cfg(model, x0, labels, null, weight, steps, torch):
    """Euler with classifier-free guidance: one 2B-row evaluation a step (rows, then null rows)."""
    ts = torch.linspace(0, 1, steps + 1)
    x = x0
    b = x.shape[0]
    c2 = torch.cat([labels, torch.full((b,), null, dtype=torch.long)])
    with torch.inference_mode():
        for i in range(steps):
            v2 = model(torch.cat([x, x]), ts[i].expand(2 * b), c2)
            vc, vu = v2[:b], v2[b:]
            v = vu + weight * (vc - vu)
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def median_ms(fn, reps, sync=None):
    """The median wall time of `reps` calls after one warm-up; `sync` (on a GPU,
    torch.cuda.synchronize) ends each call, so queued kernels are counted."""
    def call():
        fn()
        if sync is not None:
            sync()

    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main_gpu(args, torch):
    """The GPU figures: the same work as on the CPU, every tensor on args.device."""
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    model, x_dims, _ = build(args.model, torch)
    model = model.to(dev)
    g = torch.Generator().manual_seed(0)
    out = []
    for batch, reps in ((1, 200), (64, 50), (4096, 5)):
        x0 = torch.randn(batch, *x_dims, generator=g).to(dev)
        reps = max(1, int(reps * args.reps_scale))
        ms = median_ms(lambda: sample(model, x0, args.steps, torch), reps, sync)
        out.append({"figure": f"sample_b{batch}", "value": ms})
    b = 4096
    x = torch.randn(b, *x_dims, generator=g)
    noise = torch.randn(b, *x_dims, generator=g)
    tt = torch.rand(b, generator=g)
    tb = tt.reshape(b, *([1] * len(x_dims)))
    noisy = (tb * x + (1 - tb) * noise).to(dev)
    target = (x - noise).to(dev)
    tt = tt.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(noisy, tt) - target) ** 2).mean()
        loss.backward()
        opt.step()

    ms = median_ms(step, max(1, int(10 * args.reps_scale)), sync)
    out.append({"figure": "train_b4096", "value": 1e3 / ms})
    for o in out:
        print(json.dumps(o), flush=True)


def main():
    args = parse()
    if args.install:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "torch", "safetensors", "numpy"])
    import torch

    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        main_gpu(args, torch)
        return
    model, x_dims, _ = build(args.model, torch)
    g = torch.Generator().manual_seed(0)
    if args.peak_rss:
        x0 = torch.randn(4096, *x_dims, generator=g)
        sample(model, x0, args.steps, torch)
        print(json.dumps({"figure": "peak_rss_b4096", "value": vm_hwm_mib()}))
        return
    out = []
    for batch, reps in ((1, 200), (64, 50), (4096, 5)):
        x0 = torch.randn(batch, *x_dims, generator=g)
        reps = max(1, int(reps * args.reps_scale))
        ms = median_ms(lambda: sample(model, x0, args.steps, torch), reps)
        out.append({"figure": f"sample_b{batch}", "value": ms})
        if batch == 1:
            reps1 = max(1, int(100 * args.reps_scale))
            ms = median_ms(lambda: sample_rk4(model, x0, args.steps, torch), reps1)
            out.append({"figure": "sample_rk4_b1", "value": ms})
            if args.cond_model:
                cmodel, _, ncls = build(args.cond_model, torch)
                lab = torch.zeros(1, dtype=torch.long)
                run = lambda: sample_cfg(cmodel, x0, lab, ncls, args.guidance, args.steps, torch)
                out.append({"figure": "sample_cfg_b1", "value": median_ms(run, reps)})
    # Training: batch 4096, AdamW, the loss mean((v - target)^2).
    b = 4096
    x = torch.randn(b, *x_dims, generator=g)
    noise = torch.randn(b, *x_dims, generator=g)
    tt = torch.rand(b, generator=g)
    tb = tt.reshape(b, *([1] * len(x_dims)))
    noisy = tb * x + (1 - tb) * noise
    target = x - noise
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(noisy, tt) - target) ** 2).mean()
        loss.backward()
        opt.step()

    ms = median_ms(step, max(1, int(10 * args.reps_scale)))
    out.append({"figure": "train_b4096", "value": 1e3 / ms})
    # gemm_b4096: the hidden layer's product at the training batch, into a kept output.
    a = torch.randn(b, 256, generator=g)
    w = torch.randn(256, 256, generator=g)
    y = torch.empty(b, 256)
    ms = median_ms(lambda: torch.matmul(a, w, out=y), max(1, int(20 * args.reps_scale)))
    out.append({"figure": "gemm_b4096", "value": 2 * b * 256 * 256 / (ms * 1e6)})
    for o in out:
        print(json.dumps(o), flush=True)


if __name__ == "__main__":
    main()
