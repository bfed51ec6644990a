//! The action expert's CPU path on f32 slices: weights transposed and packed once when the
//! model is loaded, a prefix cache copied once into the packed layout when it is set (one
//! copy per cache row, shared by every sample of that row), every per-step buffer allocated
//! on the first call and reused after, samples split over the pool's threads.

use super::config::{Activation, ExpertConfig, InProjConfig};
use super::decoder::{inv_freq, rope_tables};
use super::in_proj::{fourier_arg, log_freqs, ENC_RMS_EPS, LN_EPS};
use super::kv::PrefixCache;
use super::weights::trunk_names;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::kernel::decoder::{self as dk, JointShape};
use crate::kernel::{self, attention, TILE_N};
use crate::step::FastVelocity;

/// A linear layer `y = x W^T + b`, kept packed (`W^T` `[k, n]` in 16-column panels,
/// [`kernel::pack_panels`]) when `n` suits the register-tiled kernel and as `W` `[n, k]`
/// otherwise (a narrow output such as `[2, W]`).
#[derive(Debug, Clone)]
struct Lin {
    w: Vec<f32>,
    wt: Vec<f32>,
    b: Vec<f32>,
    n: usize,
    k: usize,
}

impl Lin {
    fn new(w: Vec<f32>, b: Option<Vec<f32>>, n: usize, k: usize) -> Self {
        let wt = if n.is_multiple_of(TILE_N) {
            kernel::pack_panels(&kernel::transpose(&w, n, k), k, n)
        } else {
            Vec::new()
        };
        Lin {
            w,
            wt,
            b: b.unwrap_or_else(|| vec![0.0; n]),
            n,
            k,
        }
    }

    /// Columns `c0..c1` of a `[n, k]` weight, as a layer of its own.
    fn columns(w: &[f32], n: usize, k: usize, c0: usize, c1: usize, b: Option<Vec<f32>>) -> Self {
        let cols: Vec<f32> = (0..n)
            .flat_map(|r| w[r * k + c0..r * k + c1].iter().copied())
            .collect();
        Lin::new(cols, b, n, c1 - c0)
    }

    fn apply(&self, y: &mut [f32], x: &[f32], m: usize) {
        self.apply_bias(y, x, m, &self.b)
    }

    /// `y[m, n] = x[m, k] W^T + bias`.
    fn apply_bias(&self, y: &mut [f32], x: &[f32], m: usize, bias: &[f32]) {
        let (n, k) = (self.n, self.k);
        let y = &mut y[..m * n];
        if self.wt.is_empty() {
            for (yr, xr) in y.chunks_exact_mut(n).zip(x.chunks_exact(k)) {
                kernel::matvec_bias(&self.w, bias, xr, yr);
            }
            return;
        }
        for yr in y.chunks_exact_mut(n) {
            yr.copy_from_slice(bias);
        }
        kernel::matmul_panels(y, &x[..m * k], &self.wt, m, n, k);
    }
}

#[derive(Debug, Clone)]
struct Layer {
    ln_in: Vec<f32>,
    ln_post: Vec<f32>,
    /// q, k and v stacked: `[(H + 2 KV) D, W]`.
    qkv: Lin,
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    o: Lin,
    /// gate and up stacked: `[2 I, W]`.
    gu: Lin,
    down: Lin,
}

#[derive(Debug, Clone)]
enum InProj {
    Alpamayo {
        freqs: Vec<f32>,
        /// The first layer's columns of the value features (no bias).
        first_x: Lin,
        /// Its columns of the time features, with the bias (applied once per step).
        first_t: Lin,
        norms: Vec<Vec<f32>>,
        rest: Vec<Lin>,
        ln_w: Vec<f32>,
        ln_b: Vec<f32>,
    },
    Linear {
        /// The value columns.
        wx: Lin,
        /// The time column.
        wt: Vec<f32>,
        b: Vec<f32>,
    },
}

