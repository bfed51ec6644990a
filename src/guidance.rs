//! Classifier-free guidance: `v = v_uncond + w (v_cond - v_uncond)`, from one batched call.
//!
//! The conditional and unconditional velocities come from a single evaluation of `2B` rows:
//! `x` concatenated with itself, the labels concatenated with the null label (`num_classes`).
//! One call of twice the rows costs far less than two calls on small batches, where the
//! per-call overhead dominates.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::flow_matching::FlowMatching;
use crate::model::fast::{FastMlp, GuidedFastMlp};
use crate::model::{Condition, VelocityMlp};
use crate::step::{FastVelocity, StepFn};
use crate::train::TrainableModel;

/// `v_uncond + w (v_cond - v_uncond)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let c = Tensor::new(&[3.0f32], &Device::Cpu).unwrap();
/// let u = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
/// let v = flow_matching::guidance::combine(&u, &c, 2.0).unwrap();
/// assert_eq!(v.to_vec1::<f32>().unwrap(), vec![5.0]);
/// ```
pub fn combine(v_uncond: &Tensor, v_cond: &Tensor, weight: f64) -> Result<Tensor> {
    Ok(v_uncond.add(&(v_cond - v_uncond)?.affine(weight, 0.0)?)?)
}

/// Checks that a guidance weight is a finite number.
pub fn check_weight(weight: f64) -> Result<f64> {
    if weight.is_finite() {
        Ok(weight)
    } else {
        Err(Error::invalid(
            "guidance weight",
            weight,
            "a finite number (0 = unconditional, 1 = conditional, > 1 = stronger guidance)",
        ))
    }
}

/// The labels `[2B]` of a guided call: the rows' labels, then `B` null labels.
fn doubled_labels(labels: &Tensor, null: u32) -> Result<Tensor> {
    let b = labels.dim(0)?;
    let nulls = Tensor::full(null, b, labels.device())?;
    Ok(Tensor::cat(
        &[&labels.to_dtype(candle_core::DType::U32)?, &nulls],
        0,
    )?)
}

/// Evaluates a conditional field with guidance weight `w`. `w = 1` and `w = 0` need only one
/// half, so they evaluate `B` rows; any other weight evaluates `2B` rows in one call.
fn guided_eval(
    field: &mut dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    t: &Tensor,
    labels: &Tensor,
    doubled: &Tensor,
    null: u32,
    weight: f64,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    if labels.dim(0)? != b {
        return Err(Error::Shape {
            what: "x for the guided field".into(),
            expected: format!("{} rows, one per label", labels.dim(0)?),
            got: x.dims().to_vec(),
        });
    }
    if weight == 1.0 {
        return field(x, t, labels);
    }
    if weight == 0.0 {
        let nulls = Tensor::full(null, b, labels.device())?;
        return field(x, t, &nulls);
    }
    let x2 = Tensor::cat(&[x, x], 0)?;
    let t2 = Tensor::cat(&[t, t], 0)?;
    let v = field(&x2, &t2, doubled)?;
    if v.dims() != x2.dims() {
        return Err(Error::StepShape {
            expected: x2.dims().to_vec(),
            got: v.dims().to_vec(),
        });
    }
    combine(&v.narrow(0, b, b)?, &v.narrow(0, 0, b)?, weight)
}

/// A guided step function over a [`VelocityMlp`]: the model, one label per row, a weight.
#[derive(Debug, Clone)]
pub struct Guided<'a> {
    model: &'a VelocityMlp,
    labels: Tensor,
    doubled: Tensor,
    weight: f64,
}

