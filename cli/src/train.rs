//! `flow-matching train`: fit a velocity-mlp or a waypoint transformer to a dataset
//! (optionally conditioned on class labels or on a continuous condition file) and write it as
//! a checkpoint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use flow_matching::data::{driving, Batch, DataSource, Dataset};
use flow_matching::diffusion::XDims;
use flow_matching::error::{Error, Result};
use flow_matching::io::read_npy;
use flow_matching::model::{
    file_format, CondNorm, Condition, TransformerConfig, VelocityMlpConfig, WaypointTransformer,
    TRANSFORMER_FORMAT,
};
use flow_matching::output::{check_outputs, prepare_outputs};
use flow_matching::train::{
    AdamWParams, Architecture, EarlyStopping, ModelConfig, Sizing, TrainConfig, TrainOutput,
    TrainableModel, Trainer, Validation, TRANSFORMER_BUDGET, TRANSFORMER_STEPS,
};

/// Model and optimiser settings shared by `train` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainSettings {
    /// Optimiser steps in total (default: chosen from the data's size and dimension, see
    /// --help of `train`; a resumed run keeps its own total unless given).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Plan the step count to fit this much wall time, from the time the run measures per
    /// step (600, 90s, 10m, 1h30m); with --steps that is the most it takes. The other sizes
    /// are still chosen from the data.
    #[arg(long, value_name = "DURATION")]
    pub time_budget: Option<String>,
    /// Samples per step (default: chosen from the data).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Learning rate after warm-up: constant, cosine or cosine:MIN_LR.
    #[arg(long, default_value = "cosine")]
    pub lr_schedule: String,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0: no clipping).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub clip: f64,
    /// EMA decay of the weights used for sampling.
    #[arg(long, default_value_t = 0.999)]
    pub ema: f64,
    /// How training draws times: uniform, beta, logit-normal or logit-normal:M,S (logit-normal
    /// measured best on two moons: sliced W2 at 32 Euler steps 0.046 against uniform's 0.065).
    #[arg(long, default_value = "logit-normal")]
    pub timesteps: String,
    /// Probability of dropping the label or the continuous condition to the learned null
    /// condition (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub cond_drop: f64,
    /// Hidden width of the MLP (default: chosen from the data).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Hidden layers of the MLP, or attention blocks of the transformer (default: chosen from
    /// the data).
    #[arg(long)]
    pub depth: Option<usize>,
    /// Time frequencies of the MLP, Fourier frequencies per value of the transformer (default:
    /// 16 for the MLP, 10 for the transformer).
    #[arg(long)]
    pub freqs: Option<usize>,
    /// Width of the class embedding or of the continuous condition's projection (MLP).
    #[arg(long, default_value_t = 32)]
    pub cond_dim: usize,
    /// Token width of the waypoint transformer (--arch transformer).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Attention heads of the waypoint transformer.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Hidden width of each transformer block's MLP.
    #[arg(long, default_value_t = 128)]
    pub mlp_hidden: usize,
    /// Seed of the weights and of every random draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: usize,
    /// How each batch pairs noise with data: independent, or minibatch optimal transport: ot
    /// (exact up to 1024 rows per class, Sinkhorn above), ot:exact, ot:sinkhorn. OT makes
    /// straighter paths, so 1-2 step sampling is far better; it costs about 9 ms a step at
    /// batch 256.
    #[arg(long, default_value = "independent")]
    pub coupling: String,
}

impl TrainSettings {
    /// The sizes of the run: the ones given, the rest chosen by `Sizing::for_data` from the
    /// table's rows (`None` for endless data) and the sample's dimension (with or without a
    /// condition: the same rule met the users'-files bar for conditional `[64, 2]` futures);
    /// the flag says whether any was chosen.
    pub fn sizing(&self, rows: Option<usize>, dim: usize) -> (Sizing, bool) {
        let auto = Sizing::for_data(rows, dim);
        let chosen = self.steps.is_none()
            || self.batch.is_none()
            || self.hidden.is_none()
            || self.depth.is_none();
        // Under a time budget the step count is planned as the run goes, up to --steps.
        let open = if self.time_budget.is_some() {
            BUDGET_MAX_STEPS
        } else {
            auto.steps
        };
        let s = Sizing {
            hidden: self.hidden.unwrap_or(auto.hidden),
            depth: self.depth.unwrap_or(auto.depth),
            batch_size: self.batch.unwrap_or(auto.batch_size),
            steps: self.steps.unwrap_or(open),
        };
        (s, chosen)
    }

