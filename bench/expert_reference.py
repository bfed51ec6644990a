#!/usr/bin/env python3
"""The `expert_b6_p1024` reference: an action expert sampled by PyTorch eager and by onnxruntime.

Reads an expert directory (`config.json` + `model.safetensors`, the layout of
docs/action-experts.md), builds it from transformers' own Qwen3/Qwen2 decoder modules (embeddings
removed) with the seed's per-waypoint in-projection written from its description, and times one
call the way a control loop makes it: a fresh prefix KV cache (a new camera frame), then
`--batch` futures of `--steps` Euler steps attending non-causally to it.

The onnxruntime column runs the same network exported to ONNX with the prefix keys and values as
graph inputs (so a new cache is a new input, not a new graph); the export is checked against the
transformers model before anything is timed.

Prints one JSON object a line: {"figure": ..., "value": ms}.

    python3 bench/expert_reference.py --model DIR [--prefix 1024] [--reps 9] [--threads 2]
    python3 bench/expert_reference.py --check GOLDEN_CASE_DIR   # the golden case, 1 and 10 steps
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

# transformers 5 renames `past_key_values` to `cache` on the forward call; either works here.
warnings.simplefilter("ignore", FutureWarning)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="expert directory: config.json and model.safetensors")
    p.add_argument("--prefix", type=int, default=1024, help="prefix tokens in the cache")
    p.add_argument("--batch", type=int, default=6, help="futures per call (one scene)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps per call")
    p.add_argument("--reps", type=int, default=9, help="timed calls (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--figure", default=None, help="figure name (default expert_bB_pP)")
    p.add_argument("--no-ort", action="store_true", help="skip the onnxruntime column")
    p.add_argument("--onnx", default=None, help="where to keep the exported graph (reused)")
    p.add_argument("--check", default=None, help="a golden expert case directory to verify")
    p.add_argument(
        "--tract-onnx",
        default=None,
        help="also export the network without a Concat feeding a MatMul (tract's variant) here",
    )
    return p.parse_args()


def build(model_dir, torch):
    """The expert as torch modules: (config, in_proj, decoder, out_proj)."""
    import transformers
    from safetensors.torch import load_file

    nn = torch.nn
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    e = cfg["expert"]
    ip = cfg["action_in_proj"]
    c = cfg["action_dims"][1]
    if ip["kind"] != "alpamayo_per_waypoint_v2":
        raise SystemExit(f"in-projection {ip['kind']!r}: this reference builds alpamayo_per_waypoint_v2")

    class RMSNorm(nn.Module):
        """alpamayo's RMSNorm, written out so torch.onnx exports it at opset 17."""

        def __init__(self, n, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class PerWaypointInProj(nn.Module):
        """Fourier features of each value and of t, an MLP trunk, a LayerNorm (the seed's V2)."""

        def __init__(self):
            super().__init__()
            nf = ip["num_fourier_feats"]
            hid = ip["hidden_size"]
            self.register_buffer(
                "freqs", torch.logspace(0, math.log10(ip["max_freq"]), nf // 2), persistent=False
            )
            layers = [nn.Linear((c + 1) * nf, hid), nn.SiLU()]
            for i in range(ip["num_enc_layers"]):
                last = i + 1 == ip["num_enc_layers"]
                layers += [RMSNorm(hid, 1e-5), nn.Linear(hid, e["hidden_size"] if last else hid), nn.SiLU()]
            self.encoder = nn.Module()
            self.encoder.trunk = nn.Sequential(*layers[:-1])
            self.norm = nn.LayerNorm(e["hidden_size"])

        def fourier(self, v):
            a = v[..., None] * self.freqs * 2 * math.pi
            return torch.cat([a.sin(), a.cos()], -1) * math.sqrt(2)

        def forward(self, x, t):
            b, l, _ = x.shape
            fx = self.fourier(x).reshape(b, l, -1)
            ft = self.fourier(t)[:, None, :].expand(b, l, -1)
            return self.norm(self.encoder.trunk(torch.cat([fx, ft], -1)))

    fam = e["family"]
    keys = [
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta",
    ]
    kw = {k: e[k] for k in keys if k in e}
    kw.update(vocab_size=8, max_position_embeddings=1 << 16, attn_implementation="sdpa")
    if fam == "qwen3":
        dcfg = transformers.Qwen3Config(**kw)
        decoder = transformers.Qwen3Model(dcfg)
    elif fam == "qwen2":
        dcfg = transformers.Qwen2Config(**kw)
        decoder = transformers.Qwen2Model(dcfg)
    else:
        raise SystemExit(f"family {fam!r}: this reference builds qwen3 and qwen2")
    decoder.embed_tokens = None
    in_proj = PerWaypointInProj()
    out_proj = nn.Linear(e["hidden_size"], c)
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    take = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    in_proj.load_state_dict(take("action_in_proj."))
    missing, unexpected = decoder.load_state_dict(take("expert."), strict=False)
    if unexpected or any(not m.startswith("embed_tokens") for m in missing):
        raise SystemExit(f"decoder weights: missing {missing}, unexpected {unexpected}")
    out_proj.load_state_dict(take("action_out_proj."))
    for m in (in_proj, decoder, out_proj):
        m.eval()
    return cfg, in_proj, decoder, out_proj


def make_step(cfg, in_proj, decoder, out_proj, torch):
    """v(x, t, prefix) by transformers' decoder over a DynamicCache holding the prefix."""
    from transformers import DynamicCache

    non_causal = cfg.get("non_causal", True)

    def step(x, t, ks, vs, offset):
        b, l, _ = x.shape
        p = ks[0].shape[2]
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(ks, vs)):
            cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
        h = in_proj(x, t)
        pos = torch.arange(offset, offset + l)[None].expand(b, l)
        # An additive 4-D mask: every action token sees the whole prefix and (non-causally)
        # every action token; transformers uses a 4-D mask as given.
        mask = torch.zeros(b, 1, l, p + l)
        if not non_causal:
            mask[:, :, :, p:] = torch.triu(torch.full((l, l), float("-inf")), 1)
        out = decoder(
            inputs_embeds=h, position_ids=pos, past_key_values=cache, attention_mask=mask, use_cache=True
        )
        return out_proj(out.last_hidden_state)

    return step


def euler(step, x0, steps, ks, vs, offset, torch):
    """The seed's sampler: t from 0 (noise) to 1 on a linear grid, x += dt v."""
    x = x0.clone()
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt)
        x = x + dt * step(x, t, ks, vs, offset)
    return x