impl<'a> Guided<'a> {
    /// Guides `model` (a conditional one) towards `labels` (one per row) with weight `weight`.
    ///
    /// ```
    /// use flow_matching::guidance::Guided;
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions, VelocityMlp};
    ///
    /// let dev = candle_core::Device::Cpu;
    /// let model = VelocityMlp::load("tests/data/golden/mlp-cond/model.safetensors", &dev)?;
    /// let mut guided = Guided::new(&model, &[0, 1, 2], 3.0)?;
    /// let fm = FlowMatching::new(2)?;
    /// let s = fm.sample(3, &mut guided, &dev, &SampleOptions::seeded(0))?;
    /// assert_eq!(s.x.dims(), &[3, 2]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn new(model: &'a VelocityMlp, labels: &[u32], weight: f64) -> Result<Self> {
        let weight = check_weight(weight)?;
        let labels = model.labels_tensor(labels, labels.len())?;
        let doubled = doubled_labels(&labels, model.config().num_classes as u32)?;
        Ok(Guided {
            model,
            labels,
            doubled,
            weight,
        })
    }

    /// The guidance weight.
    pub fn weight(&self) -> f64 {
        self.weight
    }
}

impl StepFn for Guided<'_> {
    // CPU f32 sampling: one fused 2B-row evaluation per step over the model's own storage
    // (weights 1 and 0 need only one half, as in `guided_eval`).
    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let labels = self.labels.to_vec1::<u32>().ok()?;
        let model = self.model;
        if self.weight == 1.0 || self.weight == 0.0 {
            let null = model.config().num_classes as u32;
            let l = if self.weight == 1.0 {
                labels
            } else {
                vec![null; labels.len()]
            };
            return Some(Box::new(FastMlp::new(model, Some(l))?));
        }
        Some(Box::new(GuidedFastMlp::new(model, &labels, self.weight)?))
    }

    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let model = self.model;
        let null = model.config().num_classes as u32;
        guided_eval(
            &mut |x, t, l| model.forward(x, t, Some(l)),
            x,
            t,
            &self.labels,
            &self.doubled,
            null,
            self.weight,
        )
    }
}

/// A guided step function over any conditional field `FnMut(x, t, labels) -> Result<Tensor>`,
/// where the label `num_classes` means "no condition".
pub struct GuidedFn<F> {
    field: F,
    labels: Tensor,
    doubled: Tensor,
    null: u32,
    weight: f64,
}

impl<F> GuidedFn<F>
where
    F: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
{
    /// Guides `field` towards `labels` (each below `num_classes`, or `num_classes` for none).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::guidance::GuidedFn;
    /// use flow_matching::StepFn;
    ///
    /// // v = label (as a number): the null label 2 gives 2, label 0 gives 0.
    /// let field = |x: &Tensor, _t: &Tensor, l: &Tensor| -> flow_matching::Result<Tensor> {
    ///     Ok(l.to_dtype(x.dtype())?.unsqueeze(1)?.broadcast_as(x.shape())?.contiguous()?)
    /// };
    /// let mut g = GuidedFn::new(field, &[0], 2, 3.0, &Device::Cpu)?;
    /// let x = Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu)?;
    /// let v = g.step_at(&x, 0.5)?;
    /// assert_eq!(v.to_vec2::<f32>()?, vec![vec![-4.0]]); // 2 + 3 (0 - 2)
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn new(
        field: F,
        labels: &[u32],
        num_classes: usize,
        weight: f64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let weight = check_weight(weight)?;
        if labels.is_empty() {
            return Err(Error::invalid("labels", "[]", "one label per sample"));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize > num_classes) {
            return Err(Error::invalid(
                "label",
                bad,
                format!("a class in 0..{num_classes} or {num_classes} for no condition"),
            ));
        }
        let labels = Tensor::from_vec(labels.to_vec(), labels.len(), device)?;
        let doubled = doubled_labels(&labels, num_classes as u32)?;
        Ok(GuidedFn {
            field,
            labels,
            doubled,
            null: num_classes as u32,
            weight,
        })
    }
}

impl<F> StepFn for GuidedFn<F>
where
    F: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
{
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        guided_eval(
            &mut self.field,
            x,
            t,
            &self.labels,
            &self.doubled,
            self.null,
            self.weight,
        )
    }
}

impl FlowMatching {
    /// Sets the classifier-free guidance weight (finite; 1.0 = plain conditional).
    pub fn with_guidance(mut self, weight: f64) -> Result<Self> {
        self.guidance_weight = check_weight(weight)?;
        Ok(self)
    }

