//! Training a velocity network by flow matching: AdamW with saved moments, gradient clipping,
//! warm-up and cosine learning rates, an EMA of the weights, classifier-free guidance label
//! dropping, exact resume from checkpoints.
//!
//! Every random draw of step `k` comes from [`step_rng`]`(seed, k)`, so a run resumed at step
//! `k` continues bit for bit as the uninterrupted run would have.

mod budget;
mod checkpoint;
mod config;
mod model;
mod optim;
mod sizing;
mod validation;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::flow_matching::{FlowMatching, TrainingBatch};
use crate::model::{Condition, IntoCondition, VelocityMlp};
use crate::progress::{Progress, ProgressFn, Reporter};

pub use budget::TimeBudget;
pub use config::TrainConfig;
pub use model::{ModelConfig, TrainableModel};
pub use optim::{clip_grad_norm, grad_norm, lr_at, AdamW, AdamWParams, Ema, LrSchedule};
pub use sizing::{
    Architecture, Sizing, MAX_EPOCHS, MIN_STEPS, TRANSFORMER_BUDGET, TRANSFORMER_MAX_CHANNELS,
    TRANSFORMER_MIN_ROWS, TRANSFORMER_MIN_TOKENS, TRANSFORMER_STEPS,
};
pub use validation::{EarlyStopReport, EarlyStopping, Validation};

/// The loss and the gradient of every trainable weight (by its file key) for one batch:
/// `(model, noisy_x, t, condition, target) -> (loss, grads)`. [`loss_and_grads`] is the
/// velocity-mlp's autograd version; the default is [`TrainableModel::loss_and_grads`].
pub type LossFn<M = VelocityMlp> = Box<
    dyn FnMut(
        &M,
        &Tensor,
        &Tensor,
        Option<&Condition>,
        &Tensor,
    ) -> Result<(f32, Vec<(String, Tensor)>)>,
>;

/// The random generator of step `step` of a run seeded with `seed` (the seed and the step
/// fill the generator's seed bytes, so no two steps share a stream).
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&step.to_le_bytes());
    bytes[16..24].copy_from_slice(b"fm-train");
    StdRng::from_seed(bytes)
}

/// Mean squared error of `forward(noisy_x, t, labels)` against `target` and its gradient for
/// each of `params` that takes part (by autograd), for any model whose weights are `Var`s.
pub fn loss_and_grads_with<F>(
    forward: F,
    params: &[(String, Tensor)],
    noisy_x: &Tensor,
    t: &Tensor,
    labels: Option<&Tensor>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)>
