//! The velocity-mlp's fast CPU path: sampling through [`FastVelocity`] and a hand-written
//! training step ([`loss_and_grads`]), both over the model's own f32 storage (no copies).

use candle_core::{DType, Device, Layout, Storage, StorageRef, Tensor};

use crate::error::{Error, Result};
use crate::kernel::mlp::{self, MlpWeights, Sampler};
use crate::model::{Condition, VelocityMlp};
use crate::step::FastVelocity;

/// The model's tensors in [`VelocityMlp::tensors`] order, read-locked for the borrow.
struct Locked<'a> {
    guards: Vec<(StorageRef<'a>, &'a Layout, usize)>,
}

impl<'a> Locked<'a> {
    /// Locks every tensor; `None` unless all are contiguous f32 on the CPU.
    fn new(model: &'a VelocityMlp) -> Option<Self> {
        let mut guards = Vec::new();
        let mut refs = vec![model.freqs()];
        refs.extend(model.cond_embed());
        for (w, b) in model.layers() {
            refs.push(w);
            refs.push(b);
        }
        for t in refs {
            if t.dtype() != DType::F32 || !t.device().is_cpu() || !t.is_contiguous() {
                return None;
            }
            let (g, l) = t.storage_and_layout();
            if !matches!(&*g, Storage::Cpu(_)) {
                return None;
            }
            guards.push((g, l, t.elem_count()));
        }
        Some(Locked { guards })
    }

    fn slice(&self, i: usize) -> &[f32] {
        let (g, l, n) = &self.guards[i];
        match &**g {
            Storage::Cpu(c) => match c.as_slice::<f32>() {
                Ok(s) => &s[l.start_offset()..l.start_offset() + n],
                Err(_) => &[],
            },
            _ => &[],
        }
    }

    fn weights(&self, model: &VelocityMlp) -> MlpWeights<'_> {
        let cfg = model.config();
        let cond = cfg.num_classes > 0;
        let first = 1 + cond as usize;
        MlpWeights {
            d: cfg.x_dims.numel(),
            h: cfg.hidden,
            freqs: self.slice(0),
            cond: cond.then(|| self.slice(1)),
            layers: (0..=cfg.depth)
                .map(|l| (self.slice(first + 2 * l), self.slice(first + 2 * l + 1)))
                .collect(),
        }
    }
}

/// A [`VelocityMlp`] prepared for sampling on the CPU: its weights read-locked in place, the
/// per-class first-layer terms precomputed and the buffers kept across steps.
pub struct FastMlp<'a> {
    // Field order matters: `weights` borrows from `locked` and `rows` and must drop first.
    weights: MlpWeights<'a>,
    sampler: Sampler,
    /// The row count the labels fix (conditional models given labels).
    rows: Option<usize>,
    _locked: Box<Locked<'a>>,
    _rows: Vec<f32>,
}

impl<'a> FastMlp<'a> {
    /// Prepares `model` (labels `[B]` for a conditional one; `None` = the null class); `None`
    /// when the model is not contiguous f32 on the CPU.
    pub fn new(model: &'a VelocityMlp, labels: Option<Vec<u32>>) -> Option<Self> {
        let locked = Box::new(Locked::new(model)?);
        // SAFETY: the slices point into storage that `locked` keeps read-locked (so nothing
        // writes or frees it) for as long as this struct lives; the box never moves its
        // contents, and `weights` is dropped before `_locked`.
        let weights: MlpWeights<'a> =
            unsafe { std::mem::transmute::<MlpWeights<'_>, MlpWeights<'a>>(locked.weights(model)) };
        let rows = labels.as_ref().map(Vec::len);
        let sampler = Sampler::with_cache(&weights, labels, model.packed_cache());
        Some(FastMlp {
            weights,
            sampler,
            rows,
            _locked: locked,
            _rows: Vec::new(),
        })
    }

    /// Prepares a model with a continuous condition for the rows of `cond`: each row's
    /// projected condition becomes a class of its own, so the kernels need no other path.
    /// `None` when the model is not contiguous f32 on the CPU or the condition does not fit.
    pub fn with_condition(model: &'a VelocityMlp, cond: &Condition) -> Option<Self> {
        let batch = cond.batch().ok()?;
        let (rows, index, _) = model.row_embedding(Some(cond), batch).ok()??;
        let locked = Box::new(Locked::new(model)?);
        let mut w = locked.weights(model);
        // SAFETY: as in `new`; `rows` is a heap buffer that is never written again and moves
        // with this struct without reallocating, and `weights` is dropped before it.
        let rows_ref: &'a [f32] = unsafe { std::mem::transmute::<&[f32], &'a [f32]>(&rows[..]) };
        w.cond = Some(rows_ref);
        let weights: MlpWeights<'a> =
            unsafe { std::mem::transmute::<MlpWeights<'_>, MlpWeights<'a>>(w) };
        let n = index.len();
        let sampler = Sampler::with_cache(&weights, Some(index), model.packed_cache());
        Some(FastMlp {
            weights,
            sampler,
            rows: Some(n),
            _locked: locked,
            _rows: rows,
        })
    }
}

