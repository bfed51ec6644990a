//! The optimiser pieces of training: AdamW with visible state, gradient clipping, the
//! learning-rate schedule and the EMA of the weights. Each works on plain `(name, tensor)`
//! lists, so any model whose weights are `Var`s can use them.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW's hyper-parameters (PyTorch's `torch.optim.AdamW` names and formula).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the weights by `1 - lr * weight_decay`.
    ///
    /// The default is 0.0, not PyTorch's 0.01: a velocity field has no reason to shrink
    /// toward zero, and small flow-matching models train as well or better without it.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`, `weight_decay = 0.0`.
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWParams {
    /// Checks each value's range.
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(name, b, "a number in [0, 1)"));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid("eps", self.eps, "a finite number > 0"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(
                "weight decay",
                self.weight_decay,
                "a finite number >= 0",
            ));
        }
        Ok(())
    }
}

/// AdamW whose moments and step count are public, so a checkpoint can save and restore them.
#[derive(Debug)]
pub struct AdamW {
    /// The hyper-parameters.
    pub params: AdamWParams,
    /// First moments, one per variable, in the variables' order.
    pub m: Vec<Tensor>,
    /// Second moments, one per variable, in the variables' order.
    pub v: Vec<Tensor>,
    /// Steps taken so far (the bias correction's exponent is `step + 1` in the next step).
    pub step: u64,
}

impl AdamW {
    /// A fresh optimiser with zero moments shaped like `vars`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use flow_matching::train::{AdamW, AdamWParams};
    ///
    /// let w = Var::from_tensor(&Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap()).unwrap();
    /// let mut opt = AdamW::new(AdamWParams::default(), std::slice::from_ref(&w)).unwrap();
    /// let g = Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
    /// opt.step(std::slice::from_ref(&w), &[g], 0.1).unwrap();
    /// // The first step moves each weight by lr against the gradient's sign.
    /// let got = w.as_tensor().to_vec1::<f32>().unwrap();
    /// assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 0.9).abs() < 1e-6);
    /// ```
    pub fn new(params: AdamWParams, vars: &[Var]) -> Result<Self> {
        params.validate()?;
        // Separate storage for every moment: the CPU step updates them in place.
        let zeros = || {
            vars.iter()
                .map(|v| Ok(v.as_tensor().zeros_like()?))
                .collect::<Result<Vec<_>>>()
        };
        Ok(AdamW {
            params,
            m: zeros()?,
            v: zeros()?,
            step: 0,
        })
    }