    /// The `--time-budget`, parsed.
    pub fn time_budget(&self) -> Result<Option<Duration>> {
        self.time_budget
            .as_deref()
            .map(|t| crate::bounds::duration("--time-budget", t))
            .transpose()
    }

    /// The trainer's config with the run's sizes.
    pub fn train_config(&self, sizing: &Sizing) -> Result<TrainConfig> {
        crate::bounds::at_least_one("--steps", sizing.steps)?;
        crate::bounds::at_least_one("--batch", sizing.batch_size)?;
        // 0 used to be taken silently (a checkpoint only at the end); --help promises one
        // every N steps.
        crate::bounds::at_least_one("--checkpoint-every", self.checkpoint_every)?;
        // A negative value used to turn clipping off silently; only 0 means "off".
        crate::bounds::non_negative("--clip", self.clip, "0: no clipping")?;
        let config = TrainConfig {
            steps: sizing.steps,
            batch_size: sizing.batch_size,
            lr: self.lr,
            adamw: AdamWParams {
                weight_decay: self.weight_decay,
                ..AdamWParams::default()
            },
            max_grad_norm: (self.clip > 0.0).then_some(self.clip),
            warmup_steps: self.warmup,
            schedule: self.lr_schedule.parse()?,
            ema_decay: self.ema,
            ema_warmup: true,
            timestep_sampler: self.timesteps.parse()?,
            cond_drop_rate: self.cond_drop,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            coupling: self.coupling.parse()?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The model's config for data of shape `x_dims` with `num_classes` classes (0: unconditional).
    pub fn model_config(
        &self,
        sizing: &Sizing,
        x_dims: &[usize],
        num_classes: usize,
    ) -> Result<VelocityMlpConfig> {
        let config = VelocityMlpConfig {
            x_dims: XDims::new(x_dims)?,
            hidden: sizing.hidden,
            depth: sizing.depth,
            num_classes,
            num_freqs: self.freqs.unwrap_or(16),
            cond_dim: self.cond_dim,
            cond_dims: None,
            cond_norm: None,
        };
        config.validate()?;
        crate::bounds::training(&config, sizing.batch_size, sizing.steps)?;
        Ok(config)
    }

    /// The waypoint transformer's config for data of shape `x_dims` (`[L, C]`): `--width`,
    /// `--heads`, `--mlp-hidden`, the run's depth as its blocks and `--freqs` (default 10) as
    /// its Fourier frequencies.
    pub fn transformer_config(
        &self,
        sizing: &Sizing,
        x_dims: &[usize],
    ) -> Result<TransformerConfig> {
        if x_dims.len() != 2 {
            return Err(Error::invalid(
                "--arch",
                "transformer",
                format!(
                    "data of shape [N, L, C] (L waypoint tokens of C values); this data's rows are {x_dims:?} (use --arch mlp)"
                ),
            ));
        }
        let config = TransformerConfig {
            x_dims: XDims::new(x_dims)?,
            width: self.width,
            depth: sizing.depth,
            heads: self.heads,
            mlp_hidden: self.mlp_hidden,
            num_freqs: self.freqs.unwrap_or(10),
            cond_dims: None,
            cond_norm: None,
        };
        config.validate()?;
        crate::bounds::training_transformer(&config, sizing.batch_size, sizing.steps)?;
        Ok(config)
    }
}

/// The velocity network of `--arch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// The velocity-mlp (any sample shape).
    Mlp,
    /// The waypoint transformer (`[L, C]` samples).
    Transformer,
}

impl Arch {
    /// `train --arch`: `auto` (`None`: chosen from the data by `Architecture::for_data`) or
    /// one of the networks.
    fn parse_or_auto(s: &str) -> Result<Option<Self>> {
        if s == "auto" {
            return Ok(None);
        }
        Self::named(s, "auto, mlp, transformer").map(Some)
    }

