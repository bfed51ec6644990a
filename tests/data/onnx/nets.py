"""Velocity networks for the ONNX fixtures and the `onnx_traj_b6` benchmark.

Shared by make_fixtures.py (tiny widths, committed .onnx files and PyTorch results) and
bench/onnx_reference.py (the benchmark-size waypoint transformer, exported at run time).
"""

import math

import torch
from torch import nn


def fourier(v, n, max_freq=100.0):
    """Fourier features of a value on log-spaced frequencies (the seed job's encoding).

    v: [..., 1]; returns [..., 2n]: [sin(2 pi f v), cos(2 pi f v)] * sqrt(2).
    """
    freqs = torch.logspace(0.0, math.log10(max_freq), n, device=v.device)
    arg = v * freqs * (2.0 * math.pi)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1) * math.sqrt(2.0)


class Mlp(nn.Module):
    """x [B, D], t [B] -> v [B, D]: sinusoidal time, Linear -> GELU -> LayerNorm blocks."""

    def __init__(self, dim=3, width=32, depth=2, freqs=8):
        super().__init__()
        self.freqs = freqs
        layers = []
        d_in = dim + 2 * freqs
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.GELU(), nn.LayerNorm(width)]
            d_in = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)

    def forward(self, x, t):
        tf = fourier(t.unsqueeze(-1), self.freqs, max_freq=10.0)
        return self.out(self.body(torch.cat([x, tf], dim=-1)))


class Pointwise(nn.Module):
    """x [B, N, C], t [B, 1, 1] -> v: one MLP per token, so N may be symbolic in the export."""

    def __init__(self, channels=2, width=16, freqs=4):
        super().__init__()
        self.freqs = freqs
        self.inp = nn.Linear(channels + 2 * freqs, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, channels)

    def forward(self, x, t):
        tf = fourier(t, self.freqs, max_freq=10.0).expand(-1, x.shape[1], -1)
        h = nn.functional.gelu(self.inp(torch.cat([x, tf], dim=-1)))
        return self.out(self.norm(h))


class Attention(nn.Module):
    """Multi-head attention written out (the reshape/transpose/matmul/softmax graph exporters emit)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.o = nn.Linear(width, width)

    def forward(self, h, src):
        b, n, w = h.shape
        s = src.shape[1]
        d = w // self.heads
        q = self.q(h).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(src).reshape(b, s, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GELU MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.n1 = nn.LayerNorm(width)
        self.sa = Attention(width, heads)
        self.n2 = nn.LayerNorm(width)
        self.ca = Attention(width, heads)
        self.n3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h, ctx):
        a = self.n1(h)
        h = h + self.sa(a, a)
        h = h + self.ca(self.n2(h), ctx)
        return h + self.mlp(self.n3(h))


class WaypointTransformer(nn.Module):
    """The seed job's shape of velocity net: x [B, 64, 2] waypoints, t [B, 1, 1], ctx [B, S, C].

    Each waypoint is a token (its values' Fourier features plus a learned position); the flow
    time's features are added to every token; blocks attend to each other and to the context.
    """

    def __init__(self, width=128, blocks=2, heads=4, ctx_dim=32, tokens=64, freqs=10):
        super().__init__()
        self.freqs = freqs
        self.inp = nn.Linear(2 * 2 * freqs, width)
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(2 * freqs, width), nn.SiLU(), nn.Linear(width, width))
        self.ctx = nn.Linear(ctx_dim, width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2)

    def forward(self, x, t, ctx):
        b, n, _ = x.shape
        # Low frequencies for the values: an untrained net over the seed's 100 Hz features is so
        # rough in x that float32 rounding differences between runtimes grow step by step.
        xf = fourier(x.unsqueeze(-1), self.freqs, max_freq=4.0).reshape(b, n, 4 * self.freqs)
        h = self.inp(xf) + self.pos + self.time(fourier(t, self.freqs))
        c = self.ctx(ctx)
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(self.norm(h))


def export(model, args, path, input_names, dynamic=True):
    """Exports with the batch dimension (dim 0 of every input and the output) symbolic."""
    dyn = None
    if dynamic:
        dyn = {n: {0: "batch"} for n in input_names}
        dyn["v"] = {0: "batch"}
    torch.onnx.export(
        model,
        args,
        path,
        input_names=input_names,
        output_names=["v"],
        dynamic_axes=dyn,
        opset_version=17,
        dynamo=False,
    )
