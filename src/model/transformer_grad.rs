//! The waypoint transformer's training step on the CPU: a fused forward that keeps what the
//! backward needs, and the backward by hand, on f32 slices with the packed matmul kernels.
//! candle's autograd spends a batch-256 step of the default model mostly in single-threaded
//! elementwise ops and graph bookkeeping (about 2.5 s on two cores); here a step is the
//! matmuls plus a few passes over the activations.
//!
//! The batch is split into one block of samples per pool thread; each block runs the whole
//! forward and backward on its own activations and gradients, which are summed at the end in
//! a fixed order (so a step is deterministic for a given batch and thread count, and resuming
//! a run reproduces it bit for bit).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::diffusion::XDims;
use crate::error::{Error, Result};
use crate::kernel::attention::{self, AttentionScratch};
use crate::kernel::grad::{self, AttentionGradScratch};
use crate::kernel::{self, add_assign, silu_backward, silu_keep};
use crate::model::cond::Condition;
use crate::model::transformer::{
    read_transformer_file, CondInput, TransformerConfig, WaypointTransformer, LN_EPS,
};
use crate::model::transformer_fast::Lin;
use crate::train::TrainableModel;

/// `2 pi` rounded to float32 first, as the reference computes `((2*pi) * v) * f`.
const TWO_PI_F32: f32 = 2.0 * std::f32::consts::PI;

/// Tokens per block below which a second thread costs more than it saves: a token's forward
/// and backward are about 0.4 MFLOP in the default model, so 256 of them are some
/// milliseconds against a hand-off of microseconds (and a smaller block underfills the
/// 6-row matmul tiles).
const MIN_TOKENS_PER_THREAD: usize = 256;

/// Tokens that go through the whole forward and backward together: a layer's activations
/// (`512 x 64` floats, 128 KiB at the default width) stay in the core's L2 cache from one pass
/// to the next, and a block's kept activations are a few MB rather than the thread's whole
/// share of the batch (70 MB at batch 256).
const BLOCK_TOKENS: usize = 512;

/// One attention block's linear layers.
struct Block {
    ada: Lin,
    qkv: Lin,
    proj: Lin,
    mlp0: Lin,
    mlp2: Lin,
}

/// The weights as f32 slices, copied once per step (the default model's 0.2 M floats are
/// microseconds against a step's milliseconds, and the copy leaves the `Var`s unlocked).
struct Net {
    l: usize,
    c: usize,
    w: usize,
    heads: usize,
    ff: usize,
    cf: usize,
    freqs: Vec<f32>,
    value_freqs: Vec<f32>,
    tok0: Lin,
    tok2: Lin,
    pos: Vec<f32>,
    time0: Lin,
    time2: Lin,
    /// `cond_embed.0`, `cond_embed.2` and `cond_null` (conditional models).
    cond: Option<(Lin, Lin, Vec<f32>)>,
    blocks: Vec<Block>,
    final_ada: Lin,
    final_out: Lin,
}

impl Net {
    fn new(model: &WaypointTransformer) -> Result<Self> {
        let cfg = model.config();
        let vec = |k: &str| -> Result<Vec<f32>> {
            Ok(model
                .get(k)
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?)
        };
        let cond = match cfg.cond_dims {
            Some(_) => Some((
                Lin::new(model, "cond_embed.0")?,
                Lin::new(model, "cond_embed.2")?,
                vec("cond_null")?,
            )),
            None => None,
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
        Ok(Net {
            l: cfg.len(),
            c: cfg.channels(),
            w: cfg.width,
            heads: cfg.heads,
            ff: cfg.mlp_hidden,
            cf: cfg.cond_features(),
            freqs: vec("freqs")?,
            value_freqs: vec("value_freqs")?,
            tok0: Lin::new(model, "token_embed.0")?,
            tok2: Lin::new(model, "token_embed.2")?,
            pos: vec("pos_embed")?,
            time0: Lin::new(model, "time_embed.0")?,
            time2: Lin::new(model, "time_embed.2")?,
            cond,
            blocks,
            final_ada: Lin::new(model, "final_ada")?,
            final_out: Lin::new(model, "final_out")?,
        })
    }

    fn dims(&self, rows: usize) -> Dims {
        Dims {
            rows,
            l: self.l,
            c: self.c,
            w: self.w,
            ff: self.ff,
            f: self.value_freqs.len(),
            ft: self.freqs.len(),
            depth: self.blocks.len(),
            cf: self.cf,
        }
    }
}

/// A linear layer's gradients.
struct LinGrad {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LinGrad {
    fn zeros(lin: &Lin) -> Self {
        LinGrad {
            w: vec![0.0; lin.n * lin.k],
            b: vec![0.0; lin.n],
        }
    }
}

/// One block of samples' gradients of every trainable tensor.
struct Grads {
    tok0: LinGrad,
    tok2: LinGrad,
    pos: Vec<f32>,
    time0: LinGrad,
    time2: LinGrad,
    cond: Option<(LinGrad, LinGrad, Vec<f32>)>,
    /// Per block: ada, qkv, proj, mlp.0, mlp.2.
    blocks: Vec<[LinGrad; 5]>,
    final_ada: LinGrad,
    final_out: LinGrad,
}

impl Grads {
    fn zeros(net: &Net) -> Self {
        Grads {
            tok0: LinGrad::zeros(&net.tok0),
            tok2: LinGrad::zeros(&net.tok2),
            pos: vec![0.0; net.pos.len()],
            time0: LinGrad::zeros(&net.time0),
            time2: LinGrad::zeros(&net.time2),
            cond: net.cond.as_ref().map(|(c0, c2, null)| {
                (
                    LinGrad::zeros(c0),
                    LinGrad::zeros(c2),
                    vec![0.0; null.len()],
                )
            }),
            blocks: net
                .blocks
                .iter()
                .map(|b| [&b.ada, &b.qkv, &b.proj, &b.mlp0, &b.mlp2].map(LinGrad::zeros))
                .collect(),
            final_ada: LinGrad::zeros(&net.final_ada),
            final_out: LinGrad::zeros(&net.final_out),
        }
    }