    /// The network named `s`; an unknown name's error lists `known`.
    fn named(s: &str, known: &str) -> Result<Self> {
        match s {
            "mlp" => Ok(Arch::Mlp),
            "transformer" => Ok(Arch::Transformer),
            other => Err(Error::UnknownName {
                kind: "architecture (--arch)",
                name: flow_matching::limits::excerpt(other),
                known: known.to_string(),
            }),
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::named(s, "mlp, transformer")
    }
}

/// The most steps a run under `--time-budget` without `--steps` plans (its loss history is
/// 24 MB at this count).
pub const BUDGET_MAX_STEPS: usize = 1_000_000;

/// Early stopping on a held-out slice of the data.
#[derive(Debug, Clone, clap::Args)]
pub struct EarlyStopArgs {
    /// Hold out a slice of the data and stop when its loss stops improving; the best EMA
    /// weights are written. --steps (or the chosen count) is then the most steps.
    #[arg(long)]
    pub early_stop: bool,
    /// The fraction of a data file held out (toys: a fresh sample of 2,000 points).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Evaluate the held-out loss every this many steps.
    #[arg(long, default_value_t = 500)]
    pub val_every: usize,
    /// Stop after this many evaluations in a row without a new best.
    #[arg(long, default_value_t = 4)]
    pub patience: usize,
}

/// Arguments of `train`.
///
/// Sizes chosen from the data when --steps, --batch, --hidden or --depth are not given
/// (printed at the start). --arch auto takes the waypoint transformer (width 64, depth 3,
/// batch 256, 3,000 steps, fewer if they would not fit in 9 minutes) for a file of at least
/// 10,000 sequences [L, C] with L ≥ 32 and C ≤ 8 and no class labels, the velocity-mlp
/// otherwise: data of dimension D ≤ 16 get hidden 128, depth 3, batch 256, 20,000 steps;
/// 16 < D ≤ 256: hidden 256, depth 3, batch 256, 24,000 steps; larger: hidden 512, depth 4,
/// batch 128, 8,000 steps. A data file of N rows is seen at most 300 times (steps ≤ 300 N /
/// batch), never fewer than 2,000 steps. The same rule holds with a continuous condition
/// (--cond; docs/training.md).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct TrainArgs {
    /// moons, 8gaussians, checkerboard, circles, swissroll, digits, driving (scenes with their
    /// own continuous condition), or a .csv/.npy file of rows ([N, *x_dims] for .npy).
    #[arg(long)]
    data: String,
    /// For a data file: the 0-based column holding integer class labels.
    #[arg(long)]
    label_column: Option<usize>,
    /// Train a class-conditional model (with classifier-free guidance label dropping).
    #[arg(long)]
    conditional: bool,
    /// A continuous condition [N, *c_dims] (.npy, any rank from 2): row i conditions row i of
    /// --data. Dropped to a learned null condition at --cond-drop (classifier-free guidance).
    #[arg(long, value_name = "C.npy")]
    cond: Option<PathBuf>,
    /// The velocity network: auto (the rule below), mlp (any shape) or transformer (rows
    /// [L, C]: one token per waypoint, docs/waypoint-transformer.md). A resumed run keeps its
    /// checkpoint's.
    #[arg(long, default_value = "auto")]
    arch: String,
    #[command(flatten)]
    settings: TrainSettings,
    /// Continue from a checkpoint written by an earlier run (its settings are kept; --steps sets the new total).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// The checkpoint/model file to write (velocity-mlp or waypoint-transformer safetensors,
    /// EMA weights under the spec's keys).
    #[arg(long)]
    out: PathBuf,
    /// Also write a PNG of the loss curve.
    #[arg(long)]
    loss_plot: Option<PathBuf>,
    #[command(flatten)]
    early: EarlyStopArgs,
}

/// A continuous condition for training: one row per data row (a file), or drawn with each
/// batch (the driving scenes).
#[derive(Debug, Clone)]
pub struct CondData {
    /// The rows `[N, *c_dims]` (for the driving scenes: a probe of 4,096 scenes, used only for
    /// the standardisation).
    pub values: Tensor,
    /// Where it came from, for messages.
    pub origin: String,
}

/// The data a run trains on: endless fresh toy samples, or batches drawn from a loaded table.
pub struct TrainingData {
    /// Where the data comes from.
    pub source: DataSource,
    /// The loaded table (for files and digits), labels removed for unconditional runs.
    pub table: Option<Dataset>,
    /// The sample shape.
    pub x_dims: Vec<usize>,
    /// Classes used for conditioning (0: unconditional).
    pub num_classes: usize,
    /// A continuous condition (`--cond`, or the driving scenes' own).
    pub cond: Option<CondData>,
}

/// Scenes drawn once to standardise the driving condition.
const DRIVING_PROBE: usize = 4096;

impl TrainingData {
    /// Opens a data source for training, conditional or not. The driving scenes always carry
    /// their continuous condition.
    pub fn open(data: &str, label_column: Option<usize>, conditional: bool) -> Result<Self> {
        let source = DataSource::parse(data)?.with_label_column(label_column)?;
        let (table, x_dims, num_classes) = if source.is_infinite() {
            let probe = source.load(1, 0)?;
            (None, probe.x_dims().to_vec(), probe.num_classes)
        } else {
            let d = source.load(0, 0)?;
            let (x_dims, k) = (d.x_dims().to_vec(), d.num_classes);
            (Some(d), x_dims, k)
        };
        if conditional && num_classes == 0 {
            return Err(Error::invalid(
                "--conditional",
                &source,
                "a dataset with labels (digits, moons, or a file with --label-column)",
            ));
        }
        let num_classes = if conditional { num_classes } else { 0 };
        let table = match table {
            Some(t) if !conditional => Some(t.without_labels()),
            t => t,
        };
        let cond = if source == DataSource::Driving {
            Some(CondData {
                values: driving::draw_driving(DRIVING_PROBE, 12345)?.cond,
                origin: "the driving scenes' features".into(),
            })
        } else {
            None
        };
        Ok(TrainingData {
            source,
            table,
            x_dims,
            num_classes,
            cond,
        })
    }

