//! The waypoint transformer's CPU sampling path on f32 slices: the weights copied and
//! transposed once per run, every per-step buffer allocated once, the condition's embedding
//! computed once per run and the time's once per step (it is shared by every row). Small
//! batches (the control loop's 6 trajectories) are dominated by per-op overhead in candle and
//! PyTorch; here a step is a handful of register-tiled matmuls and plain loops.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernel::attention::{self, AttentionScratch};
use crate::kernel::{self, TILE_N};
use crate::model::cond::Condition;
use crate::model::transformer::{TransformerConditioned, WaypointTransformer, LN_EPS};
use crate::step::{FastVelocity, StepFn};

/// `2 pi` rounded to float32 first, as the reference computes `((2*pi) * v) * f`.
const TWO_PI_F32: f32 = 2.0 * std::f32::consts::PI;

/// A linear layer `y = x W^T + b` kept as `W` `[n, k]` and, when `n` suits the register-tiled
/// kernel, `W^T` `[k, n]`.
#[derive(Debug, Clone)]
pub(crate) struct Lin {
    pub(crate) w: Vec<f32>,
    pub(crate) wt: Vec<f32>,
    pub(crate) b: Vec<f32>,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl Lin {
    pub(crate) fn new(model: &WaypointTransformer, name: &str) -> Result<Self> {
        Self::from(
            model.get(&format!("{name}.weight")),
            model.get(&format!("{name}.bias")),
        )
    }

    pub(crate) fn from(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let wt = if n.is_multiple_of(TILE_N) {
            kernel::transpose(&w, n, k)
        } else {
            Vec::new()
        };
        Ok(Lin {
            w,
            wt,
            b: b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            n,
            k,
        })
    }

    /// `y[m, n] = x[m, k] W^T + b`.
    pub(crate) fn apply(&self, y: &mut [f32], x: &[f32], m: usize) {
        let (n, k) = (self.n, self.k);
        if self.wt.is_empty() || m == 1 {
            for r in 0..m {
                kernel::matvec_bias(
                    &self.w,
                    &self.b,
                    &x[r * k..(r + 1) * k],
                    &mut y[r * n..(r + 1) * n],
                );
            }
            return;
        }
        for r in 0..m {
            y[r * n..(r + 1) * n].copy_from_slice(&self.b);
        }
        kernel::matmul_packed(&mut y[..m * n], &x[..m * k], &self.wt, m, n, k);
    }
}

#[derive(Debug, Clone)]
struct Block {
    ada: Lin,
    qkv: Lin,
    proj: Lin,
    mlp0: Lin,
    mlp2: Lin,
}

/// Per-step buffers for `rows` samples (one set per thread).
#[derive(Debug, Default, Clone)]
struct Buffers {
    rows: usize,
    args: Vec<f32>,
    sin: Vec<f32>,
    cos: Vec<f32>,
    tok: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    f: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    attn: AttentionScratch,
}

/// Tokens per thread below which a second thread costs more than it saves: a token is about
/// 0.1 MFLOP per block, so 64 of them are tens of microseconds against a hand-off of a few.
const MIN_TOKENS_PER_THREAD: usize = 64;

/// The weights of a [`FastTransformer`], shared by its threads.
#[derive(Debug, Clone)]
struct Net {
    l: usize,
    c: usize,
    w: usize,
    heads: usize,
    ff: usize,
    freqs: Vec<f32>,
    value_freqs: Vec<f32>,
    /// token_embed.0 restricted to the value features `[W, C P]` (its time columns are
    /// applied once per step).
    tok0_x: Lin,
    /// token_embed.0's time columns `[W, P]` with its bias.
    tok0_t: Lin,
    tok2: Lin,
    pos: Vec<f32>,
    time0: Lin,
    time2: Lin,
    blocks: Vec<Block>,
    final_ada: Lin,
    final_out: Lin,
}

/// A [`WaypointTransformer`] prepared for CPU f32 sampling under a fixed condition.
#[derive(Debug, Clone)]
pub struct FastTransformer {
    net: Net,
    /// The condition's embedding `[rows, W]` (the null one repeated), or `None` for an
    /// unconditional model.
    cond: Option<Vec<f32>>,
    bufs: Vec<Buffers>,
}

impl FastTransformer {
    /// Prepares `model` under `cond` (`None`: the null condition for every row); `None` when
    /// the model is not on the CPU or the condition does not fit (the tensor path then runs
    /// and reports the error).
    pub fn new(model: &WaypointTransformer, cond: Option<&Condition>) -> Option<Self> {
        Self::try_new(model, cond).ok()
    }