class Exportable:
    """The same expert with the prefix keys and values as explicit inputs, for torch.onnx."""

    @staticmethod
    def module(cfg, in_proj, decoder, out_proj, torch, split=False):
        """`split`: the same arithmetic with no Concat feeding a MatMul, for tract 0.23, whose
        EinSum decluttering loses the broadcast of such a Concat's expanded part ("Trying to
        substitute a 6,64,256 by 6,1,256"): the in-projection's first Linear is the values'
        part plus the time's part broadcast over the tokens, and attention takes the prefix
        and the own keys as two products under one softmax."""
        nn = torch.nn
        e = cfg["expert"]
        nh, nkv, hd = e["num_attention_heads"], e["num_key_value_heads"], e["head_dim"]
        theta = e["rope_theta"]

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.in_proj, self.decoder, self.out_proj = in_proj, decoder, out_proj

            def in_proj_split(self, x, t):
                ip = self.in_proj
                b, l, _ = x.shape
                fx = ip.fourier(x).reshape(b, l, -1)
                first = ip.encoder.trunk[0]
                kx = fx.shape[-1]
                w = first.weight
                h = fx @ w[:, :kx].T + (ip.fourier(t) @ w[:, kx:].T + first.bias)[:, None, :]
                for m in list(ip.encoder.trunk)[1:]:
                    h = m(h)
                return ip.norm(h)

            def forward(self, x, t, pos, *kv):
                b, l, _ = x.shape
                h = self.in_proj_split(x, t) if split else self.in_proj(x, t)
                inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
                ang = pos[:, None].float() * inv[None]
                emb = torch.cat([ang, ang], -1)
                cos, sin = emb.cos()[None, None], emb.sin()[None, None]

                def rot(q):
                    q1, q2 = q[..., : hd // 2], q[..., hd // 2 :]
                    return q * cos + torch.cat([-q2, q1], -1) * sin

                for i, layer in enumerate(self.decoder.layers):
                    a = layer.self_attn
                    r = layer.input_layernorm(h)
                    q = a.q_proj(r).view(b, l, nh, hd)
                    k = a.k_proj(r).view(b, l, nkv, hd)
                    v = a.v_proj(r).view(b, l, nkv, hd)
                    if hasattr(a, "q_norm"):
                        q, k = a.q_norm(q), a.k_norm(k)
                    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    q, k = rot(q), rot(k)
                    kp, vp = kv[2 * i], kv[2 * i + 1]
                    g = nh // nkv
                    heads = lambda z: z[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, nh, -1, hd)
                    if split:
                        kp, vp = heads(kp.expand(b, -1, -1, -1)), heads(vp.expand(b, -1, -1, -1))
                        k, v = heads(k), heads(v)
                        np_ = kp.shape[2]
                        s = torch.cat([q @ kp.transpose(-1, -2), q @ k.transpose(-1, -2)], -1)
                        s = torch.softmax(s / math.sqrt(hd), -1)
                        o = s[..., :np_] @ vp + s[..., np_:] @ v
                    else:
                        k = heads(torch.cat([kp.expand(b, -1, -1, -1), k], 2))
                        v = heads(torch.cat([vp.expand(b, -1, -1, -1), v], 2))
                        s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
                        o = s @ v
                    o = o.transpose(1, 2).reshape(b, l, nh * hd)
                    h = h + a.o_proj(o)
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
                return self.out_proj(self.decoder.norm(h))

        return M().eval()


def export_onnx(cfg, mods, path, b, l, p, torch, split=False):
    """Exports the network once to `path` (kept and reused when it exists); returns the module."""
    e = cfg["expert"]
    m = Exportable.module(cfg, *mods, torch, split)
    if os.path.exists(path):
        return m
    nkv, hd, n = e["num_key_value_heads"], e["head_dim"], e["num_hidden_layers"]
    x = torch.randn(b, l, cfg["action_dims"][1])
    t = torch.rand(b)
    pos = torch.arange(p, p + l)
    kv = [torch.randn(1, nkv, p, hd) for _ in range(2 * n)]
    names = ["x", "t", "pos"] + [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(2 * n)]
    with torch.no_grad():
        torch.onnx.export(
            m, (x, t, pos, *kv), path, input_names=names, output_names=["v"], opset_version=17, dynamo=False
        )
    return m


def median_ms(fn, reps):
    fn()  # warm-up: first-call allocations and lazy initialisation
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def check(case_dir, torch):
    """Runs a golden case of shared/golden (or tests/data/golden): prints the largest errors."""
    import numpy as np
    from safetensors import safe_open

    mods = build(os.path.join(case_dir, "model"), torch)
    cfg = mods[0]
    with open(os.path.join(case_dir, "case.json")) as f:
        case = json.load(f)
    with safe_open(os.path.join(case_dir, "kv.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        n = cfg["expert"]["num_hidden_layers"]
        ks = [f.get_tensor(f"past_key_values.{i}.key") for i in range(n)]
        vs = [f.get_tensor(f"past_key_values.{i}.value") for i in range(n)]
    offset = int(meta.get("position_offset", ks[0].shape[2]))
    x0 = torch.from_numpy(np.load(os.path.join(case_dir, "x_init.npy")))
    step = make_step(*mods, torch)
    noise1 = cfg.get("time_convention") == "noise_at_1"
    results = {}
    with torch.no_grad():
        for steps, name in [(1, "expected_final_1step.npy"), (10, "expected_final.npy")]:
            if noise1:
                x, dt = x0.clone(), 1.0 / steps
                for i in range(steps):
                    t = torch.full((x.shape[0],), 1.0 - i * dt)
                    x = x - dt * step(x, t, ks, vs, offset)
            else:
                x = euler(step, x0, steps, ks, vs, offset, torch)
            want = np.load(os.path.join(case_dir, name))
            results[steps] = float(np.abs(x.numpy() - want).max())
    print(json.dumps({"case": case_dir, "max_abs_err": results, "checked_steps": case.get("checked_steps")}))


def main():
    a = parse()
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.check:
        check(a.check, torch)
        return
    if not a.model:
        raise SystemExit("--model DIR is required (or --check CASE)")
    mods = build(a.model, torch)
    cfg = mods[0]
    e = cfg["expert"]
    n, nkv, hd = e["num_hidden_layers"], e["num_key_value_heads"], e["head_dim"]
    l, c = cfg["action_dims"]
    b, p = a.batch, a.prefix
    figure = a.figure or f"expert_b{b}_p{p}"
    step = make_step(*mods, torch)

    def fresh_cache():
        return [torch.randn(1, nkv, p, hd) for _ in range(n)], [torch.randn(1, nkv, p, hd) for _ in range(n)]

    def torch_call():
        # The VLM's work (the new cache) is outside the clock, as on the Rust side.
        ks, vs = caches.pop()
        t0 = time.perf_counter()
        with torch.no_grad():
            euler(step, torch.randn(b, l, c), a.steps, ks, vs, p, torch)
        return (time.perf_counter() - t0) * 1e3

    caches = [fresh_cache() for _ in range(a.reps + 1)]
    times = [torch_call() for _ in range(a.reps + 1)][1:]
    print(json.dumps({"figure": figure, "value": statistics.median(times), "runtime": "pytorch"}))
    sys.stdout.flush()
    if a.no_ort:
        return
    import numpy as np
    import onnxruntime as ort

    path = a.onnx or os.path.join(tempfile.mkdtemp(prefix="fm-expert-onnx-"), "expert.onnx")
    exported = export_onnx(cfg, mods[1:], path, b, l, p, torch)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    pos = np.arange(p, p + l, dtype=np.int64)
    kv_names = [i.name for i in sess.get_inputs()][3:]
    # The export must be the network transformers runs: one step on one cache, both ways.
    ks, vs = fresh_cache()
    x = torch.randn(b, l, c)
    t = torch.rand(b)
    with torch.no_grad():
        want = step(x, t, ks, vs, p).numpy()
        mine = exported(x, t, torch.from_numpy(pos), *[z for kv in zip(ks, vs) for z in kv]).numpy()
    feed = {"x": x.numpy(), "t": t.numpy(), "pos": pos}
    feed.update({nm: z.numpy() for nm, z in zip(kv_names, [z for kv in zip(ks, vs) for z in kv])})
    got = sess.run(["v"], feed)[0]
    err = max(float(np.abs(mine - want).max()), float(np.abs(got - want).max()))
    if not err <= 1e-3 * (1 + float(np.abs(want).max())):
        raise SystemExit(f"the ONNX export disagrees with transformers' model by {err}")
    if a.tract_onnx:
        variant = export_onnx(cfg, mods[1:], a.tract_onnx, b, l, p, torch, split=True)
        with torch.no_grad():
            theirs = variant(x, t, torch.from_numpy(pos), *[z for kv in zip(ks, vs) for z in kv]).numpy()
        tsess = ort.InferenceSession(a.tract_onnx, so, providers=["CPUExecutionProvider"])
        err = max(float(np.abs(theirs - want).max()), float(np.abs(tsess.run(["v"], feed)[0] - want).max()))
        if not err <= 1e-3 * (1 + float(np.abs(want).max())):
            raise SystemExit(f"tract's variant of the ONNX export disagrees with transformers' model by {err}")

    def ort_call():
        ks, vs = caches.pop()
        kv = [z.numpy() for pair in zip(ks, vs) for z in pair]
        t0 = time.perf_counter()
        x = np.random.randn(b, l, c).astype(np.float32)
        dt = 1.0 / a.steps
        for i in range(a.steps):
            feed = {"x": x, "t": np.full((b,), i * dt, dtype=np.float32), "pos": pos}
            feed.update(zip(kv_names, kv))
            x = x + dt * sess.run(["v"], feed)[0]
        return (time.perf_counter() - t0) * 1e3

    caches = [fresh_cache() for _ in range(a.reps + 1)]
    times = [ort_call() for _ in range(a.reps + 1)][1:]
    print(json.dumps({"figure": figure + "_ort", "value": statistics.median(times), "runtime": "onnxruntime"}))


if __name__ == "__main__":
    main()
