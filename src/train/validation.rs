//! Early stopping: train until a held-out validation loss stops improving, keep the best
//! weights (any [`TrainableModel`], under labels, a continuous condition or none).
//!
//! The flow-matching loss of one batch is very noisy (it depends on the drawn times and
//! noise), so the validation set fixes its draws once: each held-out row gets `draws` times
//! and noise rows, and every evaluation scores the EMA model on exactly those. Two
//! evaluations then differ only through the weights (common random numbers).

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{TrainOutput, TrainableModel, Trainer};
use crate::error::{Error, Result};
use crate::flow_matching::{randn, TrainingBatch};
use crate::model::{Condition, IntoCondition};

/// Held-out samples scored per forward pass: bounds the memory of one evaluation (a
/// transformer's activations grow with its tokens).
const CHUNK: usize = 1024;

/// A held-out set with its times and noise drawn once.
#[derive(Debug, Clone)]
pub struct Validation {
    batch: TrainingBatch,
    cond: Option<Condition>,
}

impl Validation {
    /// Fixes `draws` uniform times and noise rows for each row of `x` `[N, *x_dims]` (with
    /// its labels for a conditional model), from `seed`.
    pub fn new(x: &Tensor, labels: Option<Vec<u32>>, draws: usize, seed: u64) -> Result<Self> {
        let cond = labels
            .map(|l| Condition::labels(&l, x.device()))
            .transpose()?;
        Self::with_condition(x, cond, draws, seed)
    }

    /// [`Self::new`] for any condition: the rows' labels or continuous features
    /// `[N, *c_dims]` (row i conditions row i of `x`).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use flow_matching::model::Condition;
    /// use flow_matching::train::Validation;
    /// let x = Tensor::zeros((10, 4), DType::F32, &Device::Cpu)?;
    /// let c = Condition::features(Tensor::ones((10, 3), DType::F32, &Device::Cpu)?);
    /// let v = Validation::with_condition(&x, Some(c), 2, 0)?;
    /// assert_eq!(v.len(), 20);
    /// // One condition row per sample row.
    /// let c = Condition::features(Tensor::ones((9, 3), DType::F32, &Device::Cpu)?);
    /// assert!(Validation::with_condition(&x, Some(c), 2, 0).is_err());
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn with_condition(
        x: &Tensor,
        cond: Option<Condition>,
        draws: usize,
        seed: u64,
    ) -> Result<Self> {
        if draws == 0 {
            return Err(Error::invalid("validation draws", 0, "at least 1 per row"));
        }
        if x.rank() < 2 || x.dim(0)? == 0 {
            return Err(Error::Shape {
                what: "validation data".into(),
                expected: "[N, *x_dims] with N >= 1".into(),
                got: x.dims().to_vec(),
            });
        }
        let n = x.dim(0)?;
        if let Some(c) = &cond {
            let rows = c.batch()?;
            if rows != n {
                return Err(Error::invalid(
                    "validation condition",
                    format!("{rows} rows"),
                    format!("one per held-out row ({n})"),
                ));
            }
        }
        let m = n * draws;
        let idx: Vec<u32> = (0..m).map(|i| (i % n) as u32).collect();
        let idx = Tensor::from_vec(idx, m, x.device())?;
        let x = x.to_dtype(DType::F32)?.index_select(&idx, 0)?;
        let cond = match cond {
            None => None,
            Some(Condition::Labels(l)) => Some(Condition::Labels(
                l.to_dtype(DType::U32)?.index_select(&idx, 0)?,
            )),
            Some(Condition::Features { values, keep }) => Some(Condition::Features {
                values: values.index_select(&idx, 0)?,
                keep: keep.map(|k| k.index_select(&idx, 0)).transpose()?,
            }),
        };
        let mut rng = StdRng::seed_from_u64(seed);
        // Uniform times weight the whole path equally, as the sampler integrates it.
        let t: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
        let t = Tensor::from_vec(t, m, x.device())?;
        let noise = randn(&mut rng, x.dims(), DType::F32, x.device())?;
        let mask = Tensor::zeros(m, DType::F32, x.device())?;
        Ok(Validation {
            batch: TrainingBatch::from_parts(&x, &t, &noise, mask)?,
            cond,
        })
    }

    /// The number of scored samples (held-out rows × draws).
    pub fn len(&self) -> usize {
        self.batch.x.dims().first().copied().unwrap_or(0)
    }

