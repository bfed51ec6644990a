//! Backward-pass kernels of the waypoint transformer's training step: the layer norm that
//! keeps what its gradient needs, the adaptive modulation and gated residual backwards, the
//! softmax-attention backward (scores recomputed per head rather than stored), and the linear
//! layer's weight and input gradients on the packed kernels.
//!
//! Storing every head's probabilities would cost `L^2` floats per head and block (16 MB a
//! block at batch 128, L = 64); recomputing them is one `L x L x dh` matmul per head, a few
//! percent of the step.

use super::attention::{softmax_rows_on, sum_lanes};
use super::{
    kernel_path, matmul_nn, matmul_packed_on, matmul_tn_acc_on, transpose, KernelPath, TILE_N,
};

/// The dot product of two equal-length slices in 16 lanes, so that the loop vectorises (a
/// single accumulator is a chain of dependent adds).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 16];
    let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((si, &xi), &yi) in s.iter_mut().zip(x).zip(y) {
            *si += xi * yi;
        }
    }
    let r: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    r + s.iter().sum::<f32>()
}

simd_dispatch! {
    /// `n = LN(h)` for every `w`-wide token (no affine weights), keeping each token's
    /// `1 / sqrt(var + eps)` in `rstd` for the backward pass.
    fn layer_norm_keep / layer_norm_keep_on(
        n: &mut [f32],
        rstd: &mut [f32],
        h: &[f32],
        w: usize,
        eps: f32
    ) {
        for ((nt, ht), r) in n.chunks_exact_mut(w).zip(h.chunks_exact(w)).zip(rstd.iter_mut()) {
            let mean = sum_lanes(ht, |v| v) / w as f32;
            let var = sum_lanes(ht, |v| (v - mean) * (v - mean)) / w as f32;
            let inv = 1.0 / (var + eps).sqrt();
            *r = inv;
            for (ni, &hi) in nt.iter_mut().zip(ht) {
                *ni = (hi - mean) * inv;
            }
        }
    }
}

simd_dispatch! {
    /// `a = n (1 + scale) + shift` for every `scale.len()`-wide token of `n` (the adaptive
    /// modulation of an already normalised token).
    fn modulate / modulate_on(a: &mut [f32], n: &[f32], shift: &[f32], scale: &[f32]) {
        let w = scale.len();
        for (at, nt) in a.chunks_exact_mut(w).zip(n.chunks_exact(w)) {
            for (((ai, &ni), &sc), &sh) in at.iter_mut().zip(nt).zip(scale).zip(shift) {
                *ai = ni * (1.0 + sc) + sh;
            }
        }
    }
}

simd_dispatch! {
    /// The backward of `a = LN(h) (1 + scale) + shift` over tokens sharing `shift` and `scale`:
    /// adds `da`'s gradient to `dmod` (`[dshift | dscale]`, `2w` floats) and, through the layer
    /// norm (from the kept `n` and `rstd`), to `dh`.
    fn modulate_backward / modulate_backward_on(
        dh: &mut [f32],
        dmod: &mut [f32],
        da: &[f32],
        n: &[f32],
        rstd: &[f32],
        scale: &[f32]
    ) {
        let w = scale.len();
        let (dshift, dscale) = dmod[..2 * w].split_at_mut(w);
        let toks = dh.chunks_exact_mut(w).zip(da.chunks_exact(w)).zip(n.chunks_exact(w));
        for (((dht, dat), nt), &r) in toks.zip(rstd) {
            let cols = dshift.iter_mut().zip(dscale.iter_mut());
            for (((dsh, dsc), &d), &nj) in cols.zip(dat).zip(nt) {
                *dsh += d;
                *dsc += d * nj;
            }
            // dh = rstd (dn - mean(dn) - n mean(dn n)) with dn = da (1 + scale): the layer
            // norm's gradient, exact with the epsilon inside rstd. The sums in 16 lanes.
            let (mut s1, mut s2) = ([0f32; 16], [0f32; 16]);
            let lanes = dat.chunks_exact(16).zip(nt.chunks_exact(16));
            for ((dc, nc), sc) in lanes.zip(scale.chunks_exact(16)) {
                let acc = s1.iter_mut().zip(s2.iter_mut());
                for (((a1, a2), (&d, &nv)), &sv) in acc.zip(dc.iter().zip(nc)).zip(sc) {
                    let dn = d * (1.0 + sv);
                    *a1 += dn;
                    *a2 += dn * nv;
                }
            }
            let tail = w - w % 16;
            let (mut m1, mut m2) = (0f32, 0f32);
            for ((&d, &nv), &sv) in dat[tail..].iter().zip(&nt[tail..]).zip(&scale[tail..]) {
                let dn = d * (1.0 + sv);
                m1 += dn;
                m2 += dn * nv;
            }
            let m1 = (m1 + s1.iter().sum::<f32>()) / w as f32;
            let m2 = (m2 + s2.iter().sum::<f32>()) / w as f32;
            for (((d, &dv), &nj), &sc) in dht.iter_mut().zip(dat).zip(nt).zip(scale) {
                *d += r * (dv * (1.0 + sc) - m1 - nj * m2);
            }
        }
    }
}