    /// Attaches a continuous condition file `[N, *c_dims]`: row i conditions row i of the
    /// data, so the row counts must agree (the error names both files).
    pub fn with_cond_file(mut self, path: &Path, device: &Device) -> Result<Self> {
        if self.num_classes > 0 {
            return Err(Error::invalid(
                "--cond",
                path.display(),
                "either --conditional (class labels) or --cond (a continuous condition), not both",
            ));
        }
        if self.cond.is_some() {
            return Err(Error::invalid(
                "--cond",
                path.display(),
                format!(
                    "no --cond with --data {}: its scenes carry their own condition",
                    self.source
                ),
            ));
        }
        let Some(table) = self.table.as_ref() else {
            return Err(Error::invalid(
                "--cond",
                path.display(),
                format!(
                    "a data file with one row per condition row (--data {} draws fresh samples)",
                    self.source
                ),
            ));
        };
        let c = read_npy(path, device)?;
        let n = table.len();
        if c.rank() < 2 || c.dim(0)? != n {
            return Err(Error::Shape {
                what: format!("--cond {} (one row per row of --data {})", path.display(), self.source),
                expected: format!(
                    "[{n}, ...] ({n} rows, as the data; a 1-D file of one number per row: reshape it to [{n}, 1])"
                ),
                got: c.dims().to_vec(),
            });
        }
        if let Some(i) = c
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .position(|v| !v.is_finite())
        {
            return Err(Error::invalid(
                "--cond",
                path.display(),
                format!("finite numbers (value {i} in row-major order is NaN or infinite)"),
            ));
        }
        self.cond = Some(CondData {
            values: c,
            origin: format!("--cond {}", path.display()),
        });
        Ok(self)
    }

    /// The continuous condition's row shape and its standardisation (from the rows), if any.
    pub fn cond_shape(&self) -> Result<Option<(XDims, CondNorm)>> {
        match &self.cond {
            None => Ok(None),
            Some(c) => Ok(Some((
                XDims::new(&c.values.dims()[1..])?,
                CondNorm::from_rows(&c.values)?,
            ))),
        }
    }

    /// The numbers in one condition row (`None`: no continuous condition).
    pub fn cond_features(&self) -> Option<usize> {
        self.cond
            .as_ref()
            .map(|c| c.values.dims()[1..].iter().product())
    }

    /// Draws one batch of `b` rows (labels only for a conditional run).
    pub fn draw(&self, rng: &mut StdRng, b: usize) -> Result<Batch> {
        let (x, labels) = match &self.table {
            Some(t) => t.random_batch(rng, b)?,
            None => self.source.draw_batch(rng, b)?,
        };
        Ok((x, if self.num_classes > 0 { labels } else { None }))
    }