impl FastVelocity for FastMlp<'_> {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        let d = self.weights.d;
        if x.len() != out.len()
            || !x.len().is_multiple_of(d)
            || self.rows.is_some_and(|r| r * d != x.len())
        {
            return Err(Error::invalid(
                "fast velocity buffers",
                format!("x {} and out {} elements", x.len(), out.len()),
                match self.rows {
                    Some(r) => format!("{r} rows of D = {d} (one per label)"),
                    None => format!("equal lengths, a multiple of D = {d}"),
                },
            ));
        }
        self.sampler.velocity(&self.weights, x, t, out);
        Ok(())
    }

    fn euler_in_place(
        &mut self,
        x: &mut [f32],
        grid: &crate::schedule::TimeGrid,
    ) -> Option<Result<()>> {
        let d = self.weights.d;
        if !x.len().is_multiple_of(d) || self.rows.is_some_and(|r| r * d != x.len()) {
            return None;
        }
        Some(match self.sampler.euler(&self.weights, x, grid) {
            None => Ok(()),
            Some((step, t)) => Err(Error::NonFinite { step, t }),
        })
    }
}

/// Classifier-free guidance on the fast path: the `B` rows and their `B` null-label copies go
/// through the network as one `2B`-row evaluation (the time features and their first-layer
/// product computed once for both halves, the class terms precomputed per class), then
/// `v = v_u + w (v_c - v_u)` rounded as [`crate::guidance::combine`] rounds it.
pub struct GuidedFastMlp<'a> {
    inner: FastMlp<'a>,
    rows: usize,
    weight: f32,
    x2: Vec<f32>,
    v2: Vec<f32>,
}

impl<'a> GuidedFastMlp<'a> {
    /// Guides `model` towards `labels` (one per row) with `weight`; `None` when the model is
    /// not contiguous f32 on the CPU.
    pub fn new(model: &'a VelocityMlp, labels: &[u32], weight: f64) -> Option<Self> {
        let null = model.config().num_classes as u32;
        let rows = labels.len();
        let mut doubled = labels.to_vec();
        doubled.resize(2 * rows, null);
        Some(GuidedFastMlp {
            inner: FastMlp::new(model, Some(doubled))?,
            rows,
            weight: weight as f32,
            x2: Vec::new(),
            v2: Vec::new(),
        })
    }
}

impl FastVelocity for GuidedFastMlp<'_> {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        let d = self.inner.weights.d;
        let n = x.len();
        if n != self.rows * d || out.len() != n {
            return Err(Error::invalid(
                "guided fast velocity buffers",
                format!("x {} and out {} elements", n, out.len()),
                format!("{} rows of D = {d} (one per label)", self.rows),
            ));
        }
        if self.x2.len() != 2 * n {
            self.x2.resize(2 * n, 0.0);
            self.v2.resize(2 * n, 0.0);
        }
        self.x2[..n].copy_from_slice(x);
        self.x2[n..].copy_from_slice(x);
        self.inner.velocity(&self.x2, t, &mut self.v2)?;
        let (vc, vu) = self.v2.split_at(n);
        let w = self.weight;
        for ((o, c), u) in out.iter_mut().zip(vc).zip(vu) {
            // `v_u + ((v_c - v_u) * w + 0)`: candle's affine then add.
            *o = *u + ((*c - *u) * w + 0.0);
        }
        Ok(())
    }
}

/// The MSE loss `mean((v - target)^2)` of `model` on one batch and the gradient of every
/// trainable tensor under its spec key (all but `time_embed.freqs`), by a hand-written
/// backward pass on the CPU; `labels` `[B]` (u32) for a conditional model, `None` = null class.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::model::loss_and_grads;
/// use flow_matching::{VelocityMlp, VelocityMlpConfig, XDims};
///
/// let cfg = VelocityMlpConfig { hidden: 8, depth: 2, ..VelocityMlpConfig::new(XDims::new(2)?) };
/// let model = VelocityMlp::init(cfg, &candle_nn::VarMap::new(), &Device::Cpu, 0)?;
/// let x = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let t = Tensor::full(0.5f32, 4, &Device::Cpu)?;
/// let (loss, grads) = loss_and_grads(&model, &x, &t, None, &x)?;
/// assert!(loss >= 0.0);
/// assert_eq!(grads[0].0, "net.0.weight");
/// # Ok::<(), flow_matching::Error>(())
/// ```
pub fn loss_and_grads(
    model: &VelocityMlp,
    noisy_x: &Tensor,
    t: &Tensor,
    labels: Option<&Tensor>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)> {
    let cond = labels.map(|l| Condition::Labels(l.clone()));
    loss_and_grads_cond(model, noisy_x, t, cond.as_ref(), target)
}

