//! The velocity-mlp forward and backward passes on f32 slices.

use std::sync::{Arc, OnceLock};

use super::{
    add_assign, axpy, matmul_nn, matmul_packed, matmul_tn_acc, matmul_wt, matvec_bias,
    matvec_packed, silu_backward, silu_inplace, silu_keep, threads_for_batch, transpose, TILE_N,
};
use crate::schedule::TimeGrid;

/// `2 pi` rounded to float32 first, as the reference computes `((2*pi) * t) * f`.
const TWO_PI_F32: f32 = 2.0 * std::f32::consts::PI;

/// Inputs narrower than this go through the first layer as one `axpy` per input column.
const NARROW_INPUT: usize = 8;

/// Rows that go through the whole network together in sampling: their activations
/// (`CHUNK x H` floats, 64 KiB at H = 256) stay in the core's L2 cache from layer to layer.
const CHUNK: usize = 64;

/// Fewer rows than this go through the hidden layers as one matvec per row: the packed matmul
/// needs the weights transposed, which for a 2-row guided sample at batch 1 costs more than
/// the whole run (and the per-row matvec reads each weight row once per row, from L2). With
/// a [`PackedCache`] already built, every row count uses the packed layout.
const PACKED_MIN_ROWS: usize = 4;

/// The hidden layers' weights transposed for the packed kernels, built on first use and shared
/// by every sampling run (and clone) of a model whose weights cannot change: one read from a
/// file. A model whose weights are training variables has none and packs once per run.
#[derive(Clone, Default)]
pub struct PackedCache(Arc<OnceLock<Arc<Vec<Vec<f32>>>>>);

impl std::fmt::Debug for PackedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let built = self.0.get().is_some();
        f.debug_struct("PackedCache")
            .field("built", &built)
            .finish()
    }
}

impl PackedCache {
    /// The packed hidden weights of `w`, transposed on the first call.
    fn get(&self, w: &MlpWeights<'_>) -> Arc<Vec<Vec<f32>>> {
        self.0.get_or_init(|| Arc::new(pack_hidden(w))).clone()
    }
}

/// The hidden layers' weights `[H, H]` transposed to `[H, H]` for [`matmul_packed`].
fn pack_hidden(w: &MlpWeights<'_>) -> Vec<Vec<f32>> {
    (1..w.depth())
        .map(|l| transpose(w.layers[l].0, w.h, w.h))
        .collect()
}

/// A velocity-mlp's weights as row-major f32 slices (the spec's tensors, in the spec's layout).
#[derive(Debug, Clone)]
pub struct MlpWeights<'a> {
    /// `D = prod(x_dims)`.
    pub d: usize,
    /// Hidden width H.
    pub h: usize,
    /// `time_embed.freqs` `[F]`.
    pub freqs: &'a [f32],
    /// `cond_embed.weight` `[num_classes + 1, K]`, when conditional.
    pub cond: Option<&'a [f32]>,
    /// `(weight [out, in], bias [out])` of each of the `depth + 1` linear layers.
    pub layers: Vec<(&'a [f32], &'a [f32])>,
}

impl MlpWeights<'_> {
    /// Number of frequencies F.
    pub fn f(&self) -> usize {
        self.freqs.len()
    }

    /// The first layer's input width `D + 2F (+ K)`.
    pub fn in0(&self) -> usize {
        self.layers[0].0.len() / self.h
    }

    fn depth(&self) -> usize {
        self.layers.len() - 1
    }
}

/// Writes `concat(sin(a), cos(a))` with `a = ((2 pi) t) f` into `out` `[2F]`.
pub fn time_features(freqs: &[f32], t: f32, out: &mut [f32]) {
    let f = freqs.len();
    let tt = TWO_PI_F32 * t;
    for (i, fr) in freqs.iter().enumerate() {
        let a = tt * fr;
        out[i] = a.sin();
        out[f + i] = a.cos();
    }
}

/// Per-row scratch of one sampling thread: two `[rows, H]` buffers.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    /// The block's own time features, first-layer term and velocity (whole-run Euler only).
    e: Vec<f32>,
    c0: Vec<f32>,
    v: Vec<f32>,
}

