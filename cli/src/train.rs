//! `flow-matching train`: fit a velocity-mlp or a waypoint transformer to a dataset (optionally
//! conditioned on labels or on a continuous condition file) and write it as a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use flow_matching::data::{Batch, DataSource, Dataset};
use flow_matching::diffusion::XDims;
use flow_matching::error::{Error, Result};
use flow_matching::io::read_npy;
use flow_matching::model::{
    file_format, CondNorm, Condition, TransformerConfig, VelocityMlp, VelocityMlpConfig,
    WaypointTransformer, TRANSFORMER_FORMAT,
};
use flow_matching::output::{check_outputs, prepare_outputs};
use flow_matching::train::{
    AdamWParams, ModelConfig, TrainConfig, TrainOutput, TrainableModel, Trainer,
};

/// Model and optimiser settings shared by `train` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainSettings {
    /// Optimiser steps in total (a resumed run continues up to this count).
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
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
    /// Hidden width of the MLP.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Hidden layers of the MLP.
    #[arg(long, default_value_t = 3)]
    pub depth: usize,
    /// Time frequencies.
    #[arg(long, default_value_t = 16)]
    pub freqs: usize,
    /// Width of the class embedding or of the continuous condition's projection.
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
}

impl TrainSettings {
    /// The trainer's config.
    pub fn train_config(&self) -> Result<TrainConfig> {
        crate::bounds::at_least_one("--steps", self.steps)?;
        crate::bounds::at_least_one("--batch", self.batch)?;
        // A negative value used to turn clipping off silently; only 0 means "off".
        crate::bounds::non_negative("--clip", self.clip, "0: no clipping")?;
        let config = TrainConfig {
            steps: self.steps,
            batch_size: self.batch,
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
        };
        config.validate()?;
        Ok(config)
    }

    /// The model's config for data of shape `x_dims` with `num_classes` classes (0: unconditional).
    pub fn model_config(&self, x_dims: &[usize], num_classes: usize) -> Result<VelocityMlpConfig> {
        let config = VelocityMlpConfig {
            x_dims: XDims::new(x_dims)?,
            hidden: self.hidden,
            depth: self.depth,
            num_classes,
            num_freqs: self.freqs,
            cond_dim: self.cond_dim,
            cond_dims: None,
            cond_norm: None,
        };
        config.validate()?;
        crate::bounds::training(&config, self.batch, self.steps)?;
        Ok(config)
    }

    /// The waypoint transformer's config for data of shape `x_dims` (`[L, C]`); `--depth` sets
    /// its blocks and `--freqs` its Fourier frequencies.
    pub fn transformer_config(&self, x_dims: &[usize]) -> Result<TransformerConfig> {
        let config = TransformerConfig {
            x_dims: XDims::new(x_dims)?,
            width: self.width,
            depth: self.depth,
            heads: self.heads,
            mlp_hidden: self.mlp_hidden,
            num_freqs: self.freqs,
            cond_dims: None,
            cond_norm: None,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Arguments of `train`.
#[derive(Debug, clap::Args)]
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
    /// A continuous condition [N, *c_dims] (.npy): row i conditions row i of --data (the
    /// condition is dropped to a learned null at --cond-drop, for classifier-free guidance).
    #[arg(long, value_name = "C.npy")]
    cond: Option<PathBuf>,
    /// The velocity network: mlp (any shape; the default) or transformer (x_dims [L, C]: one
    /// token per waypoint, docs/waypoint-transformer.md).
    #[arg(long, default_value = "mlp")]
    arch: String,
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
    /// A continuous condition: one row per data row, and the file it came from.
    pub cond: Option<(Tensor, PathBuf)>,
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
            cond: None,
        })
    }

    /// Attaches a continuous condition file: row i conditions row i of the data, so the row
    /// counts must agree (the error names both files).
    pub fn with_cond_file(mut self, path: &Path, device: &Device) -> Result<Self> {
        if self.num_classes > 0 {
            return Err(Error::invalid(
                "--cond",
                path.display(),
                "either --conditional (class labels) or --cond (a continuous condition), not both",
            ));
        }
        let table = self.table.as_ref().ok_or_else(|| {
            Error::invalid(
                "--cond",
                path.display(),
                format!(
                    "a data file with one row per condition row (--data {} draws fresh samples)",
                    self.source
                ),
            )
        })?;
        let c = read_npy(path, device)?;
        let rows = c.dims().first().copied().unwrap_or(0);
        if c.rank() < 2 || rows != table.len() {
            return Err(Error::Shape {
                what: format!(
                    "--cond {} (one row per row of --data {})",
                    path.display(),
                    self.source
                ),
                expected: format!("[{}, ...] ({} rows, as the data)", table.len(), table.len()),
                got: c.dims().to_vec(),
            });
        }
        self.cond = Some((c, path.to_path_buf()));
        Ok(self)
    }

    /// The continuous condition's row shape and standardisation, when there is one.
    pub fn cond_shape(&self) -> Result<Option<(XDims, CondNorm)>> {
        match &self.cond {
            None => Ok(None),
            Some((c, _)) => Ok(Some((XDims::new(&c.dims()[1..])?, CondNorm::from_rows(c)?))),
        }
    }

    /// Draws one batch of `b` rows with the rows' continuous condition (the same draws as
    /// [`Self::draw`]).
    pub fn draw_cond(&self, rng: &mut StdRng, b: usize) -> Result<(Tensor, Condition)> {
        let (Some(table), Some((c, _))) = (&self.table, &self.cond) else {
            return Err(Error::invalid(
                "condition",
                "none",
                "a data file with --cond",
            ));
        };
        let n = table.len();
        let indices: Vec<usize> = (0..b).map(|_| rng.random_range(0..n)).collect();
        let (x, _) = table.batch(&indices)?;
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, b, c.device())?;
        Ok((x, Condition::features(c.index_select(&idx, 0)?)))
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
    let mut mc = settings.model_config(&data.x_dims, data.num_classes)?;
    if let Some((dims, norm)) = data.cond_shape()? {
        mc.cond_dims = Some(dims);
        mc.cond_norm = Some(norm);
    }
    // A resumed model's size is checked against the memory bounds like a new one's.
    let bound: fn(&VelocityMlp, usize, usize) -> Result<()> =
        |m, batch, steps| crate::bounds::training(m.config(), batch, steps);
    fit_model(data, mc, bound, settings, resume, out, device)
}