/// The packed weights.
#[derive(Debug, Clone)]
struct Net {
    l: usize,
    c: usize,
    w: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    ff: usize,
    /// The in-projection's width (the trunk's; `w` for a linear one).
    hid: usize,
    eps: f32,
    act: Activation,
    embed_scale: Option<f32>,
    causal: bool,
    inv_freq: Vec<f32>,
    in_proj: InProj,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    out: Lin,
}

/// The prefix cache in the kernels' layout: per cache row, layer and kv head the keys
/// transposed `[D, Pp]` and the values `[Pp, Dp]`, zero-padded to the tile, each in
/// 16-column panels ([`kernel::panel_index`]).
#[derive(Debug, Clone, Default)]
struct Cache {
    rows: usize,
    layers: usize,
    nkv: usize,
    p: usize,
    pp: usize,
    hd: usize,
    dp: usize,
    kt: Vec<f32>,
    v: Vec<f32>,
    /// `[rows, p]` (empty: no mask).
    mask: Vec<f32>,
    offset: Option<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Cache {
    fn block(&self, row: usize, layer: usize, head: usize) -> usize {
        (row * self.layers + layer) * self.nkv + head
    }
    fn kt(&self, row: usize, layer: usize, head: usize) -> &[f32] {
        let n = self.hd * self.pp;
        let i = self.block(row, layer, head);
        &self.kt[i * n..(i + 1) * n]
    }
    fn v(&self, row: usize, layer: usize, head: usize) -> &[f32] {
        let n = self.pp * self.dp;
        let i = self.block(row, layer, head);
        &self.v[i * n..(i + 1) * n]
    }
    fn mask(&self, row: usize) -> Option<&[f32]> {
        (!self.mask.is_empty()).then(|| &self.mask[row * self.p..(row + 1) * self.p])
    }
}

/// Per-step buffers of one thread, for its rows.
#[derive(Debug, Clone, Default)]
struct Bufs {
    rows: usize,
    args: Vec<f32>,
    sin: Vec<f32>,
    cos: Vec<f32>,
    feats: Vec<f32>,
    a: Vec<f32>,
    a2: Vec<f32>,
    h: Vec<f32>,
    r: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    gu: Vec<f32>,
    g: Vec<f32>,
    y: Vec<f32>,
    q: Vec<f32>,
    kto: Vec<f32>,
    vo: Vec<f32>,
    sp: Vec<f32>,
    so: Vec<f32>,
    oh: Vec<f32>,
}

/// Writes `row` as row `j` of a `[k, n]` weight in [`kernel::pack_panels`]' layout (`row` may
/// be shorter than `n`: the rest is left as it is).
fn scatter_row(w: &mut [f32], row: &[f32], j: usize, k: usize) {
    for (c0, part) in row.chunks(TILE_N).enumerate() {
        let at = kernel::panel_index(c0 * TILE_N, j, k);
        w[at..at + part.len()].copy_from_slice(part);
    }
}

/// Makes `v` hold `n` zeros, reusing its memory (no allocation when it already holds `n`).
fn zeroed(v: &mut Vec<f32>, n: usize) {
    if v.len() == n {
        v.fill(0.0);
    } else {
        v.clear();
        v.resize(n, 0.0);
    }
}

/// An action expert prepared for CPU f32 sampling: see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct FastExpert {
    net: Net,
    cache: Cache,
    tterm: Vec<f32>,
    bufs: Vec<Bufs>,
}