/// Sampling state: what is fixed for a run (transposed input weights, per-class first-layer
/// terms, labels) and the per-step first-layer term of the shared time.
#[derive(Debug)]
pub struct Sampler {
    wx_t: Vec<f32>,
    class_terms: Vec<f32>,
    labels: Option<Vec<u32>>,
    c0: Vec<f32>,
    e: Vec<f32>,
    scratch: Vec<Scratch>,
    /// Hidden-layer weights transposed for `matmul_packed`, built on the first multi-row call
    /// (or taken from the model's cache).
    packed: Arc<Vec<Vec<f32>>>,
    cache: Option<PackedCache>,
}

impl Sampler {
    /// Prepares a run; `labels` (one per row, `num_classes` = no condition) for a conditional
    /// model, where `None` means the null class for every row.
    pub fn new(w: &MlpWeights<'_>, labels: Option<Vec<u32>>) -> Self {
        Self::with_cache(w, labels, None)
    }

    /// [`Sampler::new`] taking the packed hidden weights from `cache` (a model whose weights
    /// cannot change), so a run packs nothing and a single row uses the packed matvec.
    pub fn with_cache(
        w: &MlpWeights<'_>,
        labels: Option<Vec<u32>>,
        cache: Option<PackedCache>,
    ) -> Self {
        let (d, h, in0) = (w.d, w.h, w.in0());
        let w0 = w.layers[0].0;
        let mut wx_t = Vec::new();
        if d < NARROW_INPUT {
            wx_t = vec![0.0; d * h];
            for o in 0..h {
                for i in 0..d {
                    wx_t[i * h + o] = w0[o * in0 + i];
                }
            }
        }
        let mut class_terms = Vec::new();
        let mut labels = labels;
        if let Some(emb) = w.cond {
            let col = d + 2 * w.f();
            let k = in0 - col;
            let rows = emb.len() / k;
            class_terms = vec![0.0; rows * h];
            for c in 0..rows {
                for o in 0..h {
                    let wk = &w0[o * in0 + col..(o + 1) * in0];
                    class_terms[c * h + o] = super::dot(wk, &emb[c * k..(c + 1) * k]);
                }
            }
            if labels.is_none() {
                labels = Some(Vec::new());
            }
        }
        Sampler {
            wx_t,
            class_terms,
            labels,
            c0: vec![0.0; h],
            e: vec![0.0; 2 * w.f()],
            scratch: Vec::new(),
            packed: Arc::default(),
            cache,
        }
    }

    /// Sizes the per-thread buffers and packs the weights for `rows` rows; returns the
    /// thread count and the rows per thread.
    fn prepare(&mut self, w: &MlpWeights<'_>, rows: usize) -> (usize, usize) {
        let h = w.h;
        let threads = threads_for_batch(rows, super::available_threads());
        if self.scratch.len() < threads {
            self.scratch.resize(threads, Scratch::default());
        }
        let per = rows.div_ceil(threads);
        let chunk = per.min(CHUNK);
        for s in &mut self.scratch[..threads] {
            if s.a.len() < chunk * h {
                s.a.resize(chunk * h, 0.0);
                s.b.resize(chunk * h, 0.0);
            }
        }
        // A model with a cache packs once for all its runs, so even a single row pays off.
        if (rows >= PACKED_MIN_ROWS || self.cache.is_some())
            && h.is_multiple_of(TILE_N)
            && self.packed.is_empty()
        {
            self.packed = match &self.cache {
                Some(c) => c.get(w),
                None => Arc::new(pack_hidden(w)),
            };
        }
        (threads, per)
    }

    /// `out = v(x, t)` for every row of `x` `[B, D]`, the time shared by all rows.
    pub fn velocity(&mut self, w: &MlpWeights<'_>, x: &[f32], t: f32, out: &mut [f32]) {
        let (d, in0, f) = (w.d, w.in0(), w.f());
        let rows = x.len() / d;
        // The time features and their first-layer product are shared by every row.
        time_features(w.freqs, t, &mut self.e);
        let (w0, b0) = w.layers[0];
        super::matvec_bias_strided(&w0[d..], in0, b0, &self.e[..2 * f], &mut self.c0);
        let (threads, per) = self.prepare(w, rows);
        let shared = Shared {
            w,
            packed: self.packed.as_slice(),
            wx_t: &self.wx_t,
            class_terms: &self.class_terms,
            labels: self.labels.as_deref(),
        };
        run_blocks(
            &shared,
            &mut self.scratch[..threads],
            &self.c0,
            x,
            out,
            0,
            per,
        );
    }