    /// A step function that guides `model` towards `labels` with this sampler's weight.
    pub fn guided<'a>(&self, model: &'a VelocityMlp, labels: &[u32]) -> Result<Guided<'a>> {
        Guided::new(model, labels, self.guidance_weight)
    }
}

/// A guided step function over any [`TrainableModel`] with a continuous condition: one
/// condition row per sample, guided with `v_null + w (v_cond - v_null)` from one batched call
/// of `2B` rows (the second half on the learned null condition).
#[derive(Debug, Clone)]
pub struct GuidedCondition<'a, M: TrainableModel> {
    model: &'a M,
    cond: Condition,
    doubled: Condition,
    weight: f64,
}

impl<'a, M: TrainableModel> GuidedCondition<'a, M> {
    /// Guides `model` towards the rows of `cond` `[B, *c_dims]` with weight `weight`.
    ///
    /// ```
    /// use candle_core::Device;
    /// use flow_matching::guidance::GuidedCondition;
    /// use flow_matching::io::read_npy;
    /// use flow_matching::model::WaypointTransformer;
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let dir = "tests/data/golden/transformer-cond";
    /// let model = WaypointTransformer::load(format!("{dir}/model.safetensors"), &Device::Cpu)?;
    /// let cond = read_npy(format!("{dir}/cond.npy"), &Device::Cpu)?;
    /// let mut g = GuidedCondition::new(&model, &cond, 2.0)?;
    /// let s = FlowMatching::new([16, 2])?.sample(6, &mut g, &Device::Cpu, &SampleOptions::seeded(0))?;
    /// assert_eq!(s.x.dims(), &[6, 16, 2]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn new(model: &'a M, cond: &Tensor, weight: f64) -> Result<Self> {
        let weight = check_weight(weight)?;
        let dims = model.cond_dims().ok_or_else(|| Error::Shape {
            what: "condition".into(),
            expected: "no condition: the model was trained without a continuous one".into(),
            got: cond.dims().to_vec(),
        })?;
        if cond.rank() < 1 || cond.dims()[1..] != *dims.dims() {
            return Err(Error::Shape {
                what: "condition".into(),
                expected: format!("[B, {dims}] (the model's cond_dims)"),
                got: cond.dims().to_vec(),
            });
        }
        let cond = Condition::features(cond.to_device(model.device())?);
        let doubled = cond.with_null_half(0)?;
        Ok(GuidedCondition {
            model,
            cond,
            doubled,
            weight,
        })
    }

    /// The guidance weight.
    pub fn weight(&self) -> f64 {
        self.weight
    }
}

impl<M: TrainableModel> StepFn for GuidedCondition<'_, M> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        if self.cond.batch()? != b {
            return Err(Error::Shape {
                what: "x for the guided field".into(),
                expected: format!("{} rows, one per condition row", self.cond.batch()?),
                got: x.dims().to_vec(),
            });
        }
        if self.weight == 1.0 {
            return self.model.forward_cond(x, t, Some(&self.cond));
        }
        if self.weight == 0.0 {
            return self.model.forward_cond(x, t, None);
        }
        let x2 = Tensor::cat(&[x, x], 0)?;
        let t2 = Tensor::cat(&[&t.flatten_all()?, &t.flatten_all()?], 0)?;
        let v = self.model.forward_cond(&x2, &t2, Some(&self.doubled))?;
        combine(&v.narrow(0, b, b)?, &v.narrow(0, 0, b)?, self.weight)
    }
}

impl FlowMatching {
    /// A step function that guides `model` towards the rows of the continuous condition
    /// `cond` `[B, *c_dims]` with this sampler's weight.
    pub fn guided_cond<'a, M: TrainableModel>(
        &self,
        model: &'a M,
        cond: &Tensor,
    ) -> Result<GuidedCondition<'a, M>> {
        GuidedCondition::new(model, cond, self.guidance_weight)
    }
}