simd_dispatch! {
    /// The backward of `h_out = h_in + gate * y` over tokens sharing `gate`: `dy = dh gate` and
    /// `dgate += sum dh y` (`dh_in` is `dh` itself).
    fn gate_backward / gate_backward_on(
        dy: &mut [f32],
        dgate: &mut [f32],
        dh: &[f32],
        y: &[f32],
        gate: &[f32]
    ) {
        let w = gate.len();
        let toks = dy.chunks_exact_mut(w).zip(dh.chunks_exact(w)).zip(y.chunks_exact(w));
        for ((dyt, dht), yt) in toks {
            let cols = dyt.iter_mut().zip(dgate.iter_mut());
            for (((o, dg), (&d, &yv)), &gv) in cols.zip(dht.iter().zip(yt)).zip(gate) {
                *o = d * gv;
                *dg += d * yv;
            }
        }
    }
}

simd_dispatch! {
    /// The softmax backward over the first `valid` entries of each `stride`-long row, in place:
    /// `dp` (the gradient of the probabilities `p`) becomes `scale p (dp - sum(dp p))`, the
    /// gradient of the unscaled scores; padded entries (where `p` is 0) become 0.
    fn softmax_backward_rows / softmax_backward_rows_on(
        dp: &mut [f32],
        p: &[f32],
        stride: usize,
        valid: usize,
        scale: f32
    ) {
        for (dr, pr) in dp.chunks_exact_mut(stride).zip(p.chunks_exact(stride)) {
            let dot = dot_lanes(&dr[..valid], &pr[..valid]);
            for (d, &q) in dr.iter_mut().zip(pr) {
                *d = scale * q * (*d - dot);
            }
        }
    }
}

/// `db += sum over the rows of g` (`g` `[m, db.len()]`): a bias gradient.
pub fn bias_grad(db: &mut [f32], g: &[f32]) {
    let n = db.len();
    for row in g.chunks_exact(n) {
        super::add_assign(db, row);
    }
}

/// `dw[n, k] += g[m, n]^T x[m, k]`: a linear layer's weight gradient. On the packed kernel when
/// `k` is a multiple of [`TILE_N`]; else, when `n` is, as the packed `x^T g` transposed (the
/// token embedding's 63 inputs against its 64 outputs); else through `gemm`.
pub fn weight_grad(dw: &mut [f32], g: &[f32], x: &[f32], m: usize, n: usize, k: usize) {
    weight_grad_on(kernel_path(), dw, g, x, m, n, k)
}

/// [`weight_grad`] on a given path (which the CPU must support).
pub(crate) fn weight_grad_on(
    path: KernelPath,
    dw: &mut [f32],
    g: &[f32],
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    if m == 0 {
        return;
    }
    if !k.is_multiple_of(TILE_N) && n.is_multiple_of(TILE_N) && m >= TILE_N {
        let mut dwt = vec![0f32; k * n];
        matmul_tn_acc_on(path, &mut dwt, x, g, m, k, n);
        let t = transpose(&dwt, k, n);
        super::add_assign_on(path, &mut dw[..n * k], &t);
        return;
    }
    matmul_tn_acc_on(path, dw, g, x, m, n, k)
}

