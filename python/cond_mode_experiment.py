"""Which way should the condition enter the waypoint transformer? A measurement.

Trains the reference transformer (python/waypoint_transformer.py) three ways on a synthetic
conditional, multimodal trajectory task and reports minADE_6 / minFDE_6 (metres) on held-out
scenes:

  adaln  the condition's embedding is added to the time embedding that drives every block's
         adaptive layer norm (the shipped design);
  cross  the condition enters only through cross-attention from the waypoint tokens to
         condition tokens (one token per condition number: value * w_i + e_i), the time alone
         drives the layer norms;
  both   both.

The task (a stand-in for the driving scenes, which live on another branch): 64 waypoints of
(acceleration, curvature) at 0.1 s; condition = (speed, distance to a junction, a left-turn
bias, a right-turn bias, a stop bias); intent = keep / left / right / stop drawn with
probabilities from the condition; the manoeuvre starts when the junction is reached.

    python python/cond_mode_experiment.py --steps 1500 --threads 1
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn

import waypoint_transformer as wt

L, DT = 64, 0.1


def scenes(rng, n):
    """Conditions [n, 5] and true futures [n, 64, 2] (acceleration, curvature)."""
    v0 = rng.uniform(3, 15, n)
    dist = rng.uniform(5, 60, n)
    bias = rng.uniform(-1, 1, (n, 3))
    logits = np.stack([np.full(n, 0.5), bias[:, 0] * 2, bias[:, 1] * 2, bias[:, 2] * 2], 1)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    cond = np.concatenate([v0[:, None], dist[:, None], bias], 1).astype(np.float32)
    return cond, p, v0, dist


def draw_future(rng, p, v0, dist):
    n = len(v0)
    mode = np.array([rng.choice(4, p=pi) for pi in p])
    act = np.zeros((n, L, 2), np.float32)
    k = np.arange(L) * DT
    for i in range(n):
        t0 = min(dist[i] / max(v0[i], 1e-3), 6.0)
        on = (k >= t0).astype(np.float32)
        ramp = np.clip((k - t0) / 1.0, 0, 1)
        if mode[i] == 1:
            act[i, :, 1] = 0.08 * ramp * (k < t0 + 2.5)
            act[i, :, 0] = -0.5 * on
        elif mode[i] == 2:
            act[i, :, 1] = -0.08 * ramp * (k < t0 + 2.5)
            act[i, :, 0] = -0.5 * on
        elif mode[i] == 3:
            act[i, :, 0] = -min(v0[i] / 2.0, 4.0) * on * (k < t0 + 2.0)
        act[i] += rng.normal(0, 0.03, (L, 2)) * [1.0, 0.002]
    return act, mode


def positions(act, v0):
    """Unicycle integration (the seed's trapezoid rule), act [..., 64, 2] -> xy [..., 64, 2]."""
    a, kap = act[..., 0], act[..., 1]
    v = np.zeros(a.shape[:-1] + (L + 1,))
    th = np.zeros_like(v)
    xy = np.zeros(a.shape[:-1] + (L + 1, 2))
    v[..., 0] = v0
    for s in range(L):
        v[..., s + 1] = v[..., s] + a[..., s] * DT
        th[..., s + 1] = th[..., s] + kap[..., s] * v[..., s] * DT + kap[..., s] * a[..., s] * DT ** 2 / 2
        xy[..., s + 1, 0] = xy[..., s, 0] + (v[..., s] * np.cos(th[..., s]) + v[..., s + 1] * np.cos(th[..., s + 1])) * DT / 2
        xy[..., s + 1, 1] = xy[..., s, 1] + (v[..., s] * np.sin(th[..., s]) + v[..., s + 1] * np.sin(th[..., s + 1])) * DT / 2
    return xy[..., 1:, :]


class CrossTransformer(wt.WaypointTransformer):
    """The reference with cross-attention to per-number condition tokens added to each block."""

    def __init__(self, *a, adaln=True, **k):
        super().__init__(*a, **k)
        w = self.width
        cn = int(np.prod(self.cond_dims))
        self.adaln = adaln
        self.ctok_w = nn.Parameter(torch.randn(cn, w) * 0.1)
        self.ctok_e = nn.Parameter(torch.randn(cn, w) * 0.1)
        self.xattn = nn.ModuleList([nn.MultiheadAttention(w, self.heads, batch_first=True) for _ in range(self.depth)])
        self.xnorm = nn.ModuleList([nn.LayerNorm(w) for _ in range(self.depth)])

    def forward(self, x, t, c=None, keep=None):
        b, length, chans = x.shape
        t = t.reshape(b)
        ft = wt.fourier(t, self.freqs)
        fx = wt.fourier(x, self.value_freqs).reshape(b, length, -1)
        tok = torch.cat([fx, ft.unsqueeze(1).expand(b, length, ft.shape[-1])], -1)
        h = self.token_embed(tok) + self.pos_embed
        s = self.time_embed(ft)
        cn = (c.reshape(b, -1) - self.cond_norm.mean) / self.cond_norm.std
        kp = keep.reshape(b, 1) if keep is not None else torch.ones(b, 1)
        if self.adaln:
            k = self.cond_embed(cn)
            s = s + k * kp + (1 - kp) * self.cond_null
        ctok = cn.unsqueeze(-1) * self.ctok_w + self.ctok_e  # [B, Cc, W]
        ctok = ctok * kp.unsqueeze(-1) + (1 - kp.unsqueeze(-1)) * self.cond_null
        for blk, xa, xn in zip(self.blocks, self.xattn, self.xnorm):
            h = blk(h, s)
            q = xn(h)
            h = h + xa(q, ctok, ctok, need_weights=False)[0]
        shift, scale = self.final_ada(nn.functional.silu(s)).unsqueeze(1).chunk(2, -1)
        return self.final_out(wt.layer_norm(h) * (1 + scale) + shift)


def make(kind, cond_mean, cond_std):
    kw = dict(width=64, depth=3, heads=4, mlp_hidden=128, num_freqs=10, cond_dims=[5])
    if kind == "adaln":
        m = wt.WaypointTransformer([L, 2], **kw)
    else:
        m = CrossTransformer([L, 2], adaln=(kind == "both"), **kw)
    m.cond_norm.mean.copy_(torch.from_numpy(cond_mean))
    m.cond_norm.std.copy_(torch.from_numpy(cond_std))
    # AdaLN-zero, as the Rust initialisation.
    with torch.no_grad():
        for blk in m.blocks:
            blk.ada.weight.zero_()
            blk.ada.bias.zero_()
        m.final_ada.weight.zero_()
        m.final_ada.bias.zero_()
    return m


def run(kind, args, data):
    torch.manual_seed(args.seed)
    (c_tr, x_tr, a_std), (c_te, p_te, v0_te, d_te, gt_te) = data
    m = make(kind, c_tr.mean(0), c_tr.std(0))
    opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ct, xt = torch.from_numpy(c_tr), torch.from_numpy(x_tr)
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(ct), (args.batch,))
        x1, c = xt[idx], ct[idx]
        t = torch.sigmoid(torch.randn(args.batch))
        x0 = torch.randn_like(x1)
        xt_ = t.view(-1, 1, 1) * x1 + (1 - t.view(-1, 1, 1)) * x0
        keep = (torch.rand(args.batch) > 0.1).float()
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = ((m(xt_, t, c, keep) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for k, v in m.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
    train_s = time.time() - start
    m.load_state_dict(ema)
    # 6 samples per held-out scene, 10 Euler steps.
    n = len(c_te)
    c6 = torch.from_numpy(c_te).repeat_interleave(6, 0)
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(n * 6, L, 2, generator=g)
    traj, _ = wt.euler(m, x0, 10, c6)
    acts = traj[:, -1].numpy().reshape(n, 6, L, 2) * a_std
    pos = positions(acts, np.repeat(v0_te[:, None], 6, 1))
    gt = positions(gt_te, v0_te)
    err = np.linalg.norm(pos - gt[:, None], axis=-1)  # [n, 6, L]
    ade = err.mean(-1).min(-1).mean()
    fde = err[..., -1].min(-1).mean()
    return {"cond": kind, "minADE_6": round(float(ade), 3), "minFDE_6": round(float(fde), 3),
            "final_loss": round(float(loss), 4), "train_s": round(train_s, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", default="adaln,cross,both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    c_tr, p_tr, v_tr, d_tr = scenes(rng, 20000)
    x_tr, _ = draw_future(rng, p_tr, v_tr, d_tr)
    a_std = x_tr.reshape(-1, 2).std(0).astype(np.float32)
    c_te, p_te, v_te, d_te = scenes(rng, 300)
    gt_te, _ = draw_future(rng, p_te, v_te, d_te)
    # Oracle: 6 fresh draws of the true future distribution for the same scene.
    o = np.stack([draw_future(rng, p_te, v_te, d_te)[0] for _ in range(6)], 1)
    err = np.linalg.norm(positions(o, np.repeat(v_te[:, None], 6, 1)) - positions(gt_te, v_te)[:, None], axis=-1)
    print(json.dumps({"cond": "oracle", "minADE_6": round(float(err.mean(-1).min(-1).mean()), 3),
                      "minFDE_6": round(float(err[..., -1].min(-1).mean()), 3)}), flush=True)
    data = ((c_tr, x_tr / a_std, a_std), (c_te, p_te, v_te, d_te, gt_te))
    for kind in args.kinds.split(","):
        print(json.dumps(run(kind, args, data)), flush=True)


if __name__ == "__main__":
    main()