    fn try_new(model: &WaypointTransformer, cond: Option<&Condition>) -> Result<Self> {
        if !model.device().is_cpu() {
            return Err(Error::invalid("device", "not the CPU", "the CPU"));
        }
        let cfg = model.config();
        let (l, c, w, p) = (cfg.len(), cfg.channels(), cfg.width, cfg.per_value());
        let vec = |k: &str| -> Result<Vec<f32>> {
            Ok(model
                .get(k)
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?)
        };
        let w0 = model.get("token_embed.0.weight");
        let b0 = model.get("token_embed.0.bias");
        let tok0_x = Lin::from(&w0.narrow(1, 0, c * p)?.contiguous()?, &b0.zeros_like()?)?;
        let tok0_t = Lin::from(&w0.narrow(1, c * p, p)?.contiguous()?, b0)?;
        let cond = match (&cfg.cond_dims, cond) {
            (None, None) => None,
            (None, Some(_)) => return Err(Error::invalid("condition", "given", "none")),
            (Some(_), Some(Condition::Labels(_))) => {
                return Err(Error::invalid("condition", "labels", "features"))
            }
            (Some(_), None) => Some(vec("cond_null")?),
            (Some(_), Some(cnd @ Condition::Features { values, .. })) => {
                // The condition's embedding through the tensor path, once per run.
                let b = values.dim(0)?;
                match model.forward_cond_embedding(Some(cnd), b)? {
                    Some(s) => Some(s.detach().flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                }
            }
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let n = |s: &str| format!("blocks.{i}.{s}");
                Ok(Block {
                    ada: Lin::new(model, &n("ada"))?,
                    qkv: Lin::new(model, &n("qkv"))?,
                    proj: Lin::new(model, &n("proj"))?,
                    mlp0: Lin::new(model, &n("mlp.0"))?,
                    mlp2: Lin::new(model, &n("mlp.2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let net = Net {
            l,
            c,
            w,
            heads: cfg.heads,
            ff: cfg.mlp_hidden,
            freqs: vec("freqs")?,
            value_freqs: vec("value_freqs")?,
            tok0_x,
            tok0_t,
            tok2: Lin::new(model, "token_embed.2")?,
            pos: vec("pos_embed")?,
            time0: Lin::new(model, "time_embed.0")?,
            time2: Lin::new(model, "time_embed.2")?,
            blocks,
            final_ada: Lin::new(model, "final_ada")?,
            final_out: Lin::new(model, "final_out")?,
        };
        Ok(FastTransformer {
            net,
            cond,
            bufs: Vec::new(),
        })
    }

    /// The velocity of every row of `x` `[rows, L, C]` at the shared time `t`, the rows split
    /// over the pool's threads when each gets at least [`MIN_TOKENS_PER_THREAD`] tokens.
    fn forward(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        let net = &self.net;
        let (l, w) = (net.l, net.w);
        let d = l * net.c;
        let rows = x.len() / d;
        if let Some(k) = &self.cond {
            if k.len() != w && k.len() != rows * w {
                return Err(Error::invalid(
                    "batch",
                    rows,
                    format!("{} rows, one per condition row", k.len() / w),
                ));
            }
        }
        let (tterm, st) = net.time_terms(t);
        let parts = (rows * l / MIN_TOKENS_PER_THREAD)
            .clamp(1, kernel::available_threads().min(rows.max(1)));
        let per = rows.div_ceil(parts).max(1);
        if self.bufs.len() != parts {
            self.bufs = vec![Buffers::default(); parts];
        }
        let cond = self.cond.as_deref();
        let run = |i: usize, buf: &mut Buffers, xs: &[f32], os: &mut [f32]| {
            let k = cond.map(|k| {
                if k.len() == w {
                    k
                } else {
                    &k[i * per * w..i * per * w + xs.len() / d * w]
                }
            });
            net.forward_rows(buf, xs, k, &tterm, &st, os);
        };
        if parts == 1 {
            run(0, &mut self.bufs[0], x, out);
        } else {
            use rayon::prelude::*;
            self.bufs
                .par_iter_mut()
                .zip(x.par_chunks(per * d).zip(out.par_chunks_mut(per * d)))
                .enumerate()
                .for_each(|(i, (buf, (xs, os)))| run(i, buf, xs, os));
        }
        Ok(())
    }
}

impl Net {
    fn fourier(freqs: &[f32], v: f32, out: &mut [f32]) {
        let f = freqs.len();
        out[0] = v;
        let tv = TWO_PI_F32 * v;
        for (i, fr) in freqs.iter().enumerate() {
            let a = tv * fr;
            out[1 + i] = a.sin() * std::f32::consts::SQRT_2;
            out[1 + f + i] = a.cos() * std::f32::consts::SQRT_2;
        }
    }

    /// The time's terms shared by every row: the token embedding's time term `[W]` and the
    /// time embedding `[W]`.
    fn time_terms(&self, t: f32) -> (Vec<f32>, Vec<f32>) {
        let w = self.w;
        let mut ft = vec![0.0; 1 + 2 * self.freqs.len()];
        Self::fourier(&self.freqs, t, &mut ft);
        let mut tterm = vec![0.0; w];
        self.tok0_t.apply(&mut tterm, &ft, 1);
        let mut s1 = vec![0.0; w];
        self.time0.apply(&mut s1, &ft, 1);
        kernel::silu_inplace(&mut s1);
        let mut st = vec![0.0; w];
        self.time2.apply(&mut st, &s1, 1);
        (tterm, st)
    }

    fn resize(&self, b: &mut Buffers, rows: usize) {
        if b.rows == rows {
            return;
        }
        let (l, w, f) = (self.l, self.w, self.value_freqs.len());
        let p = 1 + 2 * f;
        let t = rows * l;
        b.rows = rows;
        b.args = vec![0.0; t * self.c * f];
        b.sin = vec![0.0; t * self.c * f];
        b.cos = vec![0.0; t * self.c * f];
        b.tok = vec![0.0; t * self.c * p];
        b.h = vec![0.0; t * w];
        b.a = vec![0.0; t * w.max(self.ff)];
        b.qkv = vec![0.0; t * 3 * w];
        b.o = vec![0.0; t * w];
        b.f = vec![0.0; t * self.ff.max(w)];
        b.s = vec![0.0; rows * w];
        b.m = vec![0.0; rows * 6 * w];
    }

    /// The velocity of the rows of `x` under their condition embeddings `cond` (one `[W]` row
    /// for all, or one per row).
    fn forward_rows(
        &self,
        buf: &mut Buffers,
        x: &[f32],
        cond: Option<&[f32]>,
        tterm: &[f32],
        st: &[f32],
        out: &mut [f32],
    ) {
        let (l, c, w) = (self.l, self.c, self.w);
        let rows = x.len() / (l * c);
        self.resize(buf, rows);
        let toks = rows * l;
        // s = silu(time + condition) per row.
        for r in 0..rows {
            let s = &mut buf.s[r * w..(r + 1) * w];
            s.copy_from_slice(st);
            if let Some(k) = cond {
                let kr = if k.len() == w {
                    k
                } else {
                    &k[r * w..(r + 1) * w]
                };
                kernel::add_assign(s, kr);
            }
        }
        kernel::silu_inplace(&mut buf.s[..rows * w]);
        // Tokens: value features, then the token MLP and the positional embedding.
        let (f, p) = (self.value_freqs.len(), 1 + 2 * self.value_freqs.len());
        for (v, args) in x.iter().zip(buf.args.chunks_exact_mut(f)) {
            let tv = TWO_PI_F32 * v;
            for (a, fr) in args.iter_mut().zip(&self.value_freqs) {
                *a = tv * fr;
            }
        }
        attention::sin_cos_scaled(
            &buf.args,
            &mut buf.sin,
            &mut buf.cos,
            std::f32::consts::SQRT_2,
        );
        for (i, (&v, tok)) in x.iter().zip(buf.tok.chunks_exact_mut(p)).enumerate() {
            tok[0] = v;
            tok[1..1 + f].copy_from_slice(&buf.sin[i * f..(i + 1) * f]);
            tok[1 + f..].copy_from_slice(&buf.cos[i * f..(i + 1) * f]);
        }
        let a = &mut buf.a[..toks * w];
        self.tok0_x.apply(a, &buf.tok, toks);
        for row in a.chunks_exact_mut(w) {
            kernel::add_assign(row, tterm);
        }
        kernel::silu_inplace(a);
        self.tok2.apply(&mut buf.h, a, toks);
        for seq in buf.h.chunks_exact_mut(l * w) {
            kernel::add_assign(seq, &self.pos);
        }
        let ff = self.ff;
        for blk in &self.blocks {
            blk.ada.apply(&mut buf.m, &buf.s, rows);
            let m = &buf.m;
            modulate(&buf.h, &mut buf.a, m, 0, 1, rows, l, w);
            blk.qkv.apply(&mut buf.qkv, &buf.a[..toks * w], toks);
            attention::attention(&buf.qkv, &mut buf.o, &mut buf.attn, rows, l, w, self.heads);
            blk.proj.apply(&mut buf.a[..toks * w], &buf.o, toks);
            gated_add(&mut buf.h, &buf.a, m, 2, rows, l, w);
            modulate(&buf.h, &mut buf.a, m, 3, 4, rows, l, w);
            blk.mlp0
                .apply(&mut buf.f[..toks * ff], &buf.a[..toks * w], toks);
            kernel::silu_inplace(&mut buf.f[..toks * ff]);
            blk.mlp2
                .apply(&mut buf.a[..toks * w], &buf.f[..toks * ff], toks);
            gated_add(&mut buf.h, &buf.a, m, 5, rows, l, w);
        }
        // Final modulation (shift, scale: the first two chunks) and the output projection.
        let fm = &mut buf.m[..rows * 2 * w];
        self.final_ada.apply(fm, &buf.s, rows);
        for r in 0..rows {
            let (o, hs) = ((r * l) * w, &buf.h[r * l * w..(r + 1) * l * w]);
            let (shift, scale) = fm[r * 2 * w..(r + 1) * 2 * w].split_at(w);
            attention::layer_norm_modulate(
                &mut buf.a[o..o + l * w],
                hs,
                shift,
                scale,
                LN_EPS as f32,
            );
        }
        self.final_out.apply(out, &buf.a[..toks * w], toks);
    }
}

/// `a = LN(h) (1 + scale) + shift` per token, `shift`/`scale` chunks `js`/`jc` of each row's
/// `[6W]` modulation.
#[allow(clippy::too_many_arguments)]
fn modulate(
    h: &[f32],
    a: &mut [f32],
    m: &[f32],
    js: usize,
    jc: usize,
    rows: usize,
    l: usize,
    w: usize,
) {
    for r in 0..rows {
        let mr = &m[r * 6 * w..(r + 1) * 6 * w];
        let (shift, scale) = (&mr[js * w..(js + 1) * w], &mr[jc * w..(jc + 1) * w]);
        let seq = r * l * w..(r + 1) * l * w;
        attention::layer_norm_modulate(&mut a[seq.clone()], &h[seq], shift, scale, LN_EPS as f32);
    }
}

/// `h += gate * a` per token, `gate` chunk `jg` of each row's modulation.
fn gated_add(h: &mut [f32], a: &[f32], m: &[f32], jg: usize, rows: usize, l: usize, w: usize) {
    for r in 0..rows {
        let gate = &m[r * 6 * w + jg * w..r * 6 * w + (jg + 1) * w];
        let seq = r * l * w..(r + 1) * l * w;
        attention::gated_add(&mut h[seq.clone()], &a[seq], gate);
    }
}

impl FastVelocity for FastTransformer {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        let d = self.net.l * self.net.c;
        if x.len() != out.len() || !x.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "fast velocity buffers",
                format!("x {} and out {} elements", x.len(), out.len()),
                format!("equal lengths, a multiple of L * C = {d}"),
            ));
        }
        self.forward(x, t, out)
    }
}

// The step functions live here, beside the fused path they offer, so that the model module
// (the tensor path) does not import its fast path back.
impl StepFn for WaypointTransformer {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.forward_cond(x, t, None)
    }

    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let f = FastTransformer::new(self, None)?;
        Some(Box::new(f))
    }
}

impl StepFn for TransformerConditioned<'_> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.model.forward_cond(x, t, self.cond.as_ref())
    }

    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let f = FastTransformer::new(self.model, self.cond.as_ref())?;
        Some(Box::new(f))
    }
}