    /// Euler over the whole grid in place, each thread integrating its own rows through every
    /// step (rows are independent), so a run forks once instead of once per step. Returns the
    /// first step (1-based) and time at which some row stopped being finite.
    pub fn euler(
        &mut self,
        w: &MlpWeights<'_>,
        x: &mut [f32],
        grid: &TimeGrid,
    ) -> Option<(usize, f64)> {
        let (d, h, f) = (w.d, w.h, w.f());
        let rows = x.len() / d;
        let (threads, per) = self.prepare(w, rows);
        for s in &mut self.scratch[..threads] {
            s.e.resize(2 * f, 0.0);
            s.c0.resize(h, 0.0);
            if s.v.len() < per * d {
                s.v.resize(per * d, 0.0);
            }
        }
        let shared = Shared {
            w,
            packed: self.packed.as_slice(),
            wx_t: &self.wx_t,
            class_terms: &self.class_terms,
            labels: self.labels.as_deref(),
        };
        euler_blocks(&shared, &mut self.scratch[..threads], x, grid, 0, per)
    }
}

/// The whole-run Euler of [`Sampler::euler`] over row blocks, forked like [`run_blocks`].
fn euler_blocks(
    sh: &Shared<'_, '_>,
    scratch: &mut [Scratch],
    x: &mut [f32],
    grid: &TimeGrid,
    row0: usize,
    per: usize,
) -> Option<(usize, f64)> {
    let w = sh.w;
    let d = w.d;
    if scratch.len() == 1 {
        let s = &mut scratch[0];
        let rows = x.len() / d;
        let (w0, b0) = w.layers[0];
        let (in0, f) = (w.in0(), w.f());
        for (i, (g0, g1)) in grid.windows().enumerate() {
            let (t0, t1) = (g0 as f32, g1 as f32);
            time_features(w.freqs, t0, &mut s.e);
            super::matvec_bias_strided(&w0[d..], in0, b0, &s.e[..2 * f], &mut s.c0);
            let v = &mut s.v[..rows * d];
            forward_block(sh, &mut s.a, &mut s.b, &s.c0, x, v, row0);
            let dt = t1 - t0;
            let mut finite = true;
            for (xi, vi) in x.iter_mut().zip(v.iter()) {
                let p = dt * *vi;
                *xi += p;
                finite &= xi.is_finite();
            }
            if !finite {
                return Some((i + 1, g1));
            }
        }
        return None;
    }
    let half = scratch.len() / 2;
    let rows_left = (half * per).min(x.len() / d);
    let (sl, sr) = scratch.split_at_mut(half);
    let (xl, xr) = x.split_at_mut(rows_left * d);
    let (a, b) = rayon::join(
        || euler_blocks(sh, sl, xl, grid, row0, per),
        || euler_blocks(sh, sr, xr, grid, row0 + rows_left, per),
    );
    match (a, b) {
        (Some(p), Some(q)) => Some(if q.0 < p.0 { q } else { p }),
        (p, q) => p.or(q),
    }
}

/// What every block reads during one sampling step.
struct Shared<'s, 'w> {
    w: &'s MlpWeights<'w>,
    packed: &'s [Vec<f32>],
    wx_t: &'s [f32],
    class_terms: &'s [f32],
    labels: Option<&'s [u32]>,
}

/// Splits the rows over the scratch buffers (one per thread) with `rayon::join`, which,
/// unlike a scope, does not allocate.
fn run_blocks(
    sh: &Shared<'_, '_>,
    scratch: &mut [Scratch],
    c0: &[f32],
    x: &[f32],
    out: &mut [f32],
    row0: usize,
    per: usize,
) {
    let d = sh.w.d;
    if scratch.len() == 1 {
        let s = &mut scratch[0];
        forward_block(sh, &mut s.a, &mut s.b, c0, x, out, row0);
        return;
    }
    let half = scratch.len() / 2;
    let rows_left = (half * per).min(x.len() / d);
    let (sl, sr) = scratch.split_at_mut(half);
    let (xl, xr) = x.split_at(rows_left * d);
    let (ol, or) = out.split_at_mut(rows_left * d);
    rayon::join(
        || run_blocks(sh, sl, c0, xl, ol, row0, per),
        || run_blocks(sh, sr, c0, xr, or, row0 + rows_left, per),
    );
}