impl FastExpert {
    /// Packs the weights of a loaded expert.
    pub(crate) fn new(cfg: &ExpertConfig, w: &Weights) -> Result<Self> {
        let d = &cfg.decoder;
        let tr = d.family.traits();
        let [l, c] = cfg.action_dims;
        let (width, nh, nkv, hd, ff) = (
            d.hidden_size,
            d.num_attention_heads,
            d.num_key_value_heads,
            d.head_dim,
            d.intermediate_size,
        );
        let norm = |name: &str| -> Result<Vec<f32>> {
            let mut v = w.vec(name)?;
            if tr.norm_unit_offset {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            Ok(v)
        };
        let (in_proj, hid) = match &cfg.in_proj {
            InProjConfig::Linear => {
                let wv = w.vec("action_in_proj.weight")?;
                let wt: Vec<f32> = (0..width).map(|r| wv[r * (c + 1) + c]).collect();
                (
                    InProj::Linear {
                        wx: Lin::columns(&wv, width, c + 1, 0, c, None),
                        wt,
                        b: w.vec("action_in_proj.bias")?,
                    },
                    width,
                )
            }
            InProjConfig::AlpamayoPerWaypointV2 {
                hidden_size,
                num_enc_layers,
                max_freq,
                num_fourier_feats,
            } => {
                let nf = *num_fourier_feats;
                let (lins, norms) = trunk_names(*num_enc_layers);
                let w0 = w.vec(&format!("{}.weight", lins[0]))?;
                let k0 = (c + 1) * nf;
                let b0 = w.vec(&format!("{}.bias", lins[0]))?;
                let rest = lins[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let n = if i + 2 == lins.len() {
                            width
                        } else {
                            *hidden_size
                        };
                        Ok(Lin::new(
                            w.vec(&format!("{name}.weight"))?,
                            Some(w.vec(&format!("{name}.bias"))?),
                            n,
                            *hidden_size,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                (
                    InProj::Alpamayo {
                        freqs: log_freqs(*max_freq, nf / 2),
                        first_x: Lin::columns(&w0, *hidden_size, k0, 0, c * nf, None),
                        first_t: Lin::columns(&w0, *hidden_size, k0, c * nf, k0, Some(b0)),
                        norms: norms.iter().map(|n| w.vec(n)).collect::<Result<Vec<_>>>()?,
                        rest,
                        ln_w: w.vec("action_in_proj.norm.weight")?,
                        ln_b: w.vec("action_in_proj.norm.bias")?,
                    },
                    *hidden_size,
                )
            }
        };
        let layers = (0..d.num_hidden_layers)
            .map(|i| {
                let p = format!("expert.layers.{i}");
                let a = |s: &str| format!("{p}.self_attn.{s}");
                let n3 = (nh + 2 * nkv) * hd;
                let mut qkv_w = w.vec(&a("q_proj.weight"))?;
                qkv_w.extend(w.vec(&a("k_proj.weight"))?);
                qkv_w.extend(w.vec(&a("v_proj.weight"))?);
                let qkv_b = if tr.qkv_bias {
                    let mut b = w.vec(&a("q_proj.bias"))?;
                    b.extend(w.vec(&a("k_proj.bias"))?);
                    b.extend(w.vec(&a("v_proj.bias"))?);
                    Some(b)
                } else {
                    None
                };
                let mut gu_w = w.vec(&format!("{p}.mlp.gate_proj.weight"))?;
                gu_w.extend(w.vec(&format!("{p}.mlp.up_proj.weight"))?);
                Ok(Layer {
                    ln_in: norm(&format!("{p}.input_layernorm.weight"))?,
                    ln_post: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                    qkv: Lin::new(qkv_w, qkv_b, n3, width),
                    qk_norm: if tr.qk_norm {
                        Some((norm(&a("q_norm.weight"))?, norm(&a("k_norm.weight"))?))
                    } else {
                        None
                    },
                    o: Lin::new(w.vec(&a("o_proj.weight"))?, None, width, nh * hd),
                    gu: Lin::new(gu_w, None, 2 * ff, width),
                    down: Lin::new(
                        w.vec(&format!("{p}.mlp.down_proj.weight"))?,
                        None,
                        width,
                        ff,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let net = Net {
            l,
            c,
            w: width,
            nh,
            nkv,
            hd,
            ff,
            hid,
            eps: d.rms_norm_eps as f32,
            act: tr.activation,
            embed_scale: tr.embed_scale.then(|| (width as f32).sqrt()),
            causal: !cfg.non_causal,
            inv_freq: inv_freq(d),
            in_proj,
            layers,
            norm: norm("expert.norm.weight")?,
            out: Lin::new(
                w.vec("action_out_proj.weight")?,
                Some(w.vec("action_out_proj.bias")?),
                c,
                width,
            ),
        };
        Ok(FastExpert {
            tterm: vec![0.0; hid],
            net,
            cache: Cache::default(),
            bufs: Vec::new(),
        })
    }

    /// Copies `cache` (already checked against the config) into the packed layout, reusing
    /// the buffers when its shape is the one before.
    pub(crate) fn set_cache(&mut self, src: &PrefixCache) {
        let net = &self.net;
        let c = &mut self.cache;
        let (p, hd) = (src.len(), net.hd);
        let shape = (src.batch(), net.layers.len(), net.nkv, p, hd);
        if (c.rows, c.layers, c.nkv, c.p, c.hd) != shape {
            c.rows = src.batch();
            c.layers = net.layers.len();
            c.nkv = net.nkv;
            c.p = p;
            c.hd = hd;
            c.pp = p.next_multiple_of(TILE_N);
            c.dp = hd.next_multiple_of(TILE_N);
            let blocks = c.rows * c.layers * c.nkv;
            // Padding must be zero; only the valid parts are written below, so zero the
            // buffers only when the layout changes.
            zeroed(&mut c.kt, blocks * hd * c.pp);
            zeroed(&mut c.v, blocks * c.pp * c.dp);
        }
        let (pp, dp) = (c.pp, c.dp);
        for row in 0..c.rows {
            for layer in 0..c.layers {
                let (ks, vs) = (src.keys(layer), src.values(layer));
                for head in 0..c.nkv {
                    let at = ((row * c.nkv) + head) * p * hd;
                    let i = c.block(row, layer, head);
                    let kt = &mut c.kt[i * hd * pp..(i + 1) * hd * pp];
                    let kin = &ks[at..at + p * hd];
                    // In 16-token blocks: one panel of K^T, written in order, while the
                    // block's keys stay in L1.
                    for jb in (0..p).step_by(TILE_N) {
                        for e in 0..hd {
                            let at = kernel::panel_index(jb, e, hd);
                            let panel = &mut kt[at..at + TILE_N];
                            for (j, d) in (jb..(jb + TILE_N).min(p)).zip(panel.iter_mut()) {
                                *d = kin[j * hd + e];
                            }
                        }
                    }
                    let v = &mut c.v[i * pp * dp..(i + 1) * pp * dp];
                    for (j, vr) in vs[at..at + p * hd].chunks_exact(hd).enumerate() {
                        scatter_row(v, vr, j, pp);
                    }
                }
            }
        }
        match (0..c.rows).all(|r| src.mask_row(r).is_none()) {
            true => c.mask.clear(),
            false => {
                c.mask.resize(c.rows * p, 1.0);
                for r in 0..c.rows {
                    if let Some(m) = src.mask_row(r) {
                        c.mask[r * p..(r + 1) * p].copy_from_slice(m);
                    }
                }
            }
        }
        let half = hd / 2;
        if c.offset != Some(src.position_offset()) || c.cos.len() != net.l * half {
            c.cos.resize(net.l * half, 0.0);
            c.sin.resize(net.l * half, 0.0);
            rope_tables(
                &net.inv_freq,
                src.position_offset(),
                net.l,
                &mut c.cos,
                &mut c.sin,
            );
            c.offset = Some(src.position_offset());
        }
    }

    /// The model's velocity (in its own time convention) of every row of `x` `[B, L, C]` at
    /// the model time `t`.
    pub(crate) fn forward(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        let net = &self.net;
        let d = net.l * net.c;
        if x.len() != out.len() || x.is_empty() || !x.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "fast velocity buffers",
                format!("x {} and out {} elements", x.len(), out.len()),
                format!("equal lengths, a nonzero multiple of L * C = {d}"),
            ));
        }
        let rows = x.len() / d;
        let crows = self.cache.rows;
        if crows == 0 {
            return Err(Error::invalid(
                "prefix cache",
                "none",
                "a prefix cache set with ActionExpert::set_condition",
            ));
        }
        if !rows.is_multiple_of(crows) {
            return Err(Error::PrefixCache {
                what: "batch (cache rows)".into(),
                expected: format!("1 or a divisor of the {rows} samples"),
                got: crows.to_string(),
            });
        }
        let per = rows / crows;
        net.time_term(t, &mut self.tterm);
        let parts = kernel::available_threads().min(rows).max(1);
        let chunk = rows.div_ceil(parts);
        let parts = rows.div_ceil(chunk);
        if self.bufs.len() != parts {
            self.bufs = vec![Bufs::default(); parts];
        }
        let (cache, tterm) = (&self.cache, self.tterm.as_slice());
        let run = |i: usize, b: &mut Bufs, xs: &[f32], os: &mut [f32]| {
            net.forward_rows(cache, b, xs, i * chunk, per, tterm, os)
        };
        if parts == 1 {
            run(0, &mut self.bufs[0], x, out);
        } else {
            use rayon::prelude::*;
            self.bufs
                .par_iter_mut()
                .zip(x.par_chunks(chunk * d).zip(out.par_chunks_mut(chunk * d)))
                .enumerate()
                .for_each(|(i, (b, (xs, os)))| run(i, b, xs, os));
        }
        Ok(())
    }
}

impl Net {
    /// The in-projection's time term shared by every token: its first layer's time columns
    /// and bias (alpamayo), or the time column and bias (linear).
    fn time_term(&self, t: f32, out: &mut [f32]) {
        match &self.in_proj {
            InProj::Alpamayo { freqs, first_t, .. } => {
                let nf = 2 * freqs.len();
                let mut tf = [0f32; 256];
                let mut heap;
                let tf: &mut [f32] = if nf <= tf.len() {
                    &mut tf[..nf]
                } else {
                    heap = vec![0f32; nf];
                    &mut heap
                };
                super::in_proj::fourier_into(t, freqs, tf);
                first_t.apply(out, tf, 1);
            }
            InProj::Linear { wt, b, .. } => {
                for ((o, &w), &bi) in out.iter_mut().zip(wt).zip(b) {
                    *o = bi + t * w;
                }
            }
        }
    }

    fn resize(&self, b: &mut Bufs, rows: usize) {
        if b.rows == rows {
            return;
        }
        let t = rows * self.l;
        let nf = match &self.in_proj {
            InProj::Alpamayo { freqs, .. } => 2 * freqs.len(),
            InProj::Linear { .. } => 0,
        };
        let n3 = (self.nh + 2 * self.nkv) * self.hd;
        let g = self.nh / self.nkv;
        let lp = self.l.next_multiple_of(TILE_N);
        let dp = self.hd.next_multiple_of(TILE_N);
        b.rows = rows;
        b.args = vec![0.0; t * self.c * nf / 2];
        b.sin = b.args.clone();
        b.cos = b.args.clone();
        b.feats = vec![0.0; t * self.c * nf];
        b.a = vec![0.0; t * self.hid.max(self.w)];
        b.a2 = b.a.clone();
        b.h = vec![0.0; t * self.w];
        b.r = b.h.clone();
        b.y = b.h.clone();
        b.qkv = vec![0.0; t * n3];
        b.o = vec![0.0; t * self.nh * self.hd];
        b.gu = vec![0.0; t * 2 * self.ff];
        b.g = vec![0.0; t * self.ff];
        b.q = vec![0.0; g * self.l * self.hd];
        b.kto = vec![0.0; self.hd * lp];
        b.vo = vec![0.0; lp * dp];
        b.so = vec![0.0; g * self.l * lp];
        b.oh = vec![0.0; g * self.l * dp];
        b.sp = Vec::new();
    }

    /// The in-projection of the rows of `x` into `b.h`.
    fn in_proj(&self, b: &mut Bufs, x: &[f32], tterm: &[f32], toks: usize) {
        match &self.in_proj {
            InProj::Linear { wx, .. } => {
                wx.apply_bias(&mut b.h, x, toks, tterm);
            }
            InProj::Alpamayo {
                freqs,
                first_x,
                norms,
                rest,
                ln_w,
                ln_b,
                ..
            } => {
                let half = freqs.len();
                for (v, args) in x.iter().zip(b.args.chunks_exact_mut(half)) {
                    for (a, &f) in args.iter_mut().zip(freqs) {
                        *a = fourier_arg(*v, f);
                    }
                }
                attention::sin_cos_scaled(
                    &b.args,
                    &mut b.sin,
                    &mut b.cos,
                    std::f32::consts::SQRT_2,
                );
                for (i, f) in b.feats.chunks_exact_mut(2 * half).enumerate() {
                    f[..half].copy_from_slice(&b.sin[i * half..(i + 1) * half]);
                    f[half..].copy_from_slice(&b.cos[i * half..(i + 1) * half]);
                }
                let hid = self.hid;
                first_x.apply_bias(&mut b.a, &b.feats, toks, tterm);
                kernel::silu_inplace(&mut b.a[..toks * hid]);
                for (i, (nw, lin)) in norms.iter().zip(rest).enumerate() {
                    dk::rms_norm(&mut b.a2[..toks * hid], &b.a[..toks * hid], nw, ENC_RMS_EPS);
                    lin.apply(&mut b.a, &b.a2, toks);
                    if i + 1 < rest.len() {
                        kernel::silu_inplace(&mut b.a[..toks * lin.n]);
                    }
                }
                let w = self.w;
                dk::layer_norm(&mut b.h[..toks * w], &b.a[..toks * w], ln_w, ln_b, LN_EPS);
            }
        }
        if let Some(s) = self.embed_scale {
            b.h[..toks * self.w].iter_mut().for_each(|v| *v *= s);
        }
    }

    /// The velocity of the rows of `x` (global rows `row0 ..`, `per` samples a cache row).
    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        &self,
        cache: &Cache,
        b: &mut Bufs,
        x: &[f32],
        row0: usize,
        per: usize,
        tterm: &[f32],
        out: &mut [f32],
    ) {
        let (l, w, hd, nh, nkv) = (self.l, self.w, self.hd, self.nh, self.nkv);
        let rows = x.len() / (l * self.c);
        self.resize(b, rows);
        let toks = rows * l;
        self.in_proj(b, x, tterm, toks);
        let n3 = (nh + 2 * nkv) * hd;
        let g = nh / nkv;
        let lp = l.next_multiple_of(TILE_N);
        let (pp, dp) = (cache.pp, cache.dp);
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        if b.sp.len() != g * l * pp {
            b.sp = vec![0.0; g * l * pp];
        }
        for (li, layer) in self.layers.iter().enumerate() {
            dk::rms_norm(
                &mut b.r[..toks * w],
                &b.h[..toks * w],
                &layer.ln_in,
                self.eps,
            );
            layer.qkv.apply(&mut b.qkv, &b.r, toks);
            for (i, tok) in b.qkv[..toks * n3].chunks_exact_mut(n3).enumerate() {
                let (q, rest) = tok.split_at_mut(nh * hd);
                let k = &mut rest[..nkv * hd];
                if let Some((qn, kn)) = &layer.qk_norm {
                    dk::rms_norm_inplace(q, qn, self.eps);
                    dk::rms_norm_inplace(k, kn, self.eps);
                }
                let pos = i % l;
                let (cs, sn) = (
                    &cache.cos[pos * half..(pos + 1) * half],
                    &cache.sin[pos * half..(pos + 1) * half],
                );
                dk::rope_inplace(q, cs, sn);
                dk::rope_inplace(k, cs, sn);
            }
            for r in 0..rows {
                let crow = if cache.rows == 1 { 0 } else { (row0 + r) / per };
                let seq = &b.qkv[r * l * n3..(r + 1) * l * n3];
                for j in 0..nkv {
                    for gi in 0..g {
                        let hq = j * g + gi;
                        for i in 0..l {
                            let src = &seq[i * n3 + hq * hd..i * n3 + (hq + 1) * hd];
                            let dst = &mut b.q[(gi * l + i) * hd..(gi * l + i + 1) * hd];
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d = s * scale;
                            }
                        }
                    }
                    for i in 0..l {
                        let kk = &seq[i * n3 + (nh + j) * hd..i * n3 + (nh + j + 1) * hd];
                        for (e, &kv) in kk.iter().enumerate() {
                            b.kto[kernel::panel_index(i, e, hd)] = kv;
                        }
                        let vv =
                            &seq[i * n3 + (nh + nkv + j) * hd..i * n3 + (nh + nkv + j + 1) * hd];
                        scatter_row(&mut b.vo, vv, i, lp);
                    }
                    let m = g * l;
                    if pp > 0 {
                        kernel::matmul_panels_set(
                            &mut b.sp,
                            &b.q,
                            cache.kt(crow, li, j),
                            m,
                            pp,
                            hd,
                        );
                    }
                    kernel::matmul_panels_set(&mut b.so, &b.q, &b.kto, m, lp, hd);
                    let shape = JointShape {
                        p_stride: pp,
                        p_valid: cache.p,
                        p_mask: cache.mask(crow),
                        o_stride: lp,
                        own: l,
                        causal: self.causal,
                    };
                    dk::softmax_joint(&mut b.sp, &mut b.so, &shape);
                    kernel::matmul_panels_set(&mut b.oh, &b.so, &b.vo, m, dp, lp);
                    if pp > 0 {
                        kernel::matmul_panels(&mut b.oh, &b.sp, cache.v(crow, li, j), m, dp, pp);
                    }
                    for gi in 0..g {
                        let hq = j * g + gi;
                        for i in 0..l {
                            let o0 = (r * l + i) * nh * hd + hq * hd;
                            b.o[o0..o0 + hd]
                                .copy_from_slice(&b.oh[(gi * l + i) * dp..(gi * l + i) * dp + hd]);
                        }
                    }
                }
            }
            layer.o.apply(&mut b.y, &b.o, toks);
            kernel::add_assign(&mut b.h[..toks * w], &b.y[..toks * w]);
            dk::rms_norm(
                &mut b.r[..toks * w],
                &b.h[..toks * w],
                &layer.ln_post,
                self.eps,
            );
            layer.gu.apply(&mut b.gu, &b.r, toks);
            let ff = self.ff;
            match self.act {
                Activation::Silu => dk::silu_mul(&mut b.g[..toks * ff], &b.gu[..toks * 2 * ff], ff),
                Activation::GeluTanh => {
                    dk::gelu_mul(&mut b.g[..toks * ff], &b.gu[..toks * 2 * ff], ff)
                }
            }
            layer.down.apply(&mut b.y, &b.g, toks);
            kernel::add_assign(&mut b.h[..toks * w], &b.y[..toks * w]);
        }
        dk::rms_norm(&mut b.r[..toks * w], &b.h[..toks * w], &self.norm, self.eps);
        self.out.apply(out, &b.r, toks);
    }
}

/// [`FastExpert`] as a [`FastVelocity`] in the model's own time convention.
pub(crate) struct FastRef<'a>(pub &'a mut FastExpert);

impl FastVelocity for FastRef<'_> {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        self.0.forward(x, t, out)
    }
}
