//! `flow-matching train`: fit a velocity-mlp to a dataset and write it as a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::rngs::StdRng;

use flow_matching::data::{Batch, DataSource, Dataset};
use flow_matching::diffusion::XDims;
use flow_matching::error::{Error, Result};
use flow_matching::model::VelocityMlpConfig;
use flow_matching::output::{check_outputs, prepare_outputs};
use flow_matching::train::{
    AdamWParams, EarlyStopping, Sizing, TrainConfig, TrainOutput, Trainer, Validation,
};

/// Model and optimiser settings shared by `train` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainSettings {
    /// Optimiser steps in total (default: chosen from the data's size and dimension, see
    /// --help of `train`; a resumed run keeps its own total unless given).
    #[arg(long)]
    pub steps: Option<usize>,
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
    /// Probability of dropping the label (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub cond_drop: f64,
    /// Hidden width of the MLP (default: chosen from the data).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Hidden layers of the MLP (default: chosen from the data).
    #[arg(long)]
    pub depth: Option<usize>,
    /// Time frequencies.
    #[arg(long, default_value_t = 16)]
    pub freqs: usize,
    /// Width of the class embedding (conditional models).
    #[arg(long, default_value_t = 32)]
    pub cond_dim: usize,
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
    /// table's rows (`None` for endless toy data) and the sample's dimension; the flag says
    /// whether any was chosen.
    pub fn sizing(&self, rows: Option<usize>, dim: usize) -> (Sizing, bool) {
        let auto = Sizing::for_data(rows, dim);
        let chosen = self.steps.is_none()
            || self.batch.is_none()
            || self.hidden.is_none()
            || self.depth.is_none();
        let s = Sizing {
            hidden: self.hidden.unwrap_or(auto.hidden),
            depth: self.depth.unwrap_or(auto.depth),
            batch_size: self.batch.unwrap_or(auto.batch_size),
            steps: self.steps.unwrap_or(auto.steps),
        };
        (s, chosen)
    }

    /// The trainer's config with the run's sizes.
    pub fn train_config(&self, sizing: &Sizing) -> Result<TrainConfig> {
        crate::bounds::at_least_one("--steps", sizing.steps)?;
        crate::bounds::at_least_one("--batch", sizing.batch_size)?;
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
            num_freqs: self.freqs,
            cond_dim: self.cond_dim,
            cond_dims: None,
            cond_norm: None,
        };
        config.validate()?;
        crate::bounds::training(&config, sizing.batch_size, sizing.steps)?;
        Ok(config)
    }
}

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
/// (printed at the start): data of dimension D ≤ 16 get hidden 128, depth 3, batch 256,
/// 20,000 steps; 16 < D ≤ 256: hidden 256, depth 3, batch 256, 8,000 steps; larger: hidden
/// 512, depth 4, batch 128, 8,000 steps. A data file of N rows is seen at most 300 times
/// (steps ≤ 300 N / batch), never fewer than 2,000 steps.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct TrainArgs {
    /// moons, 8gaussians, checkerboard, circles, swissroll, digits, or a .csv/.npy file of rows.
    #[arg(long)]
    data: String,
    /// For a data file: the 0-based column holding integer class labels.
    #[arg(long)]
    label_column: Option<usize>,
    /// Train a class-conditional model (with classifier-free guidance label dropping).
    #[arg(long)]
    conditional: bool,
    #[command(flatten)]
    settings: TrainSettings,
    /// Continue from a checkpoint written by an earlier run (its settings are kept; --steps sets the new total).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// The checkpoint/model file to write (velocity-mlp safetensors, EMA weights under the spec's keys).
    #[arg(long)]
    out: PathBuf,
    /// Also write a PNG of the loss curve.
    #[arg(long)]
    loss_plot: Option<PathBuf>,
    #[command(flatten)]
    early: EarlyStopArgs,
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
}

impl TrainingData {
    /// Opens a data source for training, conditional or not.
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
        Ok(TrainingData {
            source,
            table,
            x_dims,
            num_classes,
        })
    }

    /// Draws one batch of `b` rows (labels only for a conditional run).
    pub fn draw(&self, rng: &mut StdRng, b: usize) -> Result<Batch> {
        let (x, labels) = match &self.table {
            Some(t) => t.random_batch(rng, b)?,
            None => self.source.draw_batch(rng, b)?,
        };
        Ok((x, if self.num_classes > 0 { labels } else { None }))
    }
}

