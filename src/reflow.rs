//! Few-step models by reflow (rectified flow, Liu et al. 2022).
//!
//! A trained flow maps each noise `z` to a sample `x1 = Φ(z)`; the pairs `(z, Φ(z))` form a
//! deterministic coupling whose straight-line interpolations cross far less than those of
//! independent pairs. Retraining the model (initialised from itself) on those pairs gives a
//! flow whose paths are nearly straight, so one or two Euler steps land close to where the
//! accurate solver does. [`reflow`] repeats this for several rounds; each round's pairs come
//! from the previous round's model under an accurate solver (RK4 by default).
//!
//! Conditional models keep each pair's label: the pairs are drawn for labels cycling over the
//! classes (equal class weights) and the model is retrained on `(z, x1, label)`.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rand::Rng;

use crate::diffusion::{Diffusion, SampleOptions};
use crate::error::{Error, Result};
use crate::evaluate::cycling_labels;
use crate::flow_matching::{FlowMatching, TimestepSampler};
use crate::guidance::Guided;
use crate::model::VelocityMlp;
use crate::progress::Progress;
use crate::solver::Method;
use crate::step::StepFn;
use crate::train::{LrSchedule, PairBatch, TrainConfig, Trainer};

/// `(noise, sample)` pairs drawn from a model, with the labels they were drawn for.
#[derive(Debug, Clone)]
pub struct Pairs {
    /// The noise at t = 0, `[N, *x_dims]`.
    pub noise: Tensor,
    /// Where the solver carried each noise row at t = 1, `[N, *x_dims]`.
    pub x: Tensor,
    /// Each row's class (conditional models).
    pub labels: Option<Vec<u32>>,
    /// Velocity evaluations the solver spent per row.
    pub nfe: usize,
}

impl Pairs {
    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.x.dims()[0]
    }

    /// Whether there are no pairs (never true for generated pairs).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `b` pairs drawn uniformly with replacement, as a trainer's [`PairBatch`].
    pub fn random_batch<R: Rng + ?Sized>(&self, rng: &mut R, b: usize) -> Result<PairBatch> {
        let n = self.len();
        if n == 0 {
            return Err(Error::ZeroBatch);
        }
        let rows: Vec<u32> = (0..b).map(|_| rng.random_range(0..n) as u32).collect();
        let labels = self
            .labels
            .as_ref()
            .map(|l| rows.iter().map(|&i| l[i as usize]).collect());
        let idx = Tensor::from_vec(rows, b, self.x.device())?;
        Ok((
            self.x.index_select(&idx, 0)?,
            self.noise.index_select(&idx, 0)?,
            labels,
        ))
    }
}

/// Rows integrated per solver call in [`generate_pairs`] (bounds the solver's memory).
const PAIR_CHUNK: usize = 8192;

/// Draws `n` noise rows from `seed` and carries each to t = 1 with `method` in `steps` steps
/// (a conditional model: labels cycling over the classes, guided with `guidance`).
///
/// ```
/// use candle_core::Device;
/// use flow_matching::{VelocityMlpConfig, XDims};
/// let mut mc = VelocityMlpConfig::new(XDims::new(2).unwrap());
/// (mc.hidden, mc.depth) = (16, 1);
/// let model = flow_matching::train::Trainer::new(mc, Default::default(), &Device::Cpu)
///     .unwrap()
///     .ema_model()
///     .unwrap();
/// let pairs = flow_matching::reflow::generate_pairs(
///     &model, 10, &flow_matching::Method::Rk4, 8, 0, 1.0,
/// ).unwrap();
/// assert_eq!((pairs.noise.dims(), pairs.x.dims()), (&[10, 2][..], &[10, 2][..]));
/// ```
pub fn generate_pairs(
    model: &VelocityMlp,
    n: usize,
    method: &Method,
    steps: usize,
    seed: u64,
    guidance: f64,
) -> Result<Pairs> {
    if n == 0 {
        return Err(Error::invalid(
            "pairs",
            0,
            "at least 1 (noise, sample) pair",
        ));
    }
    let device = model.device().clone();
    let fm = FlowMatching::new(model.config().x_dims.dims())?;
    let noise = fm.noise(n, Some(seed), candle_core::DType::F32, &device)?;
    let k = model.config().num_classes;
    let labels = (k > 0).then(|| cycling_labels(n, k));
    let mut out = Vec::new();
    let mut nfe = 0;
    for start in (0..n).step_by(PAIR_CHUNK) {
        let rows = PAIR_CHUNK.min(n - start);
        let opts = SampleOptions {
            steps: Some(steps),
            method: Some(method.clone()),
            x_init: Some(noise.narrow(0, start, rows)?),
            ..Default::default()
        };
        let mut plain;
        let mut cond;
        let mut guided;
        let f: &mut dyn StepFn = match &labels {
            None => {
                plain = model.clone();
                &mut plain
            }
            Some(l) if guidance == 1.0 => {
                cond = model.with_labels(&l[start..start + rows])?;
                &mut cond
            }
            Some(l) => {
                guided = Guided::new(model, &l[start..start + rows], guidance)?;
                &mut guided
            }
        };
        let s = fm.sample(rows, f, &device, &opts)?;
        nfe = nfe.max(s.nfe);
        out.push(s.x);
    }
    Ok(Pairs {
        noise,
        x: Tensor::cat(&out, 0)?,
        labels,
        nfe,
    })
}