#[allow(clippy::too_many_arguments)]
fn forward_block(
    sh: &Shared<'_, '_>,
    a: &mut [f32],
    b: &mut [f32],
    c0: &[f32],
    x: &[f32],
    out: &mut [f32],
    row0: usize,
) {
    let d = sh.w.d;
    let rows = x.len() / d;
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(CHUNK);
        forward_chunk(
            sh,
            a,
            b,
            c0,
            &x[r * d..(r + n) * d],
            &mut out[r * d..(r + n) * d],
            row0 + r,
        );
        r += n;
    }
}

/// Up to `CHUNK` rows through every layer.
#[allow(clippy::too_many_arguments)]
fn forward_chunk(
    sh: &Shared<'_, '_>,
    a: &mut [f32],
    b: &mut [f32],
    c0: &[f32],
    x: &[f32],
    out: &mut [f32],
    row0: usize,
) {
    let w = sh.w;
    let (d, h, in0) = (w.d, w.h, w.in0());
    let rows = x.len() / d;
    if rows == 0 {
        return;
    }
    let (mut cur, mut nxt) = (&mut a[..rows * h], &mut b[..rows * h]);
    for r in 0..rows {
        let z = &mut cur[r * h..(r + 1) * h];
        z.copy_from_slice(c0);
        if let Some(labels) = sh.labels {
            let c = labels
                .get(row0 + r)
                .map_or(sh.class_terms.len() / h - 1, |&c| c as usize);
            add_assign(z, &sh.class_terms[c * h..(c + 1) * h]);
        }
        if d < NARROW_INPUT {
            for i in 0..d {
                axpy(z, x[r * d + i], &sh.wx_t[i * h..(i + 1) * h]);
            }
        }
    }
    if d >= NARROW_INPUT {
        matmul_wt(cur, x, w.layers[0].0, rows, h, d, in0, true);
    }
    silu_inplace(cur);
    let depth = w.depth();
    for l in 1..depth {
        let (wl, bl) = w.layers[l];
        match sh.packed.get(l - 1) {
            Some(wt) if rows >= PACKED_MIN_ROWS => {
                for r in 0..rows {
                    nxt[r * h..(r + 1) * h].copy_from_slice(bl);
                }
                matmul_packed(nxt, cur, wt, rows, h, h);
            }
            // Few rows with the weights already packed: one row at a time with every output
            // column in registers, which streams the weights once per row at full width.
            Some(wt) => {
                for r in 0..rows {
                    let y = &mut nxt[r * h..(r + 1) * h];
                    matvec_packed(y, bl, &cur[r * h..(r + 1) * h], wt);
                }
            }
            _ => linear(nxt, cur, wl, bl, rows, h, h),
        }
        silu_inplace(nxt);
        std::mem::swap(&mut cur, &mut nxt);
    }
    let (wl, bl) = w.layers[depth];
    linear(out, cur, wl, bl, rows, d, h);
}

/// `y[m, n] = x[m, k] w^T + b`: dot products for one row or a narrow output, else gemm.
fn linear(y: &mut [f32], x: &[f32], wt: &[f32], b: &[f32], m: usize, n: usize, k: usize) {
    if m < PACKED_MIN_ROWS || n < NARROW_INPUT {
        for r in 0..m {
            matvec_bias(wt, b, &x[r * k..(r + 1) * k], &mut y[r * n..(r + 1) * n]);
        }
    } else {
        for r in 0..m {
            y[r * n..(r + 1) * n].copy_from_slice(b);
        }
        matmul_wt(y, x, wt, m, n, k, k, true);
    }
}