/// Trains (or resumes) a model on `data`, writing checkpoints to `out`.
pub fn fit(
    data: &TrainingData,
    settings: &TrainSettings,
    resume: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<TrainOutput> {
    fit_with(data, settings, resume, out, device, None)
}

impl TrainingData {
    /// The number of rows of a finite table (`None` for endless toy data).
    pub fn rows(&self) -> Option<usize> {
        self.table.as_ref().map(Dataset::len)
    }

    /// The numbers in one sample.
    pub fn dim(&self) -> usize {
        self.x_dims.iter().product()
    }
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
    let mut trainer = match resume {
        Some(p) => {
            let mut t = Trainer::resume(p, device)?;
            if let Some(steps) = settings.steps {
                t = t.with_steps(steps)?;
            }
            let mc = t.model().config();
            crate::bounds::training(mc, t.config().batch_size, t.config().steps)?;
            if mc.x_dims.dims() != data.x_dims.as_slice() || mc.num_classes != data.num_classes {
                return Err(Error::invalid(
                    "--resume",
                    p.display(),
                    format!(
                        "a checkpoint for data of shape [{}] with {} classes (it has x_dims {} and {} classes)",
                        data.x_dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","),
                        data.num_classes,
                        mc.x_dims,
                        mc.num_classes
                    ),
                ));
            }
            t
        }
        None => {
            let (sizing, _) = settings.sizing(data.rows(), data.dim());
            Trainer::new(
                settings.model_config(&sizing, &data.x_dims, data.num_classes)?,
                settings.train_config(&sizing)?,
                device,
            )?
        }
    };
    let bar = crate::progress::Bar::new(trainer.config().steps, "step");
    trainer = trainer.with_checkpoint(out).with_progress(bar.callback());
    let Some(early) = early.filter(|e| e.early_stop) else {
        return trainer.train(|rng, b| data.draw(rng, b));
    };
    if !(early.val_fraction > 0.0 && early.val_fraction < 1.0) {
        return Err(Error::invalid(
            "--val-fraction",
            early.val_fraction,
            "a fraction strictly between 0 and 1",
        ));
    }
    let seed = trainer.config().seed;
    // The held-out rows: a seeded slice of a table (training draws from the rest), or a fresh
    // sample of a toy.
    let (train_table, held) = match &data.table {
        Some(t) => {
            let mut rng: StdRng = rand::SeedableRng::seed_from_u64(seed ^ 0x5eed);
            let idx = t.shuffled_indices(&mut rng);
            let k = ((t.len() as f64 * early.val_fraction).round() as usize).clamp(1, t.len() - 1);
            let held = t.batch(&idx[..k])?;
            let rest = t.batch(&idx[k..])?;
            (Some(Dataset::new(rest.0, rest.1, t.num_classes)?), held)
        }
        None => (
            None,
            data.source
                .load(2000, seed.wrapping_add(0x5eed))?
                .batch(&(0..2000).collect::<Vec<_>>())?,
        ),
    };
    let labels = if data.num_classes > 0 { held.1 } else { None };
    let validation = Validation::new(&held.0, labels, 4, seed.wrapping_add(1))?;
    let stop = EarlyStopping {
        every: early.val_every,
        patience: early.patience,
        ..EarlyStopping::default()
    };
    let draw = |rng: &mut StdRng, b: usize| -> Result<Batch> {
        match &train_table {
            Some(t) => {
                let (x, l) = t.random_batch(rng, b)?;
                Ok((x, if data.num_classes > 0 { l } else { None }))
            }
            None => data.draw(rng, b),
        }
    };
    let (out, report) = trainer.train_early_stopping(draw, &validation, &stop)?;
    drop(bar);
    eprintln!(
        "early stopping: best held-out loss {:.5} at step {}{} ({} evaluations)",
        report.best.1,
        report.best.0,
        if report.stopped_early {
            format!(", stopped at step {}", out.history.len())
        } else {
            String::new()
        },
        report.validation.len()
    );
    Ok(out)
}

/// Runs `train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let device = Device::Cpu;
    // Every output is checked and locked before the data is read or a step is taken.
    let mut outputs = vec![("--out", a.out.as_path())];
    if let Some(p) = &a.loss_plot {
        outputs.push(("--loss-plot", p.as_path()));
    }
    let data_path = Path::new(&a.data);
    let inputs: Vec<(&str, &Path)> = if data_path.is_file() {
        vec![("--data", data_path)]
    } else {
        Vec::new()
    };
    let _locks = prepare_outputs(&outputs, &inputs)?;
    // --out may be the --resume file (a run continued in place); the loss plot may not.
    if let (Some(plot), Some(resume)) = (&a.loss_plot, &a.resume) {
        check_outputs(&[("--loss-plot", plot)], &[("--resume", resume)])?;
    }
    let data = TrainingData::open(&a.data, a.label_column, a.conditional)?;
    if a.resume.is_none() {
        let (sizing, chosen) = a.settings.sizing(data.rows(), data.dim());
        // Refuse bad settings before printing anything.
        a.settings.train_config(&sizing)?;
        a.settings
            .model_config(&sizing, &data.x_dims, data.num_classes)?;
        if chosen {
            eprintln!(
                "sizes: {sizing} (chosen from the data: {} of dimension {}; set --steps --batch --hidden --depth to override)",
                data.rows().map_or("endless samples".to_string(), |n| format!("{n} rows")),
                data.dim()
            );
        }
    }
    let start = std::time::Instant::now();
    let out = fit_with(
        &data,
        &a.settings,
        a.resume.as_deref(),
        &a.out,
        &device,
        Some(&a.early),
    )?;
    let secs = start.elapsed().as_secs_f64();
    let last = out.history.last().map(|h| h.1).unwrap_or(f32::NAN);
    eprintln!(
        "trained {} steps on {} in {secs:.1} s; final loss {last:.4}; wrote {}",
        out.history.len(),
        data.source,
        a.out.display()
    );
    if let Some(p) = &a.loss_plot {
        let losses: Vec<(usize, f64)> = out.history.iter().map(|&(s, l)| (s, l as f64)).collect();
        flow_matching::plot::loss_curve(p, &losses, &format!("training loss ({})", data.source))?;
    }
    Ok(())
}