/// [`loss_and_grads`] under any [`Condition`]. A continuous condition goes through the
/// class kernel with one class per row; the rows' embedding gradients are then chained
/// through the projection (`cond_proj.*`) and the null rows into `cond_null`.
pub fn loss_and_grads_cond(
    model: &VelocityMlp,
    noisy_x: &Tensor,
    t: &Tensor,
    cond: Option<&Condition>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)> {
    let cfg = model.config();
    let b = noisy_x.dim(0)?;
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
    if t.elem_count() != b {
        return Err(Error::Shape {
            what: "t".into(),
            expected: format!("{b} elements, one per sample"),
            got: t.dims().to_vec(),
        });
    }
    let row_emb = model.row_embedding(cond, b)?;
    let labels = match (cond, &row_emb) {
        (_, Some((_, index, _))) => Some(index.clone()),
        (None, None) => None,
        (Some(Condition::Labels(l)), None) => {
            let v = l.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            Some(model.labels_tensor(&v, b).map(|_| v)?)
        }
        (Some(c), None) => {
            // Features for a model without a continuous condition: the model's own error.
            model.cond_features(Some(c), b)?;
            None
        }
    };
    let flat = |x: &Tensor| -> Result<Vec<f32>> {
        Ok(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (x, tv, tg) = (flat(noisy_x)?, flat(t)?, flat(target)?);
    let device = model.device().clone();
    let cpu = model.to_device(&candle_core::Device::Cpu)?;
    let locked = Locked::new(&cpu).ok_or_else(|| {
        Error::invalid(
            "model weights",
            "not contiguous f32",
            "contiguous float32 tensors",
        )
    })?;
    let mut w = locked.weights(&cpu);
    if let Some((rows, _, _)) = &row_emb {
        w.cond = Some(rows);
    }
    let (loss, mut grads) = mlp::loss_and_grads(&w, &x, &tv, labels.as_deref(), &tg);
    let mut out = Vec::with_capacity(grads.len() + 3);
    if let Some((_, _, normed)) = row_emb {
        // grads[0] is d(loss)/d(row embedding) [B + 1, K]: rows 0..B are the kept rows' own
        // (a dropped row's is zero, its gradient went to row B, the null condition).
        let demb = grads.remove(0);
        let k = cfg.cond_dim;
        let g_rows = Tensor::from_vec(demb[..b * k].to_vec(), (b, k), &Device::Cpu)?;
        let null = Tensor::from_vec(demb[b * k..].to_vec(), k, &Device::Cpu)?;
        let (dw, db) = match normed {
            Some(n) => (
                g_rows.t()?.matmul(&n.to_device(&Device::Cpu)?)?,
                g_rows.sum(0)?,
            ),
            None => (
                Tensor::zeros((k, cfg.cond_features()), DType::F32, &Device::Cpu)?,
                Tensor::zeros(k, DType::F32, &Device::Cpu)?,
            ),
        };
        out.push(("cond_proj.weight".to_string(), dw.to_device(&device)?));
        out.push(("cond_proj.bias".to_string(), db.to_device(&device)?));
        out.push(("cond_null".to_string(), null.to_device(&device)?));
    }
    let names: Vec<(String, Vec<usize>)> = cfg
        .expected_shapes()
        .into_iter()
        .filter(|(k, _)| !crate::VelocityMlpConfig::is_fixed(k) && !k.starts_with("cond_"))
        .collect();
    let labelled = cfg.num_classes > 0;
    let mut grads = grads.into_iter();
    if labelled {
        if let Some(g) = grads.next() {
            out.push((
                "cond_embed.weight".to_string(),
                Tensor::from_vec(g, (cfg.num_classes + 1, cfg.cond_dim), &device)?,
            ));
        }
    }
    for ((k, shape), g) in names.into_iter().zip(grads) {
        out.push((k, Tensor::from_vec(g, shape, &device)?));
    }
    Ok((loss, out))
}