    /// Draws one batch of `b` rows with their continuous condition: rows of the table with the
    /// same rows of the condition file, or fresh driving scenes.
    pub fn draw_cond(&self, rng: &mut StdRng, b: usize) -> Result<(Tensor, Condition)> {
        if self.source == DataSource::Driving {
            let d = driving::draw_driving_with(b, rng)?;
            return Ok((d.x, Condition::features(d.cond)));
        }
        let (Some(table), Some(c)) = (&self.table, &self.cond) else {
            return Err(Error::invalid(
                "condition",
                "none",
                "a data file with --cond (a continuous condition per row)",
            ));
        };
        let n = table.len();
        let indices: Vec<usize> = (0..b).map(|_| rng.random_range(0..n)).collect();
        let (x, _) = table.batch(&indices)?;
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, b, c.values.device())?;
        Ok((x, Condition::features(c.values.index_select(&idx, 0)?)))
    }

    /// The number of rows of a finite table (`None` for endless data).
    pub fn rows(&self) -> Option<usize> {
        self.table.as_ref().map(Dataset::len)
    }

    /// The numbers in one sample.
    pub fn dim(&self) -> usize {
        self.x_dims.iter().product()
    }

    /// The sizes of a new run on this data (see [`TrainSettings::sizing`]).
    pub fn sizing(&self, settings: &TrainSettings) -> (Sizing, bool) {
        settings.sizing(self.rows(), self.dim())
    }

    /// The velocity-mlp's config for this data (with its continuous condition, if any).
    pub fn mlp_config(
        &self,
        settings: &TrainSettings,
        sizing: &Sizing,
    ) -> Result<VelocityMlpConfig> {
        let mut mc = settings.model_config(sizing, &self.x_dims, self.num_classes)?;
        if let Some((dims, norm)) = self.cond_shape()? {
            (mc.cond_dims, mc.cond_norm) = (Some(dims), Some(norm));
            mc.validate()?;
        }
        Ok(mc)
    }

    /// The waypoint transformer's config for this data (with its continuous condition, if any).
    pub fn transformer_config(
        &self,
        settings: &TrainSettings,
        sizing: &Sizing,
    ) -> Result<TransformerConfig> {
        if self.num_classes > 0 {
            return Err(Error::invalid(
                "--arch",
                "transformer",
                "a model without class labels (--conditional): give the transformer a continuous condition with --cond",
            ));
        }
        let mut mc = settings.transformer_config(sizing, &self.x_dims)?;
        if let Some((dims, norm)) = self.cond_shape()? {
            (mc.cond_dims, mc.cond_norm) = (Some(dims), Some(norm));
            mc.validate()?;
        }
        Ok(mc)
    }
}