/// `dx[m, k] = g[m, n] w[n, k]`: a linear layer's input gradient, overwriting `dx`. `w`
/// `[n, k]` is already the packed `[K, N]` layout of this product when `k` is a multiple of
/// [`TILE_N`]; other widths go through `gemm`.
pub fn input_grad(dx: &mut [f32], g: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
    input_grad_on(kernel_path(), dx, g, w, m, n, k)
}

/// [`input_grad`] on a given path (which the CPU must support).
pub(crate) fn input_grad_on(
    path: KernelPath,
    dx: &mut [f32],
    g: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    if m == 0 {
        return;
    }
    if k.is_multiple_of(TILE_N) {
        dx[..m * k].fill(0.0);
        matmul_packed_on(path, &mut dx[..m * k], g, w, m, k, n);
    } else {
        matmul_nn(dx, g, w, m, n, k, k, 0);
    }
}

/// Reusable buffers of [`attention_backward`] for one sequence length and head width, their
/// padding (tokens to [`TILE_N`], head width to [`TILE_N`]) kept zero between calls.
#[derive(Debug, Default, Clone)]
pub struct AttentionGradScratch {
    l: usize,
    dh: usize,
    lp: usize,
    dhp: usize,
    /// Queries `[l, dhp]`.
    q: Vec<f32>,
    /// Keys transposed `[dhp, lp]` (scores) and as rows `[lp, dhp]` (query gradient).
    kt: Vec<f32>,
    k: Vec<f32>,
    /// Values transposed `[dhp, lp]` (probability gradient).
    vt: Vec<f32>,
    /// The output's gradient `[l, dhp]`.
    dout: Vec<f32>,
    /// Probabilities and their gradient `[l, lp]`.
    p: Vec<f32>,
    dp: Vec<f32>,
    /// Gradients of queries `[l, dhp]`, keys and values `[lp, dhp]`.
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl AttentionGradScratch {
    fn resize(&mut self, l: usize, dh: usize) {
        if (self.l, self.dh) == (l, dh) {
            return;
        }
        let (lp, dhp) = (l.next_multiple_of(TILE_N), dh.next_multiple_of(TILE_N));
        *self = AttentionGradScratch {
            l,
            dh,
            lp,
            dhp,
            q: vec![0.0; l * dhp],
            kt: vec![0.0; dhp * lp],
            k: vec![0.0; lp * dhp],
            vt: vec![0.0; dhp * lp],
            dout: vec![0.0; l * dhp],
            p: vec![0.0; l * lp],
            dp: vec![0.0; l * lp],
            dq: vec![0.0; l * dhp],
            dk: vec![0.0; lp * dhp],
            dv: vec![0.0; lp * dhp],
        };
    }
}

/// The backward of [`super::attention::attention`]: from `qkv` `[rows, l, 3w]` and the output's
/// gradient `dout` `[rows, l, w]`, writes the gradient of every query, key and value into
/// `dqkv` `[rows, l, 3w]`. Per head, with `P = softmax(s q k^T)`: `dV = P^T dO`, `dP = dO V^T`,
/// `dS = s P (dP - rowsum(dP P))`, `dQ = dS K`, `dK = dS^T Q`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    scratch: &mut AttentionGradScratch,
    rows: usize,
    l: usize,
    w: usize,
    heads: usize,
) {
    attention_backward_on(kernel_path(), dqkv, dout, qkv, scratch, rows, l, w, heads)
}