    /// Every gradient in the file's key order (`TransformerConfig::expected_shapes` without
    /// the fixed tensors).
    fn into_flat(self) -> Vec<Vec<f32>> {
        let mut v = Vec::new();
        let lin = |v: &mut Vec<Vec<f32>>, g: LinGrad| {
            v.push(g.w);
            v.push(g.b);
        };
        lin(&mut v, self.tok0);
        lin(&mut v, self.tok2);
        v.push(self.pos);
        lin(&mut v, self.time0);
        lin(&mut v, self.time2);
        if let Some((c0, c2, null)) = self.cond {
            lin(&mut v, c0);
            lin(&mut v, c2);
            v.push(null);
        }
        for blk in self.blocks {
            for g in blk {
                lin(&mut v, g);
            }
        }
        lin(&mut v, self.final_ada);
        lin(&mut v, self.final_out);
        v
    }
}

/// The sizes a [`Workspace`] is allocated for (its rows are the most any block of the step has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Dims {
    rows: usize,
    l: usize,
    c: usize,
    w: usize,
    ff: usize,
    f: usize,
    ft: usize,
    depth: usize,
    cf: usize,
}

/// What one attention block's backward reads from its forward.
#[derive(Debug, Default)]
struct BlockActs {
    /// The AdaLN modulation `[rows, 6W]`.
    m: Vec<f32>,
    /// The attention input's layer norm and its reciprocal deviations.
    n1: Vec<f32>,
    r1: Vec<f32>,
    qkv: Vec<f32>,
    /// Attention output before and after the projection.
    o: Vec<f32>,
    pr: Vec<f32>,
    n2: Vec<f32>,
    r2: Vec<f32>,
    /// The MLP's hidden activation and its sigmoid, and its output.
    g1: Vec<f32>,
    sg1: Vec<f32>,
    f2: Vec<f32>,
}

/// Every activation and gradient buffer of one block of samples.
#[derive(Debug, Default)]
struct Workspace {
    dims: Dims,
    // Conditioning, per sample.
    ft: Vec<f32>,
    te1: Vec<f32>,
    te1s: Vec<f32>,
    ce1: Vec<f32>,
    ce1s: Vec<f32>,
    ck: Vec<f32>,
    s: Vec<f32>,
    ss: Vec<f32>,
    // Tokens.
    args: Vec<f32>,
    sin: Vec<f32>,
    cos: Vec<f32>,
    tok: Vec<f32>,
    z0: Vec<f32>,
    sig0: Vec<f32>,
    h: Vec<f32>,
    blocks: Vec<BlockActs>,
    fm: Vec<f32>,
    nf: Vec<f32>,
    rf: Vec<f32>,
    af: Vec<f32>,
    out: Vec<f32>,
    // Backward scratch.
    a: Vec<f32>,
    da: Vec<f32>,
    dy: Vec<f32>,
    dg: Vec<f32>,
    dqkv: Vec<f32>,
    dh: Vec<f32>,
    dm: Vec<f32>,
    dfm: Vec<f32>,
    ds: Vec<f32>,
    dr: Vec<f32>,
    dr2: Vec<f32>,
    attn: AttentionScratch,
    attn_grad: AttentionGradScratch,
}

impl Workspace {
    fn new(d: Dims) -> Self {
        let (r, t, w, ff) = (d.rows, d.rows * d.l, d.w, d.ff);
        let (p, pt) = (1 + 2 * d.f, 1 + 2 * d.ft);
        let z = |n: usize| vec![0f32; n];
        Workspace {
            dims: d,
            ft: z(r * pt),
            te1: z(r * w),
            te1s: z(r * w),
            ce1: z(r * w),
            ce1s: z(r * w),
            ck: z(r * w),
            s: z(r * w),
            ss: z(r * w),
            args: z(t * d.c * d.f),
            sin: z(t * d.c * d.f),
            cos: z(t * d.c * d.f),
            tok: z(t * (d.c * p + pt)),
            z0: z(t * w),
            sig0: z(t * w),
            h: z(t * w),
            blocks: (0..d.depth)
                .map(|_| BlockActs {
                    m: z(r * 6 * w),
                    n1: z(t * w),
                    r1: z(t),
                    qkv: z(t * 3 * w),
                    o: z(t * w),
                    pr: z(t * w),
                    n2: z(t * w),
                    r2: z(t),
                    g1: z(t * ff),
                    sg1: z(t * ff),
                    f2: z(t * w),
                })
                .collect(),
            fm: z(r * 2 * w),
            nf: z(t * w),
            rf: z(t),
            af: z(t * w),
            out: z(t * d.c),
            a: z(t * w),
            da: z(t * w),
            dy: z(t * w),
            dg: z(t * ff),
            dqkv: z(t * 3 * w),
            dh: z(t * w),
            dm: z(r * 6 * w),
            dfm: z(r * 2 * w),
            ds: z(r * w),
            dr: z(r * w),
            dr2: z(r * w),
            attn: AttentionScratch::default(),
            attn_grad: AttentionGradScratch::default(),
        }
    }
}

/// Workspaces of finished steps, one per thread a step ran on, taken again by the next step:
/// a block of [`BLOCK_TOKENS`] tokens of the default model keeps about 4 MB of activations, and
/// fresh allocations of that size cost page faults on every step (as they did the
/// velocity-mlp's, 10% of a step). A process-wide pool rather than thread-locals, because
/// rayon may run a step's blocks on any of its threads (the calling thread included); a
/// workspace of another shape is dropped when taken, so the pool never holds more than one
/// step's worth.
static POOL: Mutex<Vec<Workspace>> = Mutex::new(Vec::new());

fn take_workspace(d: Dims) -> Workspace {
    let got = POOL.lock().ok().and_then(|mut p| {
        let i = p.iter().position(|w| w.dims == d);
        match i {
            Some(i) => Some(p.swap_remove(i)),
            None => p.pop(),
        }
    });
    match got {
        Some(ws) if ws.dims == d => ws,
        _ => Workspace::new(d),
    }
}

fn give_workspace(ws: Workspace) {
    if let Ok(mut p) = POOL.lock() {
        p.push(ws);
    }
}

/// One block of samples' condition.
#[derive(Clone, Copy)]
enum CondRows<'a> {
    /// An unconditional model.
    Absent,
    /// The null condition for every row.
    Null,
    /// Standardised features `[rows, cf]`, and the keep mask `[rows]` when given.
    Features {
        n: &'a [f32],
        keep: Option<&'a [f32]>,
    },
}