    /// Whether there is nothing to score (never, for a set built by [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mean squared error of `model`'s velocity on the fixed draws.
    pub fn loss<M: TrainableModel>(&self, model: &M) -> Result<f64> {
        let m = self.len();
        let target = self.batch.target()?;
        let mut sum = 0.0f64;
        for start in (0..m).step_by(CHUNK) {
            let len = CHUNK.min(m - start);
            let cond = self
                .cond
                .as_ref()
                .map(|c| c.narrow(start, len))
                .transpose()?;
            let pred = model
                .forward_cond(
                    &self.batch.noisy_x.narrow(0, start, len)?,
                    &self.batch.t.narrow(0, start, len)?,
                    cond.as_ref(),
                )?
                .detach();
            let err = (pred - target.narrow(0, start, len)?)?.sqr()?.sum_all()?;
            sum += err.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(sum / target.elem_count() as f64)
    }
}

/// When [`Trainer::train_early_stopping`] evaluates and when it gives up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStopping {
    /// Evaluate the validation loss every this many steps (at least 1).
    pub every: usize,
    /// Stop after this many evaluations in a row without a new best (at least 1).
    pub patience: usize,
    /// A new best must beat the old by this fraction (e.g. 0.002 = 0.2%).
    pub min_rel_improvement: f64,
}

impl Default for EarlyStopping {
    /// Every 500 steps, patience 4 evaluations, 0.2% improvement.
    fn default() -> Self {
        EarlyStopping {
            every: 500,
            patience: 4,
            min_rel_improvement: 0.002,
        }
    }
}

/// What early stopping saw.
#[derive(Debug, Clone)]
pub struct EarlyStopReport {
    /// `(step, validation loss of the EMA model)` at every evaluation.
    pub validation: Vec<(usize, f64)>,
    /// The step whose EMA weights were kept, and their validation loss.
    pub best: (usize, f64),
    /// Whether training stopped before `config.steps`.
    pub stopped_early: bool,
}

impl<M: TrainableModel> Trainer<M> {
    /// Trains up to `config.steps`, evaluating the EMA model on `validation` every
    /// `stop.every` steps, and stops once `stop.patience` evaluations in a row brought no
    /// new best; the returned model is the best EMA model seen (`raw` is the last raw
    /// weights). A checkpoint, when a path is set, is written at the end.
    pub fn train_early_stopping<D, C>(
        &mut self,
        mut data: D,
        validation: &Validation,
        stop: &EarlyStopping,
    ) -> Result<(TrainOutput<M>, EarlyStopReport)>
    where
        D: FnMut(&mut StdRng, usize) -> Result<(Tensor, C)>,
        C: IntoCondition,
    {
        if stop.every == 0 || stop.patience == 0 {
            return Err(Error::invalid(
                "early stopping",
                format!("every {}, patience {}", stop.every, stop.patience),
                "both at least 1",
            ));
        }
        // Held for the whole run, as by `train`: a second run writing the same checkpoint
        // fails at once.
        let _lock = self
            .checkpoint
            .as_deref()
            .map(crate::output::OutputLock::acquire)
            .transpose()?;
        let mut total = self.config.steps;
        let mut reporter = crate::progress::Reporter::new("train", self.step.min(total), total);
        self.start_budget();
        let mut history = Vec::new();
        let mut best: Option<(usize, f64, M)> = None;
        let mut misses = 0;
        let mut stopped_early = false;
        while self.step < total {
            let lr = self.config.lr_at(self.step);
            let loss = self.step(&mut data)?;
            self.follow_budget(&mut total, &mut reporter);
            if let Some(on_progress) = self.progress.as_mut() {
                reporter.report(self.step, Some(loss), Some(lr), on_progress);
            }
            if !(self.step.is_multiple_of(stop.every) || self.step == total) {
                continue;
            }
            let model = self.ema_model()?;
            let loss = validation.loss(&model)?;
            history.push((self.step, loss));
            let improved = match &best {
                None => true,
                Some((_, b, _)) => loss < b * (1.0 - stop.min_rel_improvement),
            };
            if improved {
                best = Some((self.step, loss, model));
                misses = 0;
            } else {
                misses += 1;
                if misses >= stop.patience && self.step < total {
                    stopped_early = true;
                    break;
                }
            }
        }
        if let Some(path) = &self.checkpoint {
            self.save_checkpoint(path)?;
        }
        let (best_step, best_loss, model) = match best {
            Some(b) => b,
            // Already at config.steps: score the current weights.
            None => {
                let m = self.ema_model()?;
                (self.step, validation.loss(&m)?, m)
            }
        };
        Ok((
            TrainOutput {
                model,
                raw: self.raw_model(),
                history: self.history(),
            },
            EarlyStopReport {
                validation: history,
                best: (best_step, best_loss),
                stopped_early,
            },
        ))
    }
}