where
    F: FnOnce(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
{
    let pred = forward(noisy_x, t, labels)?;
    if pred.dims() != target.dims() {
        return Err(Error::Shape {
            what: "prediction".into(),
            expected: format!("{:?} (the shape of the target)", target.dims()),
            got: pred.dims().to_vec(),
        });
    }
    let loss = (pred - target)?.sqr()?.mean_all()?;
    let store = loss.backward()?;
    let grads: Vec<(String, Tensor)> = params
        .iter()
        .filter_map(|(k, p)| store.get(p).map(|g| (k.clone(), g.clone())))
        .collect();
    if grads.is_empty() {
        return Err(Error::Training(
            "no weight received a gradient: the model's weights must be Vars, not detached".into(),
        ));
    }
    Ok((loss.to_dtype(DType::F32)?.to_scalar::<f32>()?, grads))
}

/// The default [`LossFn`]: [`TrainableModel::loss_and_grads`] (for the velocity-mlp, the
/// fused CPU kernel on the CPU, candle's autograd on other devices, where tensors stay put).
pub fn default_loss_and_grads<M: TrainableModel>(
    model: &M,
    noisy_x: &Tensor,
    t: &Tensor,
    cond: Option<&Condition>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)> {
    model.loss_and_grads(noisy_x, t, cond, target)
}

/// Any [`TrainableModel`]'s loss and gradients by candle's autograd through its
/// [`TrainableModel::forward_cond`], on any device: the trait's default, and the reference the
/// fused CPU passes are tested against.
pub fn autograd_loss_and_grads<M: TrainableModel>(
    model: &M,
    noisy_x: &Tensor,
    t: &Tensor,
    cond: Option<&Condition>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)> {
    let params: Vec<(String, Tensor)> = model
        .tensors()
        .into_iter()
        .filter(|(k, _)| !M::is_fixed(k))
        .collect();
    loss_and_grads_with(
        |x, t, _| model.forward_cond(x, t, cond),
        &params,
        noisy_x,
        t,
        None,
        target,
    )
}

/// The velocity-mlp's loss and gradients by candle's autograd, on any device.
pub fn loss_and_grads(
    model: &VelocityMlp,
    noisy_x: &Tensor,
    t: &Tensor,
    cond: Option<&Condition>,
    target: &Tensor,
) -> Result<(f32, Vec<(String, Tensor)>)> {
    autograd_loss_and_grads(model, noisy_x, t, cond, target)
}

/// Replaces the labels whose drop-mask entry is 1 by the null class `num_classes`.
pub fn drop_labels(labels: &[u32], drop_mask: &Tensor, num_classes: usize) -> Result<Vec<u32>> {
    let mask = drop_mask.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if mask.len() != labels.len() {
        return Err(Error::invalid(
            "labels",
            format!("{} labels", labels.len()),
            format!("one label per sample ({})", mask.len()),
        ));
    }
    Ok(labels
        .iter()
        .zip(&mask)
        .map(|(&l, &m)| if m > 0.5 { num_classes as u32 } else { l })
        .collect())
}

/// A batch of given training pairs: data `[B, *x_dims]`, the noise paired with each row
/// (same shape) and the rows' labels (conditional models).
pub type PairBatch = (Tensor, Tensor, Option<Vec<u32>>);

/// What a finished run returns.
#[derive(Debug, Clone)]
pub struct TrainOutput<M = VelocityMlp> {
    /// The EMA model, detached: use it for sampling.
    pub model: M,
    /// The raw (last-step) weights, detached.
    pub raw: M,
    /// `(step, loss)` for every step taken since step 0 (steps counted from 1).
    pub history: Vec<(usize, f32)>,
}

/// A flow-matching training run of a velocity model (by default a [`VelocityMlp`]; any
/// [`TrainableModel`]) whose weights live in a `VarMap`.
pub struct Trainer<M: TrainableModel = VelocityMlp> {
    config: TrainConfig,
    fm: FlowMatching,
    varmap: VarMap,
    /// The trainable weights by spec key, sorted, sharing storage with `model`'s tensors.
    vars: Vec<(String, Var)>,
    model: M,
    optim: AdamW,
    ema: Ema,
    step: usize,
    losses: Vec<f32>,
    loss_fn: LossFn<M>,
    checkpoint: Option<PathBuf>,
    progress: Option<ProgressFn>,
    budget: Option<TimeBudget>,
}

impl<M: TrainableModel> std::fmt::Debug for Trainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("model", self.model.config())
            .field("step", &self.step)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl<M: TrainableModel> Trainer<M> {
    /// A run from freshly initialised weights (the model's `init` with the config's seed); the
    /// model config decides the model (a `VelocityMlpConfig` trains a `VelocityMlp`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::train::{TrainConfig, Trainer};
    /// use flow_matching::{VelocityMlpConfig, XDims};
    ///
    /// let mut model = VelocityMlpConfig::new(XDims::new(2).unwrap());
    /// (model.hidden, model.depth) = (16, 1);
    /// let config = TrainConfig { steps: 5, batch_size: 8, ..TrainConfig::default() };
    /// let mut trainer = Trainer::new(model, config, &Device::Cpu).unwrap();
    /// let out = trainer
    ///     .train(|_rng, b| Ok((Tensor::ones((b, 2), candle_core::DType::F32, &Device::Cpu)?, None)))
    ///     .unwrap();
    /// assert_eq!(out.history.len(), 5);
    /// ```
    pub fn new<C>(model_config: C, config: TrainConfig, device: &Device) -> Result<Self>
    where
        C: ModelConfig<Model = M>,
        M: TrainableModel<Config = C>,
    {
        config.validate()?;
        let varmap = VarMap::new();
        let model = M::init(model_config, &varmap, device, config.seed)?;
        let vars = sorted_vars(&varmap)?;
        let weights: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let optim = AdamW::new(config.adamw, &plain)?;
        let ema = Ema::new(config.ema_decay, config.ema_warmup, &weights)?;
        Self::assemble(config, varmap, vars, model, optim, ema, 0, Vec::new())
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: TrainConfig,
        varmap: VarMap,
        vars: Vec<(String, Var)>,
        model: M,
        optim: AdamW,
        ema: Ema,
        step: usize,
        losses: Vec<f32>,
    ) -> Result<Self> {
        let mut fm = FlowMatching::new(model.x_dims().dims().to_vec())?;
        fm.timestep_sampler = config.timestep_sampler;
        fm.cond_drop_rate = config.cond_drop_rate;
        Ok(Trainer {
            config,
            fm,
            varmap,
            vars,
            model,
            optim,
            ema,
            step,
            losses,
            loss_fn: Box::new(default_loss_and_grads::<M>),
            checkpoint: None,
            progress: None,
            budget: None,
        })
    }

    /// Replaces the loss-and-gradient function (e.g. by a fused kernel).
    pub fn with_loss_fn(mut self, loss_fn: LossFn<M>) -> Self {
        self.loss_fn = loss_fn;
        self
    }

    /// Writes checkpoints to `path` every `checkpoint_every` steps and at the end.
    pub fn with_checkpoint(mut self, path: impl Into<PathBuf>) -> Self {
        self.checkpoint = Some(path.into());
        self
    }

    /// Reports every step (step, loss, learning rate, time left) to `on_progress`; without it
    /// the run is silent. The application decides how to show it (the CLI draws a bar).
    pub fn with_progress(mut self, on_progress: impl FnMut(&Progress) + Send + 'static) -> Self {
        self.progress = Some(Box::new(on_progress));
        self
    }

    /// Sets the total number of steps (to train a resumed run further); it must be at least 1.
    /// A cosine schedule stretches to the new total, so the continued run equals a run
    /// configured with the new total from the start only under a constant schedule.
    pub fn with_steps(mut self, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::invalid("steps", 0, "at least 1"));
        }
        self.config.steps = steps;
        Ok(self)
    }

    /// Plans the step count from the time each step takes so that the run (from the next
    /// call to [`Self::train`]) ends within `budget` of wall time; the configured steps are
    /// the most it plans ([`TimeBudget`] says when it plans), and [`Self::config`]`().steps`
    /// holds the plan afterwards.
    ///
    /// ```
    /// use std::time::Duration;
    /// use candle_core::{DType, Device, Tensor};
    /// use flow_matching::train::{TrainConfig, Trainer};
    /// use flow_matching::{VelocityMlpConfig, XDims};
    ///
    /// let mut model = VelocityMlpConfig::new(XDims::new(2).unwrap());
    /// (model.hidden, model.depth) = (16, 1);
    /// let config = TrainConfig { steps: 1_000_000, batch_size: 8, ..TrainConfig::default() };
    /// let mut trainer = Trainer::new(model, config, &Device::Cpu)?
    ///     .with_time_budget(Duration::from_millis(300));
    /// let out = trainer.train(|_rng, b| Ok((Tensor::ones((b, 2), DType::F32, &Device::Cpu)?, None)))?;
    /// // Far fewer than a million steps, as planned.
    /// assert_eq!(out.history.len(), trainer.config().steps);
    /// assert!(trainer.config().steps < 1_000_000);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn with_time_budget(mut self, budget: std::time::Duration) -> Self {
        self.budget = Some(TimeBudget::new(budget).with_max_steps(self.config.steps));
        self
    }

    /// The time budget, if one is set.
    pub fn time_budget(&self) -> Option<&TimeBudget> {
        self.budget.as_ref()
    }

    /// Starts the budget's clock (if there is one) at the current step.
    fn start_budget(&mut self) {
        let step = self.step;
        if let Some(b) = self.budget.as_mut() {
            b.start(step);
        }
    }

    /// Re-plans the run's total after a step when the budget says so: the config's steps (and
    /// so the schedule and the checkpoints) and the progress reports follow the plan.
    fn follow_budget(&mut self, total: &mut usize, reporter: &mut Reporter) {
        let step = self.step;
        if let Some(new) = self
            .budget
            .as_mut()
            .and_then(|b| b.after_step(step, *total))
        {
            *total = new.max(1);
            self.config.steps = *total;
            reporter.set_total(*total);
        }
    }

    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The variables (trainable weights) under their spec keys.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The optimiser with its moments.
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// The EMA of the weights.
    pub fn ema(&self) -> &Ema {
        &self.ema
    }

    /// The model on the trainable weights (not detached: sample with [`Self::raw_model`]).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// `(step, loss)` for every step taken (steps counted from 1).
    pub fn history(&self) -> Vec<(usize, f32)> {
        self.losses
            .iter()
            .enumerate()
            .map(|(i, &l)| (i + 1, l))
            .collect()
    }

    /// A detached copy of the current raw weights.
    pub fn raw_model(&self) -> M {
        self.model.detach()
    }

    /// The EMA weights as a detached model, ready for sampling.
    pub fn ema_model(&self) -> Result<M> {
        let mut map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .zip(&self.ema.shadow)
            .map(|((k, _), s)| (k.clone(), s.clone()))
            .collect();
        for (k, t) in self.model.tensors() {
            map.entry(k).or_insert_with(|| t.detach());
        }
        M::from_tensors(
            self.model.config().clone(),
            &map,
            std::path::Path::new("<EMA model>"),
        )
    }

    /// Takes one optimiser step on a batch drawn by `data(rng, batch_size)` and returns its
    /// loss. The data function yields `x` `[B, *x_dims]` and the rows' condition: `None`,
    /// labels (`Option<Vec<u32>>`) or a [`Condition`] (continuous features `[B, *c_dims]`).
    pub fn step<D, C>(&mut self, data: &mut D) -> Result<f32>
    where
        D: FnMut(&mut StdRng, usize) -> Result<(Tensor, C)>,
        C: IntoCondition,
    {
        let mut rng = step_rng(self.config.seed, self.step as u64);
        let (x, cond) = data(&mut rng, self.config.batch_size)?;
        let cond = cond.into_condition(self.model.device())?;
        self.step_on(x, None, cond, rng)
    }

    /// Takes one optimiser step on given pairs `(x, noise, labels)` drawn by
    /// `pairs(rng, batch_size)` (reflow, distillation): the noise is used as drawn, not
    /// coupled; times and label drops are drawn as in [`Self::step`].
    pub fn step_pairs<P>(&mut self, pairs: &mut P) -> Result<f32>
    where
        P: FnMut(&mut StdRng, usize) -> Result<PairBatch>,
    {
        let mut rng = step_rng(self.config.seed, self.step as u64);
        let (x, noise, labels) = pairs(&mut rng, self.config.batch_size)?;
        let cond = labels.into_condition(self.model.device())?;
        self.step_on(x, Some(noise), cond, rng)
    }

    fn step_on(
        &mut self,
        x: Tensor,
        noise: Option<Tensor>,
        cond: Option<Condition>,
        mut rng: StdRng,
    ) -> Result<f32> {
        let s = self.step;
        let b = self.config.batch_size;
        if x.rank() == 0 || x.dim(0)? != b {
            return Err(Error::Shape {
                what: "batch from the data function".into(),
                expected: format!("[{b}, {}]", self.model.x_dims()),
                got: x.dims().to_vec(),
            });
        }
        let device = self.model.device().clone();
        let x = x.to_device(&device)?.to_dtype(DType::F32)?;
        let batch = self.fm.construct_training_data(&x, &mut rng)?;
        let cond = self.checked_condition(cond, b)?;
        // Coupling pairs noise within classes, or within groups of rows with nearby continuous
        // conditions (`coupling::condition_groups`), so no row's noise comes from a far-off
        // condition.
        let labels: Option<Vec<u32>> = match &cond {
            Some(Condition::Labels(l)) => Some(l.to_dtype(DType::U32)?.to_vec1::<u32>()?),
            Some(Condition::Features { values, .. })
                if self.config.coupling != crate::coupling::Coupling::Independent =>
            {
                Some(crate::coupling::condition_groups(
                    values,
                    crate::coupling::CONDITION_GROUP_ROWS,
                )?)
            }
            _ => None,
        };
        let batch = match noise {
            // Coupling re-pairs the drawn noise (within classes); it draws nothing, so the
            // random stream, and hence resuming, is the same under every coupling.
            None => crate::coupling::couple_batch(self.config.coupling, batch, labels.as_deref())?,
            Some(noise) => {
                let noise = noise.to_device(x.device())?.to_dtype(DType::F32)?;
                TrainingBatch::from_parts(&x, &batch.t.reshape(b)?, &noise, batch.drop_mask)?
            }
        };
        let cond = match cond {
            Some(c) => Some(
                c.to_device(&device)?
                    .dropped(&batch.drop_mask, self.model.num_classes() as u32)?,
            ),
            None => None,
        };
        let target = batch.target()?;
        let (loss, grads) = (self.loss_fn)(
            &self.model,
            &batch.noisy_x,
            &batch.t,
            cond.as_ref(),
            &target,
        )?;
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "loss is {loss} at step {}: training diverged (lower the learning rate?)",
                s + 1
            )));
        }
        let grads = self.order_grads(grads)?;
        let grads = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(grads, max)?.1,
            None => grads,
        };
        let plain: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        self.optim.step(&plain, &grads, self.config.lr_at(s))?;
        let weights: Vec<Tensor> = plain.iter().map(|v| v.as_tensor().clone()).collect();
        self.ema.update(&weights, self.optim.step)?;
        self.step += 1;
        self.losses.push(loss);
        Ok(loss)
    }

    /// Checks a batch's condition against the model: labels for a class model, features of
    /// the model's `c_dims` for a continuous one, nothing for an unconditional one.
    fn checked_condition(&self, cond: Option<Condition>, b: usize) -> Result<Option<Condition>> {
        let num_classes = self.model.num_classes();
        let cond_dims = self.model.cond_dims();
        match (cond, num_classes, cond_dims) {
            (None, 0, None) => Ok(None),
            (None, n, None) => Err(Error::invalid(
                "labels",
                "none",
                format!("one label per sample: the model has num_classes = {n}"),
            )),
            (None, _, Some(d)) => Err(Error::invalid(
                "condition",
                "none",
                format!("one condition row [{d}] per sample: the model has a continuous condition"),
            )),
            (Some(Condition::Labels(l)), 0, None) => Err(Error::invalid(
                "labels",
                format!("{} labels", l.elem_count()),
                "none: the model is unconditional (num_classes = 0)",
            )),
            (Some(Condition::Features { values, .. }), 0, None) => Err(Error::Shape {
                what: "condition".into(),
                expected: "none: the model is unconditional".into(),
                got: values.dims().to_vec(),
            }),
            (Some(c @ Condition::Labels(_)), _, Some(_))
            | (Some(c @ Condition::Features { .. }), _, None) => {
                // The model's own error names what it takes instead.
                self.model.forward_cond(
                    &Tensor::zeros(
                        self.model.x_dims().batched(b),
                        DType::F32,
                        self.model.device(),
                    )?,
                    &Tensor::zeros(b, DType::F32, self.model.device())?,
                    Some(&c),
                )?;
                Err(Error::invalid(
                    "condition",
                    "given",
                    "the model's kind of condition",
                ))
            }
            (Some(Condition::Labels(l)), n, None) => {
                let v = l.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                if v.len() != b {
                    return Err(Error::invalid(
                        "labels",
                        format!("{} labels", v.len()),
                        format!("one label per sample ({b})"),
                    ));
                }
                if let Some(bad) = v.iter().find(|&&x| x as usize > n) {
                    return Err(Error::invalid(
                        "label",
                        bad,
                        format!("a class in 0..{n} or {n} for no condition"),
                    ));
                }
                Ok(Some(Condition::Labels(l)))
            }
            (Some(c @ Condition::Features { .. }), _, Some(d)) => {
                if let Condition::Features { values, .. } = &c {
                    if values.rank() < 1 || values.dim(0)? != b || values.dims()[1..] != *d.dims() {
                        return Err(Error::Shape {
                            what: "condition from the data function".into(),
                            expected: format!(
                                "[{b}, {d}] (one row per sample, the model's cond_dims)"
                            ),
                            got: values.dims().to_vec(),
                        });
                    }
                }
                Ok(Some(c))
            }
        }
    }

    /// Puts the gradients in the variables' order; a missing or unknown key is an error.
    fn order_grads(&self, grads: Vec<(String, Tensor)>) -> Result<Vec<Tensor>> {
        let mut by_key: HashMap<String, Tensor> = HashMap::with_capacity(grads.len());
        for (k, g) in grads {
            if !self.vars.iter().any(|(name, _)| *name == k) {
                return Err(Error::Training(format!(
                    "gradient for {k:?}, which is not a trainable weight"
                )));
            }
            by_key.insert(k, g);
        }
        self.vars
            .iter()
            .map(|(k, v)| {
                let g = by_key
                    .remove(k)
                    .ok_or_else(|| Error::Training(format!("no gradient for weight {k:?}")))?;
                if g.dims() != v.as_tensor().dims() {
                    return Err(Error::Shape {
                        what: format!("gradient of {k:?}"),
                        expected: format!("{:?}", v.as_tensor().dims()),
                        got: g.dims().to_vec(),
                    });
                }
                Ok(g)
            })
            .collect()
    }

    /// Trains up to `config.steps` (from wherever the run stands), writing checkpoints when a
    /// path is set, and returns the EMA model, the raw model and the loss history.
    pub fn train<D, C>(&mut self, mut data: D) -> Result<TrainOutput<M>>
    where
        D: FnMut(&mut StdRng, usize) -> Result<(Tensor, C)>,
        C: IntoCondition,
    {
        self.run_steps(|t| t.step(&mut data))
    }

    /// [`Self::train`] on given `(x, noise, labels)` pairs (see [`Self::step_pairs`]).
    pub fn train_pairs<P>(&mut self, mut pairs: P) -> Result<TrainOutput<M>>
    where
        P: FnMut(&mut StdRng, usize) -> Result<PairBatch>,
    {
        self.run_steps(|t| t.step_pairs(&mut pairs))
    }

    fn run_steps<S>(&mut self, mut one_step: S) -> Result<TrainOutput<M>>
    where
        S: FnMut(&mut Self) -> Result<f32>,
    {
        // Held for the whole run: a second run writing the same checkpoint fails at once.
        let _lock = self
            .checkpoint
            .as_deref()
            .map(crate::output::OutputLock::acquire)
            .transpose()?;
        let mut total = self.config.steps;
        let mut reporter = Reporter::new("train", self.step.min(total), total);
        let every = self.config.checkpoint_every;
        self.start_budget();
        while self.step < total {
            let lr = self.config.lr_at(self.step);
            let loss = one_step(self)?;
            self.follow_budget(&mut total, &mut reporter);
            if let Some(on_progress) = self.progress.as_mut() {
                reporter.report(self.step, Some(loss), Some(lr), on_progress);
            }
            if let Some(path) = &self.checkpoint {
                if every > 0 && self.step.is_multiple_of(every) && self.step < total {
                    // A periodic checkpoint is there to survive a kill: it is renamed at once
                    // even inside a command's transaction; only the final one waits for the
                    // command's other outputs.
                    crate::output::immediately(|| self.save_checkpoint(path))?;
                }
            }
        }
        if let Some(path) = &self.checkpoint {
            self.save_checkpoint(path)?;
        }
        Ok(TrainOutput {
            model: self.ema_model()?,
            raw: self.raw_model(),
            history: self.history(),
        })
    }
}