/// The settings of [`reflow`].
#[derive(Debug, Clone)]
pub struct ReflowOptions {
    /// Pairs generated per round.
    pub pairs: usize,
    /// The solver that generates them.
    pub method: Method,
    /// Its step count (ignored by the adaptive `dopri5`).
    pub solver_steps: usize,
    /// Rounds of generate-then-retrain.
    pub rounds: usize,
    /// Guidance weight when generating a conditional model's pairs (1: plain conditional).
    pub guidance: f64,
    /// The retraining run of each round (its seed is offset by the round).
    pub train: TrainConfig,
    /// Seed of the pairs' noise (offset by the round).
    pub seed: u64,
}

impl Default for ReflowOptions {
    /// 50,000 pairs from RK4 in 32 steps, one round; each round retrains for 6,000 steps of
    /// batch 512 at lr 1e-3 (200 warm-up steps, cosine to 0), EMA 0.999, uniform times.
    fn default() -> Self {
        ReflowOptions {
            pairs: 50_000,
            method: Method::Rk4,
            solver_steps: 32,
            rounds: 1,
            guidance: 1.0,
            train: TrainConfig {
                steps: 6_000,
                batch_size: 512,
                lr: 1e-3,
                warmup_steps: 200,
                schedule: LrSchedule::Cosine { min_lr: 0.0 },
                timestep_sampler: TimestepSampler::Uniform,
                ..TrainConfig::default()
            },
            seed: 0,
        }
    }
}

impl ReflowOptions {
    /// Checks every value; the error names the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if self.pairs == 0 {
            return Err(Error::invalid("--pairs", 0, "at least 1"));
        }
        if self.rounds == 0 {
            return Err(Error::invalid("--rounds", 0, "at least 1"));
        }
        if self.solver_steps == 0 {
            return Err(Error::invalid("solver steps", 0, "at least 1"));
        }
        crate::guidance::check_weight(self.guidance)?;
        self.train.validate()
    }
}

/// What one round of [`reflow`] did.
#[derive(Debug, Clone)]
pub struct ReflowRound {
    /// Velocity evaluations per pair spent by the solver.
    pub solver_nfe: usize,
    /// The mean squared distance between each pair's noise and sample.
    pub mean_pair_distance2: f64,
    /// The mean training loss over the round's last 100 steps.
    pub final_loss: f64,
}

/// Reflows `model` for `options.rounds` rounds and returns the new model (same config, an
/// ordinary velocity-mlp) with one report per round. Each round's training reports its steps
/// to `on_progress` (stage `"reflow"`, steps counted within the round; the library prints
/// nothing).
pub fn reflow(
    model: &VelocityMlp,
    options: &ReflowOptions,
    on_progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<(VelocityMlp, Vec<ReflowRound>)> {
    options.validate()?;
    // Every round's trainer needs its own 'static callback; they share this one.
    let shared = Arc::new(Mutex::new(on_progress));
    let device: Device = model.device().clone();
    let mut current = model.detach();
    // Grown as rounds finish: a count from a flag is never a capacity up front.
    let mut reports = Vec::new();
    for round in 0..options.rounds {
        let seed = options.seed.wrapping_add(1000 * round as u64);
        let pairs = generate_pairs(
            &current,
            options.pairs,
            &options.method,
            options.solver_steps,
            seed,
            options.guidance,
        )?;
        let d2 = (&pairs.x - &pairs.noise)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64
            / pairs.len() as f64;
        let config = TrainConfig {
            seed: options.train.seed.wrapping_add(round as u64),
            ..options.train.clone()
        };
        let cb = Arc::clone(&shared);
        let mut trainer =
            Trainer::from_model(&current, config, &device)?.with_progress(move |p: &Progress| {
                if let Ok(mut f) = cb.lock() {
                    f(&Progress {
                        stage: "reflow",
                        ..p.clone()
                    });
                }
            });
        let out = trainer.train_pairs(|rng, b| pairs.random_batch(rng, b))?;
        let tail = &out.history[out.history.len().saturating_sub(100)..];
        let final_loss = tail.iter().map(|&(_, l)| l as f64).sum::<f64>() / tail.len() as f64;
        current = out.model;
        let report = ReflowRound {
            solver_nfe: pairs.nfe,
            mean_pair_distance2: d2,
            final_loss,
        };
        reports.push(report);
    }
    Ok((current, reports))
}