/// The loss `mean((v - target)^2)` and the gradients of the trainable tensors, in the order
/// `cond_embed.weight` (when conditional), then `net.{2l}.weight`, `net.{2l}.bias` per layer.
///
/// `x` `[B, D]`, `t` `[B]`, `labels` `[B]` (conditional models; `None` = null class), `target`
/// `[B, D]`. Row blocks run on separate threads above the thread policy's threshold.
pub fn loss_and_grads(
    w: &MlpWeights<'_>,
    x: &[f32],
    t: &[f32],
    labels: Option<&[u32]>,
    target: &[f32],
) -> (f32, Vec<Vec<f32>>) {
    let b = t.len();
    let threads = threads_for_batch(b, super::available_threads());
    let per = b.div_ceil(threads);
    let scale = 2.0 / (b * w.d) as f32;
    // The hidden layers' weights transposed once per step for the packed matmul, which runs
    // on the chosen kernel path (the gemm crate picks its own).
    let packed: Vec<Vec<f32>> = if w.h.is_multiple_of(TILE_N) {
        (0..w.depth())
            .map(|l| {
                let kin = w.layers[l].0.len() / w.h;
                transpose(w.layers[l].0, w.h, kin)
            })
            .collect()
    } else {
        Vec::new()
    };
    let parts: Vec<(f64, Vec<Vec<f32>>)> = {
        use rayon::prelude::*;
        (0..threads)
            .into_par_iter()
            .map(|i| {
                let (r0, r1) = (i * per, ((i + 1) * per).min(b));
                let d = w.d;
                let mut grads = zero_grads(w);
                let mut sse = 0.0;
                // Blocks of rows small enough that a block's activations stay in the core's
                // L2 from its forward to its backward; the weight gradients add up over them
                // in a fixed order.
                for s0 in (r0..r1).step_by(TRAIN_BLOCK_ROWS) {
                    let s1 = (s0 + TRAIN_BLOCK_ROWS).min(r1);
                    sse += train_block(
                        w,
                        &x[s0 * d..s1 * d],
                        &t[s0..s1],
                        labels.map(|l| &l[s0..s1]),
                        &target[s0 * d..s1 * d],
                        scale,
                        &packed,
                        &mut grads,
                    );
                }
                (sse, grads)
            })
            .collect()
    };
    let mut it = parts.into_iter();
    let (mut sse, mut grads) = it.next().unwrap_or_default();
    for (s, g) in it {
        sse += s;
        for (a, b) in grads.iter_mut().zip(&g) {
            add_assign(a, b);
        }
    }
    ((sse / (b * w.d) as f64) as f32, grads)
}

thread_local! {
    /// Activation buffers kept between training steps on each thread: fresh multi-megabyte
    /// vectors cost page faults and TLB shootdowns on every step (10% of a step in `perf`).
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A zeroed buffer of `n` floats, reusing a pooled allocation when one is there.
fn take(n: usize) -> Vec<f32> {
    let mut v = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    v.clear();
    v.resize(n, 0.0);
    v
}

/// A buffer of `n` floats that the caller overwrites in full: a pooled allocation keeps its
/// stale contents (zeroing every activation buffer was 7% of a training step in `perf`).
fn take_overwritten(n: usize) -> Vec<f32> {
    let mut v = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, 0.0);
    }
    v
}

/// Returns buffers to this thread's pool.
fn give(bufs: impl IntoIterator<Item = Vec<f32>>) {
    POOL.with(|p| p.borrow_mut().extend(bufs));
}

/// Rows per block of a training step (per thread): 256 rows of width 256 are 256 KB an
/// activation, so a block's forward activations, sigmoids and gradients stay in a 2 MB L2.
const TRAIN_BLOCK_ROWS: usize = 256;

/// Zeroed gradients in [`loss_and_grads`]' order: the condition rows' embedding (when there is
/// one), then each layer's weight and bias.
fn zero_grads(w: &MlpWeights<'_>) -> Vec<Vec<f32>> {
    let mut grads: Vec<Vec<f32>> = Vec::new();
    if let Some(emb) = w.cond {
        grads.push(vec![0.0; emb.len()]);
    }
    for (wl, bl) in &w.layers {
        grads.push(vec![0.0; wl.len()]);
        grads.push(vec![0.0; bl.len()]);
    }
    grads
}