/// Trains (or resumes) a velocity-mlp on `data`, writing checkpoints to `out`.
pub fn fit(
    data: &TrainingData,
    settings: &TrainSettings,
    resume: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<TrainOutput> {
    fit_with(data, settings, resume, out, device, None)
}

/// A new trainer for `mc` with the run's sizes, or the resumed checkpoint `resume` (whose
/// data shape, classes and condition must be the data's).
fn trainer_for<C>(
    data: &TrainingData,
    mc: impl FnOnce(&Sizing) -> Result<C>,
    settings: &TrainSettings,
    resume: Option<&Path>,
    device: &Device,
) -> Result<Trainer<C::Model>>
where
    C: ModelConfig,
{
    let budget = settings.time_budget()?;
    let with_budget = |t: Trainer<C::Model>| match budget {
        Some(b) => t.with_time_budget(b),
        None => t,
    };
    let Some(p) = resume else {
        let (sizing, _) = data.sizing(settings);
        let config = mc(&sizing)?;
        return Ok(with_budget(Trainer::new(
            config,
            settings.train_config(&sizing)?,
            device,
        )?));
    };
    let mut t = Trainer::<C::Model>::resume_model(p, device)?;
    match (settings.steps, budget) {
        (Some(steps), _) => t = t.with_steps(steps)?,
        // A resumed run under a budget plans from where it stands.
        (None, Some(_)) => {
            let done = t.steps_done();
            t = t.with_steps(done.saturating_add(BUDGET_MAX_STEPS))?
        }
        (None, None) => {}
    }
    let t = with_budget(t);
    let m = t.model();
    let want = data.cond.as_ref().map(|c| c.values.dims()[1..].to_vec());
    let has = m.cond_dims().map(|d| d.dims().to_vec());
    if m.x_dims().dims() != data.x_dims.as_slice()
        || m.num_classes() != data.num_classes
        || want != has
    {
        let show = |d: Option<Vec<usize>>| d.map_or("none".to_string(), |d| format!("{d:?}"));
        return Err(Error::invalid(
            "--resume",
            p.display(),
            format!(
                "a checkpoint for data of shape {:?} with {} classes and continuous condition {} (it has x_dims {}, {} classes, condition {})",
                data.x_dims,
                data.num_classes,
                show(want),
                m.x_dims(),
                m.num_classes(),
                show(has)
            ),
        ));
    }
    Ok(t)
}

/// Runs a trainer to its end on `data`: with the continuous condition when there is one.
fn run_trainer<M: TrainableModel>(
    data: &TrainingData,
    trainer: Trainer<M>,
    out: &Path,
) -> Result<TrainOutput<M>> {
    let bar = crate::progress::Bar::new(trainer.config().steps, "step");
    let mut trainer = trainer.with_checkpoint(out).with_progress(bar.callback());
    if data.cond.is_some() {
        trainer.train(|rng, b| data.draw_cond(rng, b))
    } else {
        trainer.train(|rng, b| data.draw(rng, b))
    }
}

/// [`fit`] for the waypoint transformer, optionally with early stopping on a held-out slice.
pub fn fit_transformer(
    data: &TrainingData,
    settings: &TrainSettings,
    resume: Option<&Path>,
    out: &Path,
    device: &Device,
    early: Option<&EarlyStopArgs>,
) -> Result<TrainOutput<WaypointTransformer>> {
    let trainer = trainer_for(
        data,
        |s| data.transformer_config(settings, s),
        settings,
        resume,
        device,
    )?;
    crate::bounds::training_transformer(
        trainer.model().config(),
        trainer.config().batch_size,
        trainer.config().steps,
    )?;
    run_early(data, trainer, out, early)
}

/// [`fit`], optionally with early stopping on a held-out slice.
pub fn fit_with(
    data: &TrainingData,
    settings: &TrainSettings,
    resume: Option<&Path>,
    out: &Path,
    device: &Device,
    early: Option<&EarlyStopArgs>,
) -> Result<TrainOutput> {
    let trainer = trainer_for(
        data,
        |s| data.mlp_config(settings, s),
        settings,
        resume,
        device,
    )?;
    crate::bounds::training(
        trainer.model().config(),
        trainer.config().batch_size,
        trainer.config().steps,
    )?;
    run_early(data, trainer, out, early)
}

/// Refuses a `--val-fraction` outside (0, 1).
fn check_fraction(fraction: f64) -> Result<()> {
    if fraction > 0.0 && fraction < 1.0 {
        return Ok(());
    }
    Err(Error::invalid(
        "--val-fraction",
        fraction,
        "a fraction strictly between 0 and 1",
    ))
}

/// Rows held out of a toy or of the driving scenes (fresh draws, not seen in training).
const HELD_OUT_DRAWN: usize = 2000;

/// The held-out rows of an early-stopped run and the data it trains on instead.
struct HeldOut {
    /// The rest of a table with its condition rows (`None`: endless data, drawn as before).
    train: Option<TrainingData>,
    /// The held-out samples `[N, *x_dims]`.
    x: Tensor,
    /// Their labels or continuous condition rows.
    cond: Option<Condition>,
}

impl TrainingData {
    /// Splits off a seeded `fraction` of a table's rows (the same rows of its condition), or
    /// draws fresh held-out rows from endless data.
    fn held_out(&self, fraction: f64, seed: u64) -> Result<HeldOut> {
        check_fraction(fraction)?;
        let labels = |l: Option<Vec<u32>>, device: &Device| -> Result<Option<Condition>> {
            match l {
                Some(l) if self.num_classes > 0 => Ok(Some(Condition::labels(&l, device)?)),
                _ => Ok(None),
            }
        };
        let Some(t) = &self.table else {
            if self.source == DataSource::Driving {
                let d = driving::draw_driving(HELD_OUT_DRAWN, seed)?;
                return Ok(HeldOut {
                    train: None,
                    x: d.x,
                    cond: Some(Condition::features(d.cond)),
                });
            }
            let all: Vec<usize> = (0..HELD_OUT_DRAWN).collect();
            let (x, l) = self.source.load(HELD_OUT_DRAWN, seed)?.batch(&all)?;
            let cond = labels(l, x.device())?;
            return Ok(HeldOut {
                train: None,
                x,
                cond,
            });
        };
        if t.len() < 2 {
            return Err(Error::invalid(
                "--early-stop",
                &self.source,
                format!(
                    "a data file of at least 2 rows to hold some out (it has {})",
                    t.len()
                ),
            ));
        }
        let mut rng: StdRng = rand::SeedableRng::seed_from_u64(seed);
        let idx = t.shuffled_indices(&mut rng);
        let k = ((t.len() as f64 * fraction).round() as usize).clamp(1, t.len() - 1);
        let (held_idx, rest_idx) = idx.split_at(k);
        let (x, held_labels) = t.batch(held_idx)?;
        let rest = t.batch(rest_idx)?;
        let rows = |which: &[usize], c: &Tensor| -> Result<Tensor> {
            let i: Vec<u32> = which.iter().map(|&i| i as u32).collect();
            Ok(c.index_select(&Tensor::from_vec(i, which.len(), c.device())?, 0)?)
        };
        let (cond, train_cond) = match &self.cond {
            Some(c) => (
                Some(Condition::features(rows(held_idx, &c.values)?)),
                Some(CondData {
                    values: rows(rest_idx, &c.values)?,
                    origin: c.origin.clone(),
                }),
            ),
            None => (labels(held_labels, x.device())?, None),
        };
        Ok(HeldOut {
            train: Some(TrainingData {
                source: self.source.clone(),
                table: Some(Dataset::new(rest.0, rest.1, t.num_classes)?),
                x_dims: self.x_dims.clone(),
                num_classes: self.num_classes,
                cond: train_cond,
            }),
            x,
            cond,
        })
    }
}

/// Runs a trainer to its end, or, with `--early-stop`, on the data less a held-out slice
/// until the slice's loss stops improving (the best EMA weights are returned and written).
fn run_early<M: TrainableModel>(
    data: &TrainingData,
    trainer: Trainer<M>,
    out: &Path,
    early: Option<&EarlyStopArgs>,
) -> Result<TrainOutput<M>> {
    let Some(early) = early.filter(|e| e.early_stop) else {
        return run_trainer(data, trainer, out);
    };
    let seed = trainer.config().seed;
    let held = data.held_out(early.val_fraction, seed ^ 0x5eed)?;
    let validation = Validation::with_condition(&held.x, held.cond, 4, seed.wrapping_add(1))?;
    let stop = EarlyStopping {
        every: early.val_every,
        patience: early.patience,
        ..EarlyStopping::default()
    };
    let bar = crate::progress::Bar::new(trainer.config().steps, "step");
    let mut trainer = trainer.with_checkpoint(out).with_progress(bar.callback());
    let train = held.train.as_ref().unwrap_or(data);
    let (out, report) = if train.cond.is_some() {
        trainer.train_early_stopping(|rng, b| train.draw_cond(rng, b), &validation, &stop)?
    } else {
        trainer.train_early_stopping(|rng, b| train.draw(rng, b), &validation, &stop)?
    };
    drop(bar);
    eprintln!(
        "early stopping: best held-out loss {:.5} at step {}{} ({} evaluations on {} held-out rows)",
        report.best.1,
        report.best.0,
        if report.stopped_early {
            format!(", stopped at step {}", out.history.len())
        } else {
            String::new()
        },
        report.validation.len(),
        held.x.dims().first().copied().unwrap_or(0)
    );
    Ok(out)
}

/// Runs `train`.
pub fn run(mut a: TrainArgs) -> Result<()> {
    let device = Device::Cpu;
    // Every output is checked and locked before the data is read or a step is taken.
    let mut outputs = vec![("--out", a.out.as_path())];
    if let Some(p) = &a.loss_plot {
        outputs.push(("--loss-plot", p.as_path()));
    }
    let data_path = Path::new(&a.data);
    let mut inputs: Vec<(&str, &Path)> = if data_path.is_file() {
        vec![("--data", data_path)]
    } else {
        Vec::new()
    };
    if let Some(c) = &a.cond {
        inputs.push(("--cond", c.as_path()));
    }
    let _locks = prepare_outputs(&outputs, &inputs)?;
    // --out may be the --resume file (a run continued in place); the loss plot may not.
    if let (Some(plot), Some(resume)) = (&a.loss_plot, &a.resume) {
        check_outputs(&[("--loss-plot", plot)], &[("--resume", resume)])?;
    }
    // A resumed run keeps its checkpoint's kind of model; `None`: --arch auto.
    let asked = match &a.resume {
        Some(p) if file_format(p)?.as_deref() == Some(TRANSFORMER_FORMAT) => {
            Some(Arch::Transformer)
        }
        Some(_) => Some(Arch::Mlp),
        None => Arch::parse_or_auto(&a.arch)?,
    };
    let mut data = TrainingData::open(&a.data, a.label_column, a.conditional)?;
    if let Some(c) = &a.cond {
        data = data.with_cond_file(c, &device)?;
    }
    let arch = asked.unwrap_or_else(|| match Architecture::for_data(data.rows(), &data.x_dims) {
        Architecture::Transformer if data.num_classes == 0 => Arch::Transformer,
        _ => Arch::Mlp,
    });
    if asked.is_none() && arch == Arch::Transformer && a.settings.steps.is_none() {
        // The measured step count, capped by the budget on a slower machine; a budget the
        // user gives is kept.
        a.settings.steps = Some(TRANSFORMER_STEPS);
        if a.settings.time_budget.is_none() {
            a.settings.time_budget = Some(format!("{}m", TRANSFORMER_BUDGET.as_secs() / 60));
        }
    }
    if a.resume.is_none() {
        let (sizing, chosen) = data.sizing(&a.settings);
        // Refuse bad settings before printing anything.
        a.settings.train_config(&sizing)?;
        if a.early.early_stop {
            check_fraction(a.early.val_fraction)?;
        }
        let steps = match (&a.settings.time_budget, a.settings.steps) {
            (Some(b), None) => format!("steps planned to fit {b}"),
            (Some(b), Some(n)) => format!("at most {n} steps planned to fit {b}"),
            (None, _) => format!("{} steps", sizing.steps),
        };
        let what = match arch {
            Arch::Mlp => {
                data.mlp_config(&a.settings, &sizing)?;
                format!(
                    "velocity-mlp hidden {}, depth {}, batch {}, {steps}",
                    sizing.hidden, sizing.depth, sizing.batch_size
                )
            }
            Arch::Transformer => {
                let t = data.transformer_config(&a.settings, &sizing)?;
                format!(
                    "transformer width {}, depth {}, heads {}, batch {}, {steps}",
                    t.width, t.depth, t.heads, sizing.batch_size
                )
            }
        };
        if chosen {
            eprintln!(
                "sizes: {what} (chosen from the data: {} of dimension {}{}; set --arch --steps --batch --hidden --depth to override)",
                data.rows().map_or("endless samples".to_string(), |n| format!("{n} rows")),
                data.dim(),
                data.cond_features().map_or(String::new(), |c| format!(" with a {c}-number condition"))
            );
        }
    }
    let start = std::time::Instant::now();
    let (s, o, resume, early) = (
        &a.settings,
        a.out.as_path(),
        a.resume.as_deref(),
        Some(&a.early),
    );
    let history = match arch {
        Arch::Mlp => fit_with(&data, s, resume, o, &device, early)?.history,
        Arch::Transformer => fit_transformer(&data, s, resume, o, &device, early)?.history,
    };
    let secs = start.elapsed().as_secs_f64();
    let last = history.last().map(|h| h.1).unwrap_or(f32::NAN);
    // The final checkpoint is only staged (main's transaction): it and the loss plot are
    // renamed together once both are written, and only then reported.
    if let Some(p) = &a.loss_plot {
        let losses: Vec<(usize, f64)> = history.iter().map(|&(s, l)| (s, l as f64)).collect();
        flow_matching::plot::loss_curve(p, &losses, &format!("training loss ({})", data.source))?;
    }
    crate::wrote(format!(
        "trained {} steps on {} in {secs:.1} s; final loss {last:.4}; wrote {}{}",
        history.len(),
        data.source,
        a.out.display(),
        a.loss_plot
            .as_ref()
            .map_or(String::new(), |p| format!(" and {}", p.display()))
    ));
    Ok(())
}