impl Trainer<VelocityMlp> {
    /// A run that starts from the weights of `model` (fine-tuning, reflow): fresh optimiser
    /// moments, the EMA started at those weights, `model` itself left untouched.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use flow_matching::train::{TrainConfig, Trainer};
    /// use flow_matching::{VelocityMlpConfig, XDims};
    ///
    /// let mut mc = VelocityMlpConfig::new(XDims::new(2).unwrap());
    /// (mc.hidden, mc.depth) = (16, 1);
    /// let config = TrainConfig { steps: 3, batch_size: 8, ..TrainConfig::default() };
    /// let first = Trainer::new(mc, config.clone(), &Device::Cpu).unwrap().ema_model().unwrap();
    /// let mut tuned = Trainer::from_model(&first, config, &Device::Cpu).unwrap();
    /// let ones = |_: &mut _, b| Ok((Tensor::ones((b, 2), DType::F32, &Device::Cpu)?, None));
    /// assert_eq!(tuned.train(ones).unwrap().history.len(), 3);
    /// ```
    pub fn from_model(model: &VelocityMlp, config: TrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let mut tensors = HashMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Training("the variable map's lock is poisoned".into()))?;
            for (k, t) in model.tensors() {
                // detach + Var::from_tensor copies the storage, so `model` is never updated.
                let t = t.to_device(device)?.detach();
                if k == "time_embed.freqs" {
                    tensors.insert(k, t);
                    continue;
                }
                let var = Var::from_tensor(&t)?;
                tensors.insert(k.clone(), var.as_tensor().clone());
                data.insert(k, var);
            }
        }
        let model = VelocityMlp::from_tensors(
            model.config().clone(),
            &tensors,
            std::path::Path::new("<initial model>"),
        )?;
        let vars = sorted_vars(&varmap)?;
        let weights: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let optim = AdamW::new(config.adamw, &plain)?;
        let ema = Ema::new(config.ema_decay, config.ema_warmup, &weights)?;
        Self::assemble(config, varmap, vars, model, optim, ema, 0, Vec::new())
    }
}

/// The variables of a `VarMap`, sorted by key so every run visits them in the same order.
pub fn sorted_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Training("the variable map's lock is poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}