/// [`attention_backward`] on a given path (which the CPU must support).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward_on(
    path: KernelPath,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    scratch: &mut AttentionGradScratch,
    rows: usize,
    l: usize,
    w: usize,
    heads: usize,
) {
    let dh = w / heads;
    let stride = 3 * w;
    assert!(
        dh * heads == w
            && qkv.len() >= rows * l * stride
            && dqkv.len() >= rows * l * stride
            && dout.len() >= rows * l * w
    );
    scratch.resize(l, dh);
    let scale = 1.0 / (dh as f32).sqrt();
    let AttentionGradScratch {
        lp,
        dhp,
        q,
        kt,
        k,
        vt,
        dout: dop,
        p,
        dp,
        dq,
        dk,
        dv,
        ..
    } = scratch;
    let (lp, dhp) = (*lp, *dhp);
    for r in 0..rows {
        let seq = &qkv[r * l * stride..(r + 1) * l * stride];
        let dseq = &dout[r * l * w..(r + 1) * l * w];
        for hd in 0..heads {
            let (c0, c1) = (hd * dh, (hd + 1) * dh);
            // Element loops, not `copy_from_slice`: a head is a few floats, and a `memmove`
            // call per head and token was a tenth of the step.
            for (i, tok) in seq.chunks_exact(stride).enumerate() {
                let (qi, ki, vi) = (
                    &tok[c0..c1],
                    &tok[w + c0..w + c1],
                    &tok[2 * w + c0..2 * w + c1],
                );
                let gi = &dseq[i * w + c0..i * w + c1];
                for e in 0..dh {
                    q[i * dhp + e] = qi[e];
                    k[i * dhp + e] = ki[e];
                    kt[e * lp + i] = ki[e];
                    vt[e * lp + i] = vi[e];
                    dop[i * dhp + e] = gi[e];
                }
            }
            // The probabilities again: the forward's scores, softmax with its padding zeroed.
            p.fill(0.0);
            matmul_packed_on(path, p, q, kt, l, lp, dhp);
            softmax_rows_on(path, p, lp, l, scale);
            // dV = P^T dO, dP = dO V^T.
            dv.fill(0.0);
            matmul_tn_acc_on(path, dv, p, dop, l, lp, dhp);
            dp.fill(0.0);
            matmul_packed_on(path, dp, dop, vt, l, lp, dhp);
            softmax_backward_rows_on(path, dp, p, lp, l, scale);
            // dQ = dS K, dK = dS^T Q.
            dq.fill(0.0);
            matmul_packed_on(path, dq, dp, k, l, dhp, lp);
            dk.fill(0.0);
            matmul_tn_acc_on(path, dk, dp, q, l, lp, dhp);
            for i in 0..l {
                let out = &mut dqkv[(r * l + i) * stride..(r * l + i + 1) * stride];
                for e in 0..dh {
                    out[c0 + e] = dq[i * dhp + e];
                    out[w + c0 + e] = dk[i * dhp + e];
                    out[2 * w + c0 + e] = dv[i * dhp + e];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::attention::attention_on;
    use super::*;

    /// `sum(o * g)` of the attention output for a fixed upstream gradient `g`, in f64.
    fn attention_dot(qkv: &[f32], g: &[f32], rows: usize, l: usize, w: usize, heads: usize) -> f64 {
        let dh = w / heads;
        let mut total = 0f64;
        for r in 0..rows {
            for hd in 0..heads {
                let at = |i: usize, part: usize, e: usize| {
                    qkv[(r * l + i) * 3 * w + part * w + hd * dh + e] as f64
                };
                for i in 0..l {
                    let sc: Vec<f64> = (0..l)
                        .map(|j| (0..dh).map(|e| at(i, 0, e) * at(j, 1, e)).sum::<f64>())
                        .map(|v| v / (dh as f64).sqrt())
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                    let sum: f64 = ex.iter().sum();
                    for e in 0..dh {
                        let v: f64 = (0..l).map(|j| ex[j] / sum * at(j, 2, e)).sum();
                        total += v * g[(r * l + i) * w + hd * dh + e] as f64;
                    }
                }
            }
        }
        total
    }

    #[test]
    fn attention_backward_matches_finite_differences_on_every_path() {
        // Exact tiles, padded tokens and heads (dh = 12), a short sequence.
        for (rows, l, w, heads) in [(1, 16, 32, 2), (2, 10, 36, 3), (1, 3, 8, 2)] {
            let n = rows * l * 3 * w;
            let qkv: Vec<f32> = (0..n).map(|i| (i as f32 * 0.618).sin()).collect();
            let g: Vec<f32> = (0..rows * l * w).map(|i| (i as f32 * 0.37).cos()).collect();
            for path in KernelPath::supported() {
                let mut d = vec![f32::NAN; n];
                let mut s = AttentionGradScratch::default();
                for _ in 0..2 {
                    attention_backward_on(path, &mut d, &g, &qkv, &mut s, rows, l, w, heads);
                }
                // The forward the backward inverts is the crate's own.
                let mut o = vec![0f32; rows * l * w];
                let mut fs = Default::default();
                attention_on(path, &qkv, &mut o, &mut fs, rows, l, w, heads);
                for idx in (0..n).step_by(7) {
                    let eps = 1e-3;
                    let (mut up, mut dn) = (qkv.clone(), qkv.clone());
                    up[idx] += eps;
                    dn[idx] -= eps;
                    let fd = (attention_dot(&up, &g, rows, l, w, heads)
                        - attention_dot(&dn, &g, rows, l, w, heads))
                        / (2.0 * eps as f64);
                    assert!(
                        (d[idx] as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                        "{path:?} {rows}x{l}x{w}/{heads} at {idx}: {} vs {fd}",
                        d[idx]
                    );
                }
            }
        }
    }

    #[test]
    fn modulate_backward_matches_finite_differences() {
        let (toks, w) = (3, 20);
        let h: Vec<f32> = (0..toks * w)
            .map(|i| (i as f32 * 0.37).cos() * 2.0)
            .collect();
        let sc: Vec<f32> = (0..w).map(|i| (i as f32 * 0.2).sin()).collect();
        let sh: Vec<f32> = (0..w).map(|i| i as f32 * 0.01).collect();
        let g: Vec<f32> = (0..toks * w).map(|i| (i as f32 * 0.11).sin()).collect();
        let f = |h: &[f32]| -> f64 {
            let mut n = vec![0f32; toks * w];
            let mut r = vec![0f32; toks];
            layer_norm_keep_on(KernelPath::Portable, &mut n, &mut r, h, w, 1e-6);
            let mut a = vec![0f32; toks * w];
            modulate_on(KernelPath::Portable, &mut a, &n, &sh, &sc);
            a.iter().zip(&g).map(|(x, y)| *x as f64 * *y as f64).sum()
        };
        for path in KernelPath::supported() {
            let mut n = vec![0f32; toks * w];
            let mut r = vec![0f32; toks];
            layer_norm_keep_on(path, &mut n, &mut r, &h, w, 1e-6);
            let mut dh = vec![0f32; toks * w];
            let mut dmod = vec![0f32; 2 * w];
            modulate_backward_on(path, &mut dh, &mut dmod, &g, &n, &r, &sc);
            let (dsh, dsc) = dmod.split_at(w);
            for i in 0..toks * w {
                let (mut up, mut dn) = (h.clone(), h.clone());
                up[i] += 1e-2;
                dn[i] -= 1e-2;
                let fd = (f(&up) - f(&dn)) / 2e-2;
                assert!(
                    (dh[i] as f64 - fd).abs() < 2e-3,
                    "{path:?} {i}: {} vs {fd}",
                    dh[i]
                );
            }
            for j in 0..w {
                let want: f32 = (0..toks).map(|t| g[t * w + j]).sum();
                assert!((dsh[j] - want).abs() < 1e-5);
                let want: f32 = (0..toks).map(|t| g[t * w + j] * n[t * w + j]).sum();
                assert!((dsc[j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn linear_gradients_match_naive_loops_on_every_path() {
        // k = 63 against n = 64 (the transposed route), both multiples, neither.
        for (m, n, k) in [(40, 64, 63), (20, 32, 16), (9, 5, 7), (17, 2, 48)] {
            let g: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.37).sin()).collect();
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.07).sin()).collect();
            for path in KernelPath::supported() {
                let mut dw = vec![0.5f32; n * k];
                weight_grad_on(path, &mut dw, &g, &x, m, n, k);
                let mut dx = vec![f32::NAN; m * k];
                input_grad_on(path, &mut dx, &g, &w, m, n, k);
                for j in 0..n {
                    for i in 0..k {
                        let want: f32 =
                            0.5 + (0..m).map(|r| g[r * n + j] * x[r * k + i]).sum::<f32>();
                        assert!(
                            (dw[j * k + i] - want).abs() < 1e-3,
                            "{path:?} dw {m} {n} {k}"
                        );
                    }
                }
                for r in 0..m {
                    for i in 0..k {
                        let want: f32 = (0..n).map(|j| g[r * n + j] * w[j * k + i]).sum();
                        assert!(
                            (dx[r * k + i] - want).abs() < 1e-3,
                            "{path:?} dx {m} {n} {k}"
                        );
                    }
                }
            }
        }
    }
}