/// [`fit`] for the waypoint transformer.
pub fn fit_transformer(
    data: &TrainingData,
    settings: &TrainSettings,
    resume: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<TrainOutput<WaypointTransformer>> {
    if data.num_classes > 0 {
        return Err(Error::invalid(
            "--arch",
            "transformer",
            "a model without class labels (--conditional); give a continuous condition with --cond",
        ));
    }
    let mut mc = settings.transformer_config(&data.x_dims)?;
    if let Some((dims, norm)) = data.cond_shape()? {
        mc.cond_dims = Some(dims);
        mc.cond_norm = Some(norm);
    }
    fit_model(data, mc, |_, _, _| Ok(()), settings, resume, out, device)
}

/// The run of any model kind: a new one from `mc`, or a resumed checkpoint that must fit the
/// data's shape and condition.
fn fit_model<C>(
    data: &TrainingData,
    mc: C,
    bound: fn(&C::Model, usize, usize) -> Result<()>,
    settings: &TrainSettings,
    resume: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<TrainOutput<C::Model>>
where
    C: ModelConfig,
{
    let mut trainer: Trainer<C::Model> = match resume {
        Some(p) => {
            let t = Trainer::<C::Model>::resume_model(p, device)?.with_steps(settings.steps)?;
            let m = t.model();
            bound(m, t.config().batch_size, settings.steps)?;
            let want_cond = data.cond.as_ref().map(|(c, _)| c.dims()[1..].to_vec());
            let has_cond = m.cond_dims().map(|d| d.dims().to_vec());
            if m.x_dims().dims() != data.x_dims.as_slice()
                || m.num_classes() != data.num_classes
                || want_cond != has_cond
            {
                let show =
                    |d: Option<Vec<usize>>| d.map_or("none".to_string(), |d| format!("{d:?}"));
                return Err(Error::invalid(
                    "--resume",
                    p.display(),
                    format!(
                        "a checkpoint for data of shape {:?} with {} classes and condition {} (it has x_dims {}, {} classes, condition {})",
                        data.x_dims,
                        data.num_classes,
                        show(want_cond),
                        m.x_dims(),
                        m.num_classes(),
                        show(has_cond)
                    ),
                ));
            }
            t
        }
        None => Trainer::new(mc, settings.train_config()?, device)?,
    };
    let bar = crate::progress::Bar::new(trainer.config().steps, "step");
    trainer = trainer.with_checkpoint(out).with_progress(bar.callback());
    if data.cond.is_some() {
        trainer.train(|rng, b| data.draw_cond(rng, b))
    } else {
        trainer.train(|rng, b| data.draw(rng, b))
    }
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
    let mut data = TrainingData::open(&a.data, a.label_column, a.conditional)?;
    if let Some(c) = &a.cond {
        data = data.with_cond_file(c, &device)?;
    }
    // A resumed run keeps its checkpoint's kind of model.
    let transformer = match &a.resume {
        Some(p) => file_format(p)?.as_deref() == Some(TRANSFORMER_FORMAT),
        None => match a.arch.as_str() {
            "mlp" => false,
            "transformer" => true,
            other => {
                return Err(Error::UnknownName {
                    kind: "architecture (--arch)",
                    name: other.to_string(),
                    known: "mlp, transformer".to_string(),
                })
            }
        },
    };
    let start = std::time::Instant::now();
    let history = if transformer {
        fit_transformer(&data, &a.settings, a.resume.as_deref(), &a.out, &device)?.history
    } else {
        fit(&data, &a.settings, a.resume.as_deref(), &a.out, &device)?.history
    };
    let secs = start.elapsed().as_secs_f64();
    let last = history.last().map(|h| h.1).unwrap_or(f32::NAN);
    eprintln!(
        "trained {} steps on {} in {secs:.1} s; final loss {last:.4}; wrote {}",
        history.len(),
        data.source,
        a.out.display()
    );
    if let Some(p) = &a.loss_plot {
        let losses: Vec<(usize, f64)> = history.iter().map(|&(s, l)| (s, l as f64)).collect();
        flow_matching::plot::loss_curve(p, &losses, &format!("training loss ({})", data.source))?;
    }
    Ok(())
}