    /// One update of every variable with its gradient (same order) at learning rate `lr`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if vars.len() != grads.len() || vars.len() != self.m.len() {
            return Err(Error::Training(format!(
                "AdamW holds {} moments but got {} variables and {} gradients",
                self.m.len(),
                vars.len(),
                grads.len()
            )));
        }
        let p = self.params;
        self.step += 1;
        let t = self.step as i32;
        let c1 = 1.0 - p.beta1.powi(t);
        let c2 = 1.0 - p.beta2.powi(t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let w = var.as_tensor();
            if g.dims() != w.dims() {
                return Err(Error::Shape {
                    what: format!("gradient {i}"),
                    expected: format!("{:?} (the variable's shape)", w.dims()),
                    got: g.dims().to_vec(),
                });
            }
            let g = g.to_dtype(w.dtype())?;
            if fused_cpu(&[w, &g, &self.m[i], &self.v[i]]) {
                // One pass per tensor, in place, instead of fourteen allocating tensor ops
                // (with candle's worker spinning after each, on cores the kernels need).
                // The constants rounded as the tensor ops round them (f64, then f32), so both
                // paths give the same bits.
                let moment = |beta: f64, square| Moment {
                    beta: beta as f32,
                    rest: (1.0 - beta) as f32,
                    square,
                };
                self.m[i].inplace_op2(&g, &moment(p.beta1, false))?;
                self.v[i].inplace_op2(&g, &moment(p.beta2, true))?;
                let update = Update {
                    decay: (1.0 - lr * p.weight_decay) as f32,
                    lr: lr as f32,
                    inv_c1: (1.0 / c1) as f32,
                    inv_c2: (1.0 / c2) as f32,
                    eps: p.eps as f32,
                };
                w.inplace_op3(&self.m[i], &self.v[i], &update)?;
                continue;
            }
            let m = (self.m[i].affine(p.beta1, 0.0)? + g.affine(1.0 - p.beta1, 0.0)?)?;
            let v = (self.v[i].affine(p.beta2, 0.0)? + g.sqr()?.affine(1.0 - p.beta2, 0.0)?)?;
            let m_hat = m.affine(1.0 / c1, 0.0)?;
            let v_hat = v.affine(1.0 / c2, 0.0)?;
            let update = (m_hat / v_hat.sqrt()?.affine(1.0, p.eps)?)?;
            let next = (w.affine(1.0 - lr * p.weight_decay, 0.0)? - update.affine(lr, 0.0)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

impl Clone for AdamW {
    /// A copy with moments of its own (the CPU step updates moments in place, so a shallow
    /// copy would move with the original).
    fn clone(&self) -> Self {
        let deep = |ts: &[Tensor]| {
            ts.iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        AdamW {
            params: self.params,
            m: deep(&self.m).unwrap_or_else(|_| self.m.clone()),
            v: deep(&self.v).unwrap_or_else(|_| self.v.clone()),
            step: self.step,
        }
    }
}

/// Whether the in-place CPU step applies: every tensor contiguous f32 on the CPU, one shape
/// (candle refuses an in-place op whose source shares the destination's storage).
fn fused_cpu(ts: &[&Tensor]) -> bool {
    let shape = ts[0].dims();
    ts.iter().all(|t| {
        t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == shape
    })
}

/// The contiguous f32 slice of a CPU storage under `layout`.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    Ok(&all[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// A moment update in place: `m = beta m + rest g` (`g^2` when `square`), `rest = 1 - beta`.
struct Moment {
    beta: f32,
    rest: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = cpu_f32(s2, l2)?;
        let (o, n) = (l1.start_offset(), l1.shape().elem_count());
        let CpuStorage::F32(m) = s1 else {
            candle_core::bail!("adamw-moment: f32 moments only")
        };
        let (b, c) = (self.beta, self.rest);
        for (mi, &gi) in m[o..o + n].iter_mut().zip(g) {
            let gi = if self.square { gi * gi } else { gi };
            *mi = *mi * b + gi * c;
        }
        Ok(())
    }
}

/// The weight update in place from the new moments:
/// `w = w decay - lr (m / c1) / (sqrt(v / c2) + eps)`.
struct Update {
    decay: f32,
    lr: f32,
    inv_c1: f32,
    inv_c2: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (o, n) = (l1.start_offset(), l1.shape().elem_count());
        let CpuStorage::F32(w) = s1 else {
            candle_core::bail!("adamw-update: f32 weights only")
        };
        for ((wi, &mi), &vi) in w[o..o + n].iter_mut().zip(m).zip(v) {
            let update = (mi * self.inv_c1) / ((vi * self.inv_c2).sqrt() + self.eps);
            *wi = *wi * self.decay - update * self.lr;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients together, in f64.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        sum += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1); returns the norm
/// before clipping and the gradients.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
/// let (norm, clipped) = flow_matching::train::clip_grad_norm(g, 1.0).unwrap();
/// assert!((norm - 5.0).abs() < 1e-9);
/// assert!((flow_matching::train::grad_norm(&clipped).unwrap() - 1.0).abs() < 1e-5);
/// ```
pub fn clip_grad_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let norm = grad_norm(&grads)?;
    if !norm.is_finite() {
        return Err(Error::Training(format!(
            "gradient norm is {norm}: the loss diverged"
        )));
    }
    let coef = max_norm / (norm + 1e-6);
    if coef >= 1.0 {
        return Ok((norm, grads));
    }
    let scaled = grads
        .iter()
        .map(|g| Ok(g.affine(coef, 0.0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((norm, scaled))
}

/// What the learning rate does after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LrSchedule {
    /// Stays at the peak.
    #[default]
    Constant,
    /// Half a cosine from the peak down to `min_lr` at the last step.
    Cosine {
        /// The floor reached at the end (absolute, not a fraction of the peak).
        min_lr: f64,
    },
}

impl std::fmt::Display for LrSchedule {
    /// `constant` or `cosine:MIN_LR`, the form [`str::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LrSchedule::Constant => write!(f, "constant"),
            LrSchedule::Cosine { min_lr } => write!(f, "cosine:{min_lr}"),
        }
    }
}

impl std::str::FromStr for LrSchedule {
    type Err = Error;

    /// Parses `constant`, `cosine` (floor 0) or `cosine:MIN_LR`.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "constant" => return Ok(LrSchedule::Constant),
            "cosine" => return Ok(LrSchedule::Cosine { min_lr: 0.0 }),
            _ => {}
        }
        if let Some(rest) = lower.strip_prefix("cosine:") {
            return match rest.trim().parse::<f64>() {
                Ok(min_lr) if min_lr >= 0.0 && min_lr.is_finite() => {
                    Ok(LrSchedule::Cosine { min_lr })
                }
                _ => Err(Error::invalid(
                    "learning-rate schedule",
                    s,
                    "cosine:MIN_LR with a finite MIN_LR >= 0",
                )),
            };
        }
        Err(Error::UnknownName {
            kind: "learning-rate schedule",
            name: s.to_string(),
            known: "constant, cosine, cosine:MIN_LR".into(),
        })
    }
}

