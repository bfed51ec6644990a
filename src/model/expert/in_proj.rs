//! The in-projection: action values and the time to decoder tokens (the reference path on
//! candle tensors, and the Fourier arithmetic the fast path shares).

use candle_core::{DType, Tensor, D};

use super::config::{ExpertConfig, InProjConfig};
use super::weights::{trunk_names, Weights};
use crate::error::Result;

/// RMSNorm epsilon of alpamayo's `MLPEncoder` (`RMSNorm(hidden, eps=1e-5)`).
pub(crate) const ENC_RMS_EPS: f32 = 1e-5;
/// LayerNorm epsilon of the in-projection's final `nn.LayerNorm` (PyTorch's default).
pub(crate) const LN_EPS: f32 = 1e-5;

/// `torch.logspace(0, log10(max_freq), half)` in float32, with its two-sided arithmetic: the
/// step is `end / (n - 1)` in f32, the first half `10^(step i)`, the second `10^(end - step (n-1-i))`.
pub(crate) fn log_freqs(max_freq: f64, half: usize) -> Vec<f32> {
    let end = max_freq.log10() as f32;
    if half == 1 {
        return vec![1.0];
    }
    let step = end / (half - 1) as f32;
    (0..half)
        .map(|i| {
            let e = if i < half / 2 {
                step * i as f32
            } else {
                end - step * (half - 1 - i) as f32
            };
            10f32.powf(e)
        })
        .collect()
}

/// The Fourier argument `((v * f) * 2) * pi`, rounded as alpamayo's `x[..., None] * freqs * 2 * pi`.
#[inline(always)]
pub(crate) fn fourier_arg(v: f32, f: f32) -> f32 {
    ((v * f) * 2.0) * std::f32::consts::PI
}

/// Features of one value: `sin(arg) sqrt 2` for every frequency, then the cosines.
pub(crate) fn fourier_into(v: f32, freqs: &[f32], out: &mut [f32]) {
    let n = freqs.len();
    for (i, &f) in freqs.iter().enumerate() {
        let a = fourier_arg(v, f);
        out[i] = a.sin() * std::f32::consts::SQRT_2;
        out[n + i] = a.cos() * std::f32::consts::SQRT_2;
    }
}

/// `x W^T + b` over the last dimension.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension (w already offset when the family
/// scales by `1 + w`).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// The in-projection on tensors: `x` `[B, L, C]` and per-row times `t` (the model's own
/// time) to tokens `[B, L, W]`.
pub(crate) fn forward(cfg: &ExpertConfig, w: &Weights, x: &Tensor, t: &[f32]) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    let dev = x.device();
    match &cfg.in_proj {
        InProjConfig::Linear => {
            let tt = Tensor::from_slice(t, (b, 1, 1), dev)?.broadcast_as((b, l, 1))?;
            let inp = Tensor::cat(&[x, &tt], 2)?;
            linear(
                &inp,
                w.get("action_in_proj.weight")?,
                Some(w.get("action_in_proj.bias")?),
            )
        }
        InProjConfig::AlpamayoPerWaypointV2 {
            num_enc_layers,
            max_freq,
            num_fourier_feats,
            ..
        } => {
            let freqs = log_freqs(*max_freq, num_fourier_feats / 2);
            let nf = *num_fourier_feats;
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let per_tok = (c + 1) * nf;
            let mut feats = vec![0f32; b * l * per_tok];
            let mut tf = vec![0f32; nf];
            for r in 0..b {
                fourier_into(t[r], &freqs, &mut tf);
                for i in 0..l {
                    let tok = &mut feats[(r * l + i) * per_tok..(r * l + i + 1) * per_tok];
                    for ch in 0..c {
                        fourier_into(
                            xs[(r * l + i) * c + ch],
                            &freqs,
                            &mut tok[ch * nf..(ch + 1) * nf],
                        );
                    }
                    tok[c * nf..].copy_from_slice(&tf);
                }
            }
            let mut h = Tensor::from_vec(feats, (b * l, per_tok), dev)?;
            let (lins, norms) = trunk_names(*num_enc_layers);
            for (i, name) in lins.iter().enumerate() {
                if i > 0 {
                    h = rms_norm(&h, w.get(&norms[i - 1])?, ENC_RMS_EPS as f64)?;
                }
                h = linear(
                    &h,
                    w.get(&format!("{name}.weight"))?,
                    Some(w.get(&format!("{name}.bias"))?),
                )?;
                if i + 1 < lins.len() {
                    h = candle_nn::ops::silu(&h)?;
                }
            }
            let mean = h.mean_keepdim(D::Minus1)?;
            let cen = h.broadcast_sub(&mean)?;
            let var = cen.sqr()?.mean_keepdim(D::Minus1)?;
            let n = cen.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?;
            let out = n
                .broadcast_mul(w.get("action_in_proj.norm.weight")?)?
                .broadcast_add(w.get("action_in_proj.norm.bias")?)?;
            let width = out.dim(1)?;
            Ok(out.reshape((b, l, width))?.to_dtype(DType::F32)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_freqs_are_torch_logspace() {
        // torch.logspace(0, 1, 10) in float32, printed with 9 digits.
        let want = [
            1.0f64, 1.29154967, 1.66810054, 2.15443469, 2.78255940, 3.59381366, 4.64158883,
            5.99484250, 7.74263683, 10.0,
        ];
        for (g, w) in log_freqs(10.0, 10).iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w, "{g} vs {w}");
        }
    }

    #[test]
    fn trunk_names_follow_the_sequential_indices() {
        let (l, n) = trunk_names(2);
        assert_eq!(
            l,
            ["0", "3", "6"].map(|i| format!("action_in_proj.encoder.trunk.{i}"))
        );
        assert_eq!(
            n,
            ["2", "5"].map(|i| format!("action_in_proj.encoder.trunk.{i}.weight"))
        );
    }
}
