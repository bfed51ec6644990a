//! Kernels of a transformers-style decoder on f32 slices: RMSNorm, the rotary embedding, the
//! gated MLP's activation, an affine LayerNorm, and the softmax over a cached prefix's scores
//! and the action tokens' own scores kept in two buffers (so the prefix is never copied
//! beside every sample's keys).

use super::{exp_approx, kernel_path, KernelPath};

simd_dispatch! {
    /// `out = x / sqrt(mean(x^2) + eps) * w` for every `w.len()`-wide row of `x`.
    fn rms_norm / rms_norm_on(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let n = w.len();
        for (o, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            let mut acc = [0f32; 16];
            let mut ch = xr.chunks_exact(16);
            for c in &mut ch {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += v * v;
                }
            }
            let rest: f32 = ch.remainder().iter().map(|v| v * v).sum();
            let ss = acc.iter().sum::<f32>() + rest;
            let inv = 1.0 / (ss / n as f32 + eps).sqrt();
            for ((oi, &xi), &wi) in o.iter_mut().zip(xr).zip(w) {
                *oi = wi * (xi * inv);
            }
        }
    }
}

simd_dispatch! {
    /// [`rms_norm`] in place.
    fn rms_norm_inplace / rms_norm_inplace_on(x: &mut [f32], w: &[f32], eps: f32) {
        let n = w.len();
        for xr in x.chunks_exact_mut(n) {
            let ss: f32 = xr.iter().map(|v| v * v).sum();
            let inv = 1.0 / (ss / n as f32 + eps).sqrt();
            for (xi, &wi) in xr.iter_mut().zip(w) {
                *xi = wi * (*xi * inv);
            }
        }
    }
}

simd_dispatch! {
    /// The rotary embedding in place on every `2 cos.len()`-wide head of one token `x`:
    /// `x cos + rotate_half(x) sin`, with `rotate_half(x) = [-x2, x1]`.
    fn rope_inplace / rope_inplace_on(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in x.chunks_exact_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                let (u, v) = (*a, *b);
                *a = u * c + -v * s;
                *b = v * c + u * s;
            }
        }
    }
}

simd_dispatch! {
    /// `out[t, j] = silu(gu[t, j]) * gu[t, ff + j]` for tokens `gu` `[T, 2 ff]` (gate, then up).
    fn silu_mul / silu_mul_on(out: &mut [f32], gu: &[f32], ff: usize) {
        for (o, g) in out.chunks_exact_mut(ff).zip(gu.chunks_exact(2 * ff)) {
            let (gate, up) = g.split_at(ff);
            for ((oi, &z), &u) in o.iter_mut().zip(gate).zip(up) {
                *oi = z / (1.0 + exp_approx(-z)) * u;
            }
        }
    }
}

simd_dispatch! {
    /// `out[t, j] = gelu_tanh(gu[t, j]) * gu[t, ff + j]` (GeGLU, Gemma's MLP).
    fn gelu_mul / gelu_mul_on(out: &mut [f32], gu: &[f32], ff: usize) {
        const C: f32 = 0.797_884_6; // sqrt(2 / pi)
        for (o, g) in out.chunks_exact_mut(ff).zip(gu.chunks_exact(2 * ff)) {
            let (gate, up) = g.split_at(ff);
            for ((oi, &z), &u) in o.iter_mut().zip(gate).zip(up) {
                let inner = C * (z + 0.044_715 * z * z * z);
                // tanh(a) = 1 - 2 / (exp(2a) + 1)
                let th = 1.0 - 2.0 / (exp_approx(2.0 * inner) + 1.0);
                *oi = 0.5 * z * (1.0 + th) * u;
            }
        }
    }
}

simd_dispatch! {
    /// `out = (x - mean) / sqrt(var + eps) * w + b` for every `w.len()`-wide row.
    fn layer_norm / layer_norm_on(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let n = w.len();
        for (o, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            let mean = xr.iter().sum::<f32>() / n as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((oi, &xi), &wi), &bi) in o.iter_mut().zip(xr).zip(w).zip(b) {
                *oi = (xi - mean) * inv * wi + bi;
            }
        }
    }
}