impl<'a> CondRows<'a> {
    fn rows(self, r0: usize, r1: usize, cf: usize) -> CondRows<'a> {
        match self {
            CondRows::Features { n, keep } => CondRows::Features {
                n: &n[r0 * cf..r1 * cf],
                keep: keep.map(|k| &k[r0..r1]),
            },
            other => other,
        }
    }
}

/// The MSE loss `mean((v - target)^2)` of `model` (on the CPU) on one batch and the gradient
/// of every trainable tensor under its file key, in file order, by the fused forward and
/// backward: the same values as candle's autograd through
/// [`WaypointTransformer::forward_cond`] (to float rounding), in a fraction of its time.
/// `noisy_x` and `target` `[B, L, C]`, `t` `[B]`; `cond` as the forward takes it (features
/// with a keep mask for condition dropout; `None` is the null condition of a conditional
/// model). Tensors the forward does not reach get zero gradients.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::model::{transformer_grad, TransformerConfig, WaypointTransformer};
/// use flow_matching::XDims;
///
/// let cfg = TransformerConfig { width: 16, depth: 1, heads: 2, mlp_hidden: 16, num_freqs: 2,
///     ..TransformerConfig::new(XDims::new([4, 2])?) };
/// let model = WaypointTransformer::init(cfg, &candle_nn::VarMap::new(), &Device::Cpu, 0)?;
/// let x = Tensor::zeros((3, 4, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let t = Tensor::full(0.5f32, 3, &Device::Cpu)?;
/// let (loss, grads) = transformer_grad::loss_and_grads(&model, &x, &t, None, &x)?;
/// assert!(loss >= 0.0);
/// assert_eq!(grads[0].0, "token_embed.0.weight");
/// # Ok::<(), flow_matching::Error>(())
/// ```
pub fn loss_and_grads(
    model: &WaypointTransformer,
    noisy_x: &Tensor,
    t: &Tensor,
    cond: Option<&Condition>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)> {
    let cfg = model.config();
    if !model.device().is_cpu() {
        return Err(Error::invalid(
            "device of the fused training step",
            "not the CPU",
            "the CPU (other devices train through candle's autograd)",
        ));
    }
    let b = noisy_x.dims().first().copied().unwrap_or(0);
    let want = cfg.x_dims.batched(b);
    for (what, x) in [("noisy_x", noisy_x), ("target", target)] {
        if x.dims() != want.as_slice() {
            return Err(Error::Shape {
                what: what.into(),
                expected: format!("{want:?} ([B, *x_dims])"),
                got: x.dims().to_vec(),
            });
        }
    }
    if b == 0 {
        return Err(Error::ZeroBatch);
    }
    if t.elem_count() != b {
        return Err(Error::Shape {
            what: "t".into(),
            expected: format!("{b} elements, one per sample"),
            got: t.dims().to_vec(),
        });
    }
    let flat = |x: &Tensor| -> Result<Vec<f32>> {
        Ok(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (normed, keep) = match model.cond_input(cond, b)? {
        CondInput::Absent | CondInput::Null => (None, None),
        CondInput::Features { normed, keep } => {
            (Some(flat(&normed)?), keep.as_ref().map(flat).transpose()?)
        }
    };
    let rows_cond = match (&cfg.cond_dims, &normed) {
        (None, _) => CondRows::Absent,
        (Some(_), None) => CondRows::Null,
        (Some(_), Some(n)) => CondRows::Features {
            n,
            keep: keep.as_deref(),
        },
    };
    let (x, tv, tg) = (flat(noisy_x)?, flat(t)?, flat(target)?);
    let net = Net::new(model)?;
    let d = net.l * net.c;
    let parts = (b * net.l / MIN_TOKENS_PER_THREAD).clamp(1, kernel::available_threads().min(b));
    let per = b.div_ceil(parts);
    let parts = b.div_ceil(per);
    let scale = 2.0 / (b * d) as f32;
    // Each thread's rows go through in sub-blocks of about `BLOCK_TOKENS` tokens, their
    // gradients summed into the thread's own.
    let sub = (BLOCK_TOKENS / net.l).clamp(1, per);
    let dims = net.dims(sub);
    let run = |i: usize| -> (f64, Vec<Vec<f32>>) {
        let (r0, r1) = (i * per, ((i + 1) * per).min(b));
        let mut ws = take_workspace(dims);
        let mut g = Grads::zeros(&net);
        let mut sse = 0f64;
        let mut r = r0;
        while r < r1 {
            let e = (r + sub).min(r1);
            sse += train_block(
                &net,
                &mut ws,
                &mut g,
                &x[r * d..e * d],
                &tv[r..e],
                rows_cond.rows(r, e, net.cf),
                &tg[r * d..e * d],
                scale,
            );
            r = e;
        }
        give_workspace(ws);
        (sse, g.into_flat())
    };
    let parts: Vec<(f64, Vec<Vec<f32>>)> = if parts == 1 {
        vec![run(0)]
    } else {
        use rayon::prelude::*;
        (0..parts).into_par_iter().map(run).collect()
    };
    let mut it = parts.into_iter();
    let (mut sse, mut grads) = it.next().unwrap_or_default();
    for (s, g) in it {
        sse += s;
        for (a, b) in grads.iter_mut().zip(&g) {
            add_assign(a, b);
        }
    }
    let loss = (sse / (b * d) as f64) as f32;
    let device = model.device();
    let names = cfg
        .expected_shapes()
        .into_iter()
        .filter(|(k, _)| !TransformerConfig::is_fixed(k));
    let out = names
        .zip(grads)
        .map(|((k, shape), g)| Ok((k, Tensor::from_vec(g, shape, device)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((loss, out))
}

/// `[v, sqrt2 sin(a), sqrt2 cos(a)]` with `a = ((2 pi) v) f` into `out` `[1 + 2F]`.
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

/// `a = n (1 + scale) + shift` per sample, `shift`/`scale` chunks `js`/`jc` of its `[6W]`
/// modulation.
#[allow(clippy::too_many_arguments)]
fn modulate_rows(
    a: &mut [f32],
    n: &[f32],
    m: &[f32],
    js: usize,
    jc: usize,
    rows: usize,
    l: usize,
    w: usize,
) {
    for r in 0..rows {
        let mr = &m[r * 6 * w..(r + 1) * 6 * w];
        let seq = r * l * w..(r + 1) * l * w;
        grad::modulate(
            &mut a[seq.clone()],
            &n[seq],
            &mr[js * w..(js + 1) * w],
            &mr[jc * w..(jc + 1) * w],
        );
    }
}

/// `h += gate * y` per sample, `gate` chunk `jg` of its modulation.
fn gated_add_rows(h: &mut [f32], y: &[f32], m: &[f32], jg: usize, rows: usize, l: usize, w: usize) {
    for r in 0..rows {
        let gate = &m[r * 6 * w + jg * w..r * 6 * w + (jg + 1) * w];
        let seq = r * l * w..(r + 1) * l * w;
        attention::gated_add(&mut h[seq.clone()], &y[seq], gate);
    }
}

/// The backward of [`gated_add_rows`]: `dy = dh gate`, the gate's gradient into chunk `jg` of
/// each sample's `dm`.
#[allow(clippy::too_many_arguments)]
fn gate_backward_rows(
    dy: &mut [f32],
    dm: &mut [f32],
    dh: &[f32],
    y: &[f32],
    m: &[f32],
    jg: usize,
    rows: usize,
    l: usize,
    w: usize,
) {
    for r in 0..rows {
        let at = r * 6 * w + jg * w..r * 6 * w + (jg + 1) * w;
        let seq = r * l * w..(r + 1) * l * w;
        grad::gate_backward(
            &mut dy[seq.clone()],
            &mut dm[at.clone()],
            &dh[seq.clone()],
            &y[seq],
            &m[at],
        );
    }
}

/// The backward of [`modulate_rows`] (with its layer norm) into `dh`, the shift's and scale's
/// gradients into chunks `js` and `js + 1` of each sample's `dm`.
#[allow(clippy::too_many_arguments)]
fn modulate_backward_rows(
    dh: &mut [f32],
    dm: &mut [f32],
    da: &[f32],
    n: &[f32],
    rstd: &[f32],
    m: &[f32],
    js: usize,
    rows: usize,
    l: usize,
    w: usize,
) {
    for r in 0..rows {
        let seq = r * l * w..(r + 1) * l * w;
        grad::modulate_backward(
            &mut dh[seq.clone()],
            &mut dm[r * 6 * w + js * w..r * 6 * w + (js + 2) * w],
            &da[seq.clone()],
            &n[seq],
            &rstd[r * l..(r + 1) * l],
            &m[r * 6 * w + (js + 1) * w..r * 6 * w + (js + 2) * w],
        );
    }
}

/// The backward of `y = x W^T + b` over `m` rows from `dy`: `W`'s and `b`'s gradients added
/// to `g`, the input's written to `dx` when given.
fn linear_backward(
    lin: &Lin,
    g: &mut LinGrad,
    dx: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    m: usize,
) {
    let (n, k) = (lin.n, lin.k);
    grad::weight_grad(&mut g.w, &dy[..m * n], &x[..m * k], m, n, k);
    grad::bias_grad(&mut g.b, &dy[..m * n]);
    if let Some(dx) = dx {
        grad::input_grad(&mut dx[..m * k], &dy[..m * n], &lin.w, m, n, k);
    }
}

/// Forward and backward over one block of samples: its gradients added to `g`; returns its sum
/// of squared errors.
#[allow(clippy::too_many_arguments)]
fn train_block(
    net: &Net,
    ws: &mut Workspace,
    g: &mut Grads,
    x: &[f32],
    t: &[f32],
    cond: CondRows<'_>,
    target: &[f32],
    scale: f32,
) -> f64 {
    let (l, c, w, ff, heads) = (net.l, net.c, net.w, net.ff, net.heads);
    let (f, p, pt) = (
        net.value_freqs.len(),
        1 + 2 * net.value_freqs.len(),
        1 + 2 * net.freqs.len(),
    );
    let rows = t.len();
    let toks = rows * l;
    let (tw, rw, tf) = (toks * w, rows * w, toks * ff);
    let eps = LN_EPS as f32;

    // The conditioning vector s = silu(time_embed(e(t)) + k(c)) per sample.
    for (r, &tv) in t.iter().enumerate() {
        fourier(&net.freqs, tv, &mut ws.ft[r * pt..(r + 1) * pt]);
    }
    net.time0.apply(&mut ws.te1, &ws.ft, rows);
    silu_keep(&mut ws.te1[..rw], &mut ws.te1s[..rw]);
    net.time2.apply(&mut ws.s, &ws.te1, rows);
    match (cond, &net.cond) {
        (CondRows::Null, Some((_, _, null))) => {
            for s in ws.s[..rw].chunks_exact_mut(w) {
                add_assign(s, null);
            }
        }
        (CondRows::Features { n, keep }, Some((c0, c2, null))) => {
            c0.apply(&mut ws.ce1, n, rows);
            silu_keep(&mut ws.ce1[..rw], &mut ws.ce1s[..rw]);
            c2.apply(&mut ws.ck, &ws.ce1, rows);
            for r in 0..rows {
                // k kp + (1 - kp) null: a dropped row (kp = 0) sees the null condition only.
                let kp = keep.map_or(1.0, |k| k[r]);
                let (s, k) = (&mut ws.s[r * w..(r + 1) * w], &ws.ck[r * w..(r + 1) * w]);
                for ((si, &ki), &ni) in s.iter_mut().zip(k).zip(null) {
                    *si += ki * kp + (1.0 - kp) * ni;
                }
            }
        }
        _ => {}
    }
    silu_keep(&mut ws.s[..rw], &mut ws.ss[..rw]);

    // Tokens: each value's Fourier features, then the time's, through the token MLP.
    let nv = toks * c * f;
    for (v, args) in x.iter().zip(ws.args[..nv].chunks_exact_mut(f)) {
        let tv = TWO_PI_F32 * v;
        for (a, fr) in args.iter_mut().zip(&net.value_freqs) {
            *a = tv * fr;
        }
    }
    attention::sin_cos_scaled(
        &ws.args[..nv],
        &mut ws.sin[..nv],
        &mut ws.cos[..nv],
        std::f32::consts::SQRT_2,
    );
    let tp = c * p + pt;
    for ti in 0..toks {
        let row = &mut ws.tok[ti * tp..(ti + 1) * tp];
        for ch in 0..c {
            let (vi, o) = (ti * c + ch, ch * p);
            row[o] = x[vi];
            row[o + 1..o + 1 + f].copy_from_slice(&ws.sin[vi * f..(vi + 1) * f]);
            row[o + 1 + f..o + p].copy_from_slice(&ws.cos[vi * f..(vi + 1) * f]);
        }
        let r = ti / l;
        row[c * p..].copy_from_slice(&ws.ft[r * pt..(r + 1) * pt]);
    }
    net.tok0.apply(&mut ws.z0, &ws.tok, toks);
    silu_keep(&mut ws.z0[..tw], &mut ws.sig0[..tw]);
    net.tok2.apply(&mut ws.h, &ws.z0, toks);
    for seq in ws.h[..tw].chunks_exact_mut(l * w) {
        add_assign(seq, &net.pos);
    }

    // The blocks, keeping what their backward reads.
    for (blk, ba) in net.blocks.iter().zip(ws.blocks.iter_mut()) {
        blk.ada.apply(&mut ba.m, &ws.s, rows);
        grad::layer_norm_keep(&mut ba.n1[..tw], &mut ba.r1[..toks], &ws.h[..tw], w, eps);
        modulate_rows(&mut ws.a, &ba.n1, &ba.m, 0, 1, rows, l, w);
        blk.qkv.apply(&mut ba.qkv, &ws.a, toks);
        attention::attention(&ba.qkv, &mut ba.o, &mut ws.attn, rows, l, w, heads);
        blk.proj.apply(&mut ba.pr, &ba.o, toks);
        gated_add_rows(&mut ws.h, &ba.pr, &ba.m, 2, rows, l, w);
        grad::layer_norm_keep(&mut ba.n2[..tw], &mut ba.r2[..toks], &ws.h[..tw], w, eps);
        modulate_rows(&mut ws.a, &ba.n2, &ba.m, 3, 4, rows, l, w);
        blk.mlp0.apply(&mut ba.g1, &ws.a, toks);
        silu_keep(&mut ba.g1[..tf], &mut ba.sg1[..tf]);
        blk.mlp2.apply(&mut ba.f2, &ba.g1, toks);
        gated_add_rows(&mut ws.h, &ba.f2, &ba.m, 5, rows, l, w);
    }

    // The final modulation and projection, and the loss's gradient in place of the output.
    net.final_ada.apply(&mut ws.fm, &ws.s, rows);
    grad::layer_norm_keep(&mut ws.nf[..tw], &mut ws.rf[..toks], &ws.h[..tw], w, eps);
    for r in 0..rows {
        let seq = r * l * w..(r + 1) * l * w;
        let (shift, sc) = ws.fm[r * 2 * w..(r + 1) * 2 * w].split_at(w);
        grad::modulate(&mut ws.af[seq.clone()], &ws.nf[seq], shift, sc);
    }
    net.final_out.apply(&mut ws.out, &ws.af, toks);
    let nd = toks * c;
    let mut sse = 0f64;
    for (o, &tg) in ws.out[..nd].iter_mut().zip(target) {
        let e = *o - tg;
        sse += (e as f64) * (e as f64);
        *o = scale * e;
    }

    // Backward: the output layer and the final modulation.
    linear_backward(
        &net.final_out,
        &mut g.final_out,
        Some(&mut ws.da[..]),
        &ws.out,
        &ws.af,
        toks,
    );
    ws.dh[..tw].fill(0.0);
    ws.dfm[..2 * rw].fill(0.0);
    for r in 0..rows {
        let seq = r * l * w..(r + 1) * l * w;
        grad::modulate_backward(
            &mut ws.dh[seq.clone()],
            &mut ws.dfm[r * 2 * w..(r + 1) * 2 * w],
            &ws.da[seq.clone()],
            &ws.nf[seq],
            &ws.rf[r * l..(r + 1) * l],
            &ws.fm[r * 2 * w + w..(r + 1) * 2 * w],
        );
    }
    linear_backward(
        &net.final_ada,
        &mut g.final_ada,
        Some(&mut ws.ds[..]),
        &ws.dfm,
        &ws.s,
        rows,
    );

    // The blocks in reverse: the MLP branch, then attention, then the modulation's layer.
    for ((blk, ba), gb) in net
        .blocks
        .iter()
        .zip(ws.blocks.iter())
        .zip(g.blocks.iter_mut())
        .rev()
    {
        let [g_ada, g_qkv, g_proj, g_mlp0, g_mlp2] = gb;
        ws.dm[..6 * rw].fill(0.0);
        gate_backward_rows(&mut ws.dy, &mut ws.dm, &ws.dh, &ba.f2, &ba.m, 5, rows, l, w);
        linear_backward(
            &blk.mlp2,
            g_mlp2,
            Some(&mut ws.dg[..]),
            &ws.dy,
            &ba.g1,
            toks,
        );
        silu_backward(&mut ws.dg[..tf], &ba.g1[..tf], &ba.sg1[..tf]);
        // The MLP's input again (cheaper than keeping it).
        modulate_rows(&mut ws.a, &ba.n2, &ba.m, 3, 4, rows, l, w);
        linear_backward(&blk.mlp0, g_mlp0, Some(&mut ws.da[..]), &ws.dg, &ws.a, toks);
        modulate_backward_rows(
            &mut ws.dh, &mut ws.dm, &ws.da, &ba.n2, &ba.r2, &ba.m, 3, rows, l, w,
        );
        gate_backward_rows(&mut ws.dy, &mut ws.dm, &ws.dh, &ba.pr, &ba.m, 2, rows, l, w);
        linear_backward(&blk.proj, g_proj, Some(&mut ws.da[..]), &ws.dy, &ba.o, toks);
        grad::attention_backward(
            &mut ws.dqkv,
            &ws.da,
            &ba.qkv,
            &mut ws.attn_grad,
            rows,
            l,
            w,
            heads,
        );
        modulate_rows(&mut ws.a, &ba.n1, &ba.m, 0, 1, rows, l, w);
        linear_backward(&blk.qkv, g_qkv, Some(&mut ws.da[..]), &ws.dqkv, &ws.a, toks);
        modulate_backward_rows(
            &mut ws.dh, &mut ws.dm, &ws.da, &ba.n1, &ba.r1, &ba.m, 0, rows, l, w,
        );
        linear_backward(&blk.ada, g_ada, Some(&mut ws.dr[..]), &ws.dm, &ws.s, rows);
        add_assign(&mut ws.ds[..rw], &ws.dr[..rw]);
    }

    // The token embedding: the positional table sums over samples, then the token MLP.
    for seq in ws.dh[..tw].chunks_exact(l * w) {
        add_assign(&mut g.pos, seq);
    }
    linear_backward(
        &net.tok2,
        &mut g.tok2,
        Some(&mut ws.da[..]),
        &ws.dh,
        &ws.z0,
        toks,
    );
    silu_backward(&mut ws.da[..tw], &ws.z0[..tw], &ws.sig0[..tw]);
    linear_backward(&net.tok0, &mut g.tok0, None, &ws.da, &ws.tok, toks);

    // The conditioning: through the SiLU, then the time and the condition embeddings.
    silu_backward(&mut ws.ds[..rw], &ws.s[..rw], &ws.ss[..rw]);
    linear_backward(
        &net.time2,
        &mut g.time2,
        Some(&mut ws.dr[..]),
        &ws.ds,
        &ws.te1,
        rows,
    );
    silu_backward(&mut ws.dr[..rw], &ws.te1[..rw], &ws.te1s[..rw]);
    linear_backward(&net.time0, &mut g.time0, None, &ws.dr, &ws.ft, rows);
    match (cond, &net.cond, &mut g.cond) {
        (CondRows::Null, Some(_), Some((_, _, gnull))) => {
            for ds in ws.ds[..rw].chunks_exact(w) {
                add_assign(gnull, ds);
            }
        }
        (CondRows::Features { n, keep }, Some((c0, c2, _)), Some((g0, g2, gnull))) => {
            for r in 0..rows {
                let kp = keep.map_or(1.0, |k| k[r]);
                let ds = &ws.ds[r * w..(r + 1) * w];
                for ((dk, &d), gn) in ws.dr2[r * w..(r + 1) * w]
                    .iter_mut()
                    .zip(ds)
                    .zip(gnull.iter_mut())
                {
                    *dk = d * kp;
                    *gn += (1.0 - kp) * d;
                }
            }
            linear_backward(c2, g2, Some(&mut ws.dr[..]), &ws.dr2, &ws.ce1, rows);
            silu_backward(&mut ws.dr[..rw], &ws.ce1[..rw], &ws.ce1s[..rw]);
            linear_backward(c0, g0, None, &ws.dr, n, rows);
        }
        _ => {}
    }
    sse
}

// The trainer's interface lives here, beside the fused step it offers, so that the model
// module (the tensor path) does not import its training path back.
impl TrainableModel for WaypointTransformer {
    type Config = TransformerConfig;

    fn init(config: Self::Config, varmap: &VarMap, device: &Device, seed: u64) -> Result<Self> {
        WaypointTransformer::init(config, varmap, device, seed)
    }

    fn from_tensors(
        config: Self::Config,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self> {
        WaypointTransformer::from_tensors(config, tensors, path)
    }

    fn read_file(path: &Path, device: &Device) -> Result<(Self::Config, HashMap<String, Tensor>)> {
        read_transformer_file(path, device)
    }

    fn config(&self) -> &Self::Config {
        WaypointTransformer::config(self)
    }

    fn x_dims(&self) -> &XDims {
        &WaypointTransformer::config(self).x_dims
    }

    fn num_classes(&self) -> usize {
        0
    }

    fn cond_dims(&self) -> Option<&XDims> {
        WaypointTransformer::config(self).cond_dims.as_ref()
    }

    fn device(&self) -> &Device {
        WaypointTransformer::device(self)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        WaypointTransformer::tensors(self)
    }

    fn is_fixed(key: &str) -> bool {
        TransformerConfig::is_fixed(key)
    }

    fn detach(&self) -> Self {
        WaypointTransformer::detach(self)
    }

    fn forward_cond(&self, x: &Tensor, t: &Tensor, cond: Option<&Condition>) -> Result<Tensor> {
        WaypointTransformer::forward_cond(self, x, t, cond)
    }

    // The fused forward and backward on the CPU (about 10x candle's autograd there); candle's
    // autograd on other devices, where the tensors stay put.
    fn loss_and_grads(
        &self,
        noisy_x: &Tensor,
        t: &Tensor,
        cond: Option<&Condition>,
        target: &Tensor,
    ) -> Result<(f32, Vec<(String, Tensor)>)> {
        if self.device().is_cpu() {
            loss_and_grads(self, noisy_x, t, cond, target)
        } else {
            crate::train::autograd_loss_and_grads(self, noisy_x, t, cond, target)
        }
    }

    fn save_with_metadata(
        &self,
        path: &Path,
        extra: &[(String, Tensor)],
        extra_meta: &HashMap<String, String>,
    ) -> Result<()> {
        WaypointTransformer::save_with_metadata(self, path, extra, extra_meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspaces_are_reused_by_shape() {
        let d = Dims {
            rows: 2,
            l: 3,
            c: 2,
            w: 16,
            ff: 16,
            f: 2,
            ft: 2,
            depth: 1,
            cf: 0,
        };
        let ws = take_workspace(d);
        let ptr = ws.h.as_ptr();
        give_workspace(ws);
        let again = take_workspace(d);
        assert_eq!(again.h.as_ptr(), ptr);
        give_workspace(again);
        let other = take_workspace(Dims { rows: 3, ..d });
        assert_eq!(other.dims.rows, 3);
    }
}