/// The learning rate of step `step` (0-based) of `total` steps: linear warm-up from
/// `peak / warmup` to `peak` over the first `warmup` steps, then the schedule.
///
/// ```
/// use flow_matching::train::{lr_at, LrSchedule};
/// let cos = LrSchedule::Cosine { min_lr: 0.0 };
/// assert_eq!(lr_at(0, 100, 1.0, 10, cos), 0.1);
/// assert_eq!(lr_at(9, 100, 1.0, 10, cos), 1.0);
/// assert!((lr_at(55, 100, 1.0, 10, cos) - 0.5).abs() < 1e-12);
/// ```
pub fn lr_at(step: usize, total: usize, peak: f64, warmup: usize, schedule: LrSchedule) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine { min_lr } => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            min_lr + (peak - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// An exponential moving average of the weights: `ema = d * ema + (1 - d) * w` after each step.
#[derive(Debug, Clone)]
pub struct Ema {
    /// The configured decay `d`, in [0, 1).
    pub decay: f64,
    /// Whether the decay ramps up as `min(decay, (1 + n) / (10 + n))` after `n` steps, so a
    /// short run's average is not stuck near the initial weights.
    pub warmup: bool,
    /// The averaged weights, one per variable, in the variables' order.
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(decay: f64, warmup: bool, weights: &[Tensor]) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::invalid("EMA decay", decay, "a number in [0, 1)"));
        }
        let shadow = weights
            .iter()
            .map(|w| Ok(w.detach().copy()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Ema {
            decay,
            warmup,
            shadow,
        })
    }

    /// The decay used by the update after `steps_done` optimiser steps (1 for the first).
    pub fn decay_at(&self, steps_done: u64) -> f64 {
        if self.warmup {
            let n = steps_done as f64;
            self.decay.min((1.0 + n) / (10.0 + n))
        } else {
            self.decay
        }
    }

    /// Folds the current weights (same order as the shadow) into the average.
    pub fn update(&mut self, weights: &[Tensor], steps_done: u64) -> Result<()> {
        if weights.len() != self.shadow.len() {
            return Err(Error::Training(format!(
                "EMA holds {} tensors but got {} weights",
                self.shadow.len(),
                weights.len()
            )));
        }
        let d = self.decay_at(steps_done);
        for (s, w) in self.shadow.iter_mut().zip(weights) {
            *s = (s.affine(d, 0.0)? + w.detach().affine(1.0 - d, 0.0)?)?;
        }
        Ok(())
    }
}