/// What [`softmax_joint`] attends to in each of its rows.
#[derive(Debug, Clone, Copy)]
pub struct JointShape<'a> {
    /// The prefix scores' row stride (the prefix padded to the kernel's tile).
    pub p_stride: usize,
    /// Valid prefix tokens (the rest of each prefix row is padding).
    pub p_valid: usize,
    /// 1 or 0 per prefix token (`None`: every token is attended to).
    pub p_mask: Option<&'a [f32]>,
    /// The own scores' row stride.
    pub o_stride: usize,
    /// Own tokens per sequence (row `r` is token `r % own`).
    pub own: usize,
    /// Own token `i` sees only tokens `0..=i`.
    pub causal: bool,
}

/// The softmax of every row over its prefix scores `sp` and its own scores `so` together,
/// in place (the already scaled scores); padding, masked and causally hidden entries become 0.
pub fn softmax_joint(sp: &mut [f32], so: &mut [f32], shape: &JointShape<'_>) {
    softmax_joint_on(kernel_path(), sp, so, shape)
}

/// [`softmax_joint`] on a given path (which the CPU must support).
pub(crate) fn softmax_joint_on(
    path: KernelPath,
    sp: &mut [f32],
    so: &mut [f32],
    shape: &JointShape<'_>,
) {
    #[inline(always)]
    fn body(sp: &mut [f32], so: &mut [f32], s: &JointShape<'_>) {
        let rows = so.len().checked_div(s.o_stride).unwrap_or(0);
        for r in 0..rows {
            let i = r % s.own.max(1);
            let ov = if s.causal { i + 1 } else { s.own };
            let (p, ppad) = sp[r * s.p_stride..(r + 1) * s.p_stride].split_at_mut(s.p_valid);
            let (o, opad) = so[r * s.o_stride..(r + 1) * s.o_stride].split_at_mut(ov);
            ppad.fill(0.0);
            opad.fill(0.0);
            if let Some(m) = s.p_mask {
                for (x, &keep) in p.iter_mut().zip(m) {
                    if keep == 0.0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let mx = max16(p).max(max16(o));
            let mut acc = [0f32; 16];
            for part in [&mut *p, &mut *o] {
                let mut ch = part.chunks_exact_mut(16);
                for c in &mut ch {
                    for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                        *v = exp_approx(*v - mx);
                        *a += *v;
                    }
                }
                for v in ch.into_remainder() {
                    *v = exp_approx(*v - mx);
                    acc[0] += *v;
                }
            }
            if let Some(m) = s.p_mask {
                // exp_approx clamps its input, so -inf gives a tiny positive value: zero it.
                let mut removed = 0.0;
                for (x, &keep) in p.iter_mut().zip(m) {
                    if keep == 0.0 {
                        removed += *x;
                        *x = 0.0;
                    }
                }
                acc[0] -= removed;
            }
            let inv = 1.0 / acc.iter().sum::<f32>();
            // Two loops, not a chained iterator: a chain does not vectorise.
            for v in p.iter_mut() {
                *v *= inv;
            }
            for v in o.iter_mut() {
                *v *= inv;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(sp: &mut [f32], so: &mut [f32], s: &JointShape<'_>) {
            body(sp, so, s)
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wider(sp: &mut [f32], so: &mut [f32], s: &JointShape<'_>) {
            body(sp, so, s)
        }
        match path {
            // SAFETY: callers pass supported paths only.
            KernelPath::Avx512 => return unsafe { wider(sp, so, shape) },
            // SAFETY: as above.
            KernelPath::Avx2 => return unsafe { wide(sp, so, shape) },
            KernelPath::Portable => {}
        }
    }
    body(sp, so, shape)
}

/// The largest element (`-inf` for none), in 16 lanes.
#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut ch = x.chunks_exact(16);
    for c in &mut ch {
        for (mi, &ci) in m.iter_mut().zip(c) {
            *mi = if ci > *mi { ci } else { *mi };
        }
    }
    let r = ch
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m.iter().fold(r, |a, &b| a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joint_softmax_equals_one_softmax_over_both_parts_on_every_path() {
        let (rows, p, own) = (6, 19, 3);
        let (ps, os) = (32, 16);
        let mask: Vec<f32> = (0..p).map(|j| if j % 5 == 1 { 0.0 } else { 1.0 }).collect();
        for path in KernelPath::supported() {
            for (causal, m) in [(false, None), (true, Some(mask.as_slice()))] {
                let score = |r: usize, j: usize| ((r * 31 + j * 7) as f32 * 0.37).sin() * 3.0;
                let mut sp = vec![9.0f32; rows * ps];
                let mut so = vec![9.0f32; rows * os];
                for r in 0..rows {
                    for j in 0..p {
                        sp[r * ps + j] = score(r, j);
                    }
                    for j in 0..own {
                        so[r * os + j] = score(r, p + j);
                    }
                }
                let shape = JointShape {
                    p_stride: ps,
                    p_valid: p,
                    p_mask: m,
                    o_stride: os,
                    own,
                    causal,
                };
                softmax_joint_on(path, &mut sp, &mut so, &shape);
                for r in 0..rows {
                    let i = r % own;
                    let keep = |j: usize| {
                        if j < p {
                            m.is_none_or(|m| m[j] != 0.0)
                        } else {
                            !causal || j - p <= i
                        }
                    };
                    let z: f64 = (0..p + own)
                        .filter(|&j| keep(j))
                        .map(|j| (score(r, j) as f64).exp())
                        .sum();
                    for j in 0..p + own {
                        let want = if keep(j) {
                            (score(r, j) as f64).exp() / z
                        } else {
                            0.0
                        };
                        let got = if j < p {
                            sp[r * ps + j]
                        } else {
                            so[r * os + j - p]
                        };
                        assert!((got as f64 - want).abs() < 1e-6, "{path:?} {r} {j}");
                    }
                    assert!(sp[r * ps + p..(r + 1) * ps].iter().all(|&v| v == 0.0));
                    assert!(so[r * os + own..(r + 1) * os].iter().all(|&v| v == 0.0));
                }
            }
        }
    }

    #[test]
    fn norms_rope_and_gates_match_naive_on_every_path() {
        let x: Vec<f32> = (0..3 * 8).map(|i| (i as f32 * 0.7).cos() * 2.0).collect();
        let w: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        for path in KernelPath::supported() {
            let mut out = vec![0f32; x.len()];
            rms_norm_on(path, &mut out, &x, &w, 1e-6);
            let mut inp = x.clone();
            rms_norm_inplace_on(path, &mut inp, &w, 1e-6);
            for r in 0..3 {
                let row = &x[r * 8..(r + 1) * 8];
                let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / 8.0;
                for j in 0..8 {
                    let want = row[j] as f64 / (ms + 1e-6).sqrt() * w[j] as f64;
                    assert!((out[r * 8 + j] as f64 - want).abs() < 1e-5, "{path:?}");
                    assert!((inp[r * 8 + j] as f64 - want).abs() < 1e-5, "{path:?}");
                }
            }
            let (cos, sin) = ([0.5f32, 1.0], [0.8f32, 0.0]);
            let mut h = [1.0f32, 2.0, 3.0, 4.0];
            rope_inplace_on(path, &mut h, &cos, &sin);
            assert_eq!(h, [1.0 * 0.5 - 3.0 * 0.8, 2.0, 3.0 * 0.5 + 0.8, 4.0]);
            let gu = [1.0f32, -2.0, 3.0, 0.5];
            let mut g = [0f32; 2];
            silu_mul_on(path, &mut g, &gu, 2);
            let silu = |z: f32| z / (1.0 + (-z).exp());
            assert!(
                (g[0] - silu(1.0) * 3.0).abs() < 1e-6 && (g[1] - silu(-2.0) * 0.5).abs() < 1e-6
            );
            let mut ln = vec![0f32; 8];
            layer_norm_on(path, &mut ln, &x[..8], &w, &w, 1e-5);
            let mean = x[..8].iter().sum::<f32>() / 8.0;
            let var = x[..8].iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 8.0;
            for j in 0..8 {
                let want = (x[j] - mean) / (var + 1e-5).sqrt() * w[j] + w[j];
                assert!((ln[j] - want).abs() < 1e-5, "{path:?}");
            }
        }
    }
}
