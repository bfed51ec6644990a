//! The decoder on candle tensors (the reference path): transformers' decoder layers (RMSNorm,
//! grouped-query attention with rotary positions, gated MLP) over action tokens that attend
//! to a prefix KV cache and to each other.

use candle_core::{Device, Tensor, D};

use super::config::{Activation, DecoderConfig, ExpertConfig};
use super::in_proj::{linear, rms_norm};
use super::kv::PrefixCache;
use super::weights::Weights;
use crate::error::Result;

/// The rotary inverse frequencies `1 / theta^(2i / d)` as transformers computes them in
/// float32 (the power rounded once, then the reciprocal).
pub(crate) fn inv_freq(d: &DecoderConfig) -> Vec<f32> {
    let dim = d.head_dim;
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / ((d.rope_theta as f32 as f64).powf(e as f64) as f32)
        })
        .collect()
}

/// `cos` and `sin` `[l, head_dim / 2]` of positions `offset ..`: the argument `pos * inv_freq`
/// rounded to f32 first, as transformers' float32 matmul of the two.
pub(crate) fn rope_tables(inv: &[f32], offset: usize, l: usize, cos: &mut [f32], sin: &mut [f32]) {
    let half = inv.len();
    for i in 0..l {
        let p = (offset + i) as f32;
        for (j, &f) in inv.iter().enumerate() {
            let a = p * f;
            cos[i * half + j] = a.cos();
            sin[i * half + j] = a.sin();
        }
    }
}

/// The weight of an RMSNorm as the family applies it (`1 + w` where it offsets).
fn norm_weight(w: &Weights, name: &str, unit_offset: bool) -> Result<Tensor> {
    let t = w.get(name)?;
    Ok(if unit_offset { (t + 1.0)? } else { t.clone() })
}

/// `x cos + rotate_half(x) sin` for `x` `[B, H, L, D]` and tables `[L, D]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok(x.broadcast_mul(cos)?
        .broadcast_add(&rot.broadcast_mul(sin)?)?)
}

/// The additive mask `[B, 1, L, P + L]`: `-inf` on masked prefix tokens and, when causal,
/// on later action tokens.
fn mask(
    cache: &PrefixCache,
    rows: &[usize],
    l: usize,
    causal: bool,
    device: &Device,
) -> Result<Option<Tensor>> {
    let p = cache.len();
    let any_prefix = (0..cache.batch()).any(|r| cache.mask_row(r).is_some());
    if !causal && !any_prefix {
        return Ok(None);
    }
    let n = p + l;
    let mut m = vec![0f32; rows.len() * l * n];
    for (b, &r) in rows.iter().enumerate() {
        for i in 0..l {
            let row = &mut m[(b * l + i) * n..(b * l + i + 1) * n];
            if let Some(pm) = cache.mask_row(r) {
                for (x, &keep) in row[..p].iter_mut().zip(pm) {
                    if keep == 0.0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            if causal {
                for x in &mut row[p + i + 1..] {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (rows.len(), 1, l, n), device)?))
}

/// The decoder over tokens `h` `[B, L, W]`: sample `b` attends to cache row `rows[b]`.
pub(crate) fn forward(
    cfg: &ExpertConfig,
    w: &Weights,
    h: &Tensor,
    cache: &PrefixCache,
    rows: &[usize],
) -> Result<Tensor> {
    let d = &cfg.decoder;
    let tr = d.family.traits();
    let (b, l, width) = h.dims3()?;
    let dev = h.device();
    let (nh, nkv, hd) = (d.num_attention_heads, d.num_key_value_heads, d.head_dim);
    let group = nh / nkv;
    let eps = d.rms_norm_eps;
    let inv = inv_freq(d);
    let (mut cos, mut sin) = (vec![0f32; l * hd / 2], vec![0f32; l * hd / 2]);
    rope_tables(&inv, cache.position_offset(), l, &mut cos, &mut sin);
    let full = |t: Vec<f32>| -> Result<Tensor> {
        let t = Tensor::from_vec(t, (l, hd / 2), dev)?;
        Ok(Tensor::cat(&[&t, &t], 1)?)
    };
    let (cos, sin) = (full(cos)?, full(sin)?);
    let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect(), b, dev)?;
    let mask = mask(cache, rows, l, !cfg.non_causal, dev)?;
    let mut h = if tr.embed_scale {
        (h * (width as f64).sqrt())?
    } else {
        h.clone()
    };
    for i in 0..d.num_hidden_layers {
        let p = format!("expert.layers.{i}");
        let nw = |s: &str| norm_weight(w, &format!("{p}.{s}"), tr.norm_unit_offset);
        let r = rms_norm(&h, &nw("input_layernorm.weight")?, eps)?;
        let proj = |name: &str, heads: usize| -> Result<Tensor> {
            let bias = if tr.qkv_bias {
                Some(w.get(&format!("{p}.self_attn.{name}.bias"))?)
            } else {
                None
            };
            let y = linear(&r, w.get(&format!("{p}.self_attn.{name}.weight"))?, bias)?;
            Ok(y.reshape((b, l, heads, hd))?)
        };
        let (mut q, mut k, v) = (
            proj("q_proj", nh)?,
            proj("k_proj", nkv)?,
            proj("v_proj", nkv)?,
        );
        if tr.qk_norm {
            q = rms_norm(&q, &nw("self_attn.q_norm.weight")?, eps)?;
            k = rms_norm(&k, &nw("self_attn.k_norm.weight")?, eps)?;
        }
        let q = rope(&q.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let k = rope(&k.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let pk = cache.tensor(i, false, dev)?.index_select(&idx, 0)?;
        let pv = cache.tensor(i, true, dev)?.index_select(&idx, 0)?;
        let keys = Tensor::cat(&[&pk, &k], 2)?;
        let vals = Tensor::cat(&[&pv, &v], 2)?;
        let n = keys.dim(2)?;
        // transformers' repeat_kv: query head h reads key/value head h / group.
        let rep = |t: Tensor| -> Result<Tensor> {
            Ok(t.unsqueeze(2)?
                .broadcast_as((b, nkv, group, n, hd))?
                .reshape((b, nh, n, hd))?)
        };
        let (keys, vals) = (rep(keys)?, rep(vals)?);
        let scores = (q.matmul(&keys.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match &mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = probs
            .matmul(&vals)?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?;
        let o = linear(&o, w.get(&format!("{p}.self_attn.o_proj.weight"))?, None)?;
        h = (h + o)?;
        let r = rms_norm(&h, &nw("post_attention_layernorm.weight")?, eps)?;
        let g = linear(&r, w.get(&format!("{p}.mlp.gate_proj.weight"))?, None)?;
        let g = match tr.activation {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        let u = linear(&r, w.get(&format!("{p}.mlp.up_proj.weight"))?, None)?;
        let m = linear(
            &(g * u)?,
            w.get(&format!("{p}.mlp.down_proj.weight"))?,
            None,
        )?;
        h = (h + m)?;
    }
    rms_norm(
        &h,
        &norm_weight(w, "expert.norm.weight", tr.norm_unit_offset)?,
        eps,
    )
}