/// Forward and backward over one block of rows, adding its gradients to `grads` (laid out as
/// by [`zero_grads`]); returns the block's sum of squared errors.
#[allow(clippy::too_many_arguments)]
fn train_block(
    w: &MlpWeights<'_>,
    x: &[f32],
    t: &[f32],
    labels: Option<&[u32]>,
    target: &[f32],
    scale: f32,
    packed: &[Vec<f32>],
    grads: &mut [Vec<f32>],
) -> f64 {
    let (d, h, in0, f) = (w.d, w.h, w.in0(), w.f());
    let m = t.len();
    let depth = w.depth();
    let col_k = d + 2 * f;
    let k = in0 - col_k;
    let g0 = usize::from(w.cond.is_some());
    if m == 0 {
        return 0.0;
    }
    let null = w.cond.map_or(0, |emb| emb.len() / k.max(1) - 1);
    // The input rows [x, e(t), k(c)].
    let mut h0 = take_overwritten(m * in0);
    for r in 0..m {
        let row = &mut h0[r * in0..(r + 1) * in0];
        row[..d].copy_from_slice(&x[r * d..(r + 1) * d]);
        time_features(w.freqs, t[r], &mut row[d..col_k]);
        if let Some(emb) = w.cond {
            let c = labels.map_or(null, |l| l[r] as usize);
            row[col_k..].copy_from_slice(&emb[c * k..(c + 1) * k]);
        }
    }
    // Forward, keeping every activation and its sigmoid.
    let mut acts: Vec<Vec<f32>> = Vec::with_capacity(depth);
    let mut sigs: Vec<Vec<f32>> = Vec::with_capacity(depth);
    for l in 0..depth {
        let (wl, bl) = w.layers[l];
        let kin = if l == 0 { in0 } else { h };
        let mut z = take_overwritten(m * h);
        let input: &[f32] = if l == 0 { &h0 } else { &acts[l - 1] };
        match packed.get(l) {
            Some(wt) if m > 1 => {
                for r in 0..m {
                    z[r * h..(r + 1) * h].copy_from_slice(bl);
                }
                matmul_packed(&mut z, input, wt, m, h, kin);
            }
            _ => linear(&mut z, input, wl, bl, m, h, kin),
        }
        let mut s = take_overwritten(m * h);
        silu_keep(&mut z, &mut s);
        acts.push(z);
        sigs.push(s);
    }
    let (wl, bl) = w.layers[depth];
    let mut g = take_overwritten(m * d);
    linear(&mut g, &acts[depth - 1], wl, bl, m, d, h);
    let mut sse = 0f64;
    for (gi, ti) in g.iter_mut().zip(target) {
        let e = *gi - *ti;
        sse += (e as f64) * (e as f64);
        *gi = scale * e;
    }
    // Backward.
    let mut grad_out = g;
    let mut n_out = d;
    for l in (0..=depth).rev() {
        let (wl, _) = w.layers[l];
        let kin = if l == 0 { in0 } else { h };
        let input: &[f32] = if l == 0 { &h0 } else { &acts[l - 1] };
        {
            let (dw, rest) = grads[g0 + 2 * l..].split_at_mut(1);
            matmul_tn_acc(&mut dw[0], &grad_out, input, m, n_out, kin);
            let db = &mut rest[0];
            for r in 0..m {
                add_assign(db, &grad_out[r * n_out..(r + 1) * n_out]);
            }
        }
        if l > 0 {
            let mut da = take(m * h);
            if h.is_multiple_of(TILE_N) {
                // `w` `[n_out, h]` is already the packed layout of this product; `da` is zeroed.
                matmul_packed(&mut da, &grad_out, wl, m, h, n_out);
            } else {
                matmul_nn(&mut da, &grad_out, wl, m, n_out, h, h, 0);
            }
            silu_backward(&mut da, &acts[l - 1], &sigs[l - 1]);
            give([std::mem::replace(&mut grad_out, da)]);
            n_out = h;
        } else if w.cond.is_some() && k > 0 {
            let mut dk = take(m * k);
            matmul_nn(&mut dk, &grad_out, wl, m, n_out, k, in0, col_k);
            let demb = &mut grads[0];
            for r in 0..m {
                let c = labels.map_or(null, |l| l[r] as usize);
                add_assign(&mut demb[c * k..(c + 1) * k], &dk[r * k..(r + 1) * k]);
            }
            give([dk]);
        }
    }
    give([h0, grad_out]);
    give(acts);
    give(sigs);
    sse
}
