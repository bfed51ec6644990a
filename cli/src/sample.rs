//! `flow-matching sample`: noise to samples through a model file.

use std::path::PathBuf;

use candle_core::Device;

use crate::bounds;
use flow_matching::error::{Error, Result};
use flow_matching::flow_matching::FlowMatching;
use flow_matching::io::{read_npy, stage_npy};
use flow_matching::model::VelocityMlp;
use flow_matching::output::{commit, prepare_outputs};
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;
use flow_matching::{Diffusion, Sample, SampleOptions, StepFn};

use crate::cond::{CondArg, CondFlags};

/// Arguments of `sample`.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// A velocity-mlp safetensors file, or an ONNX velocity network (.onnx).
    #[arg(long)]
    model: PathBuf,
    /// Number of samples (ignored with --x-init, whose first dimension is the batch).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seed for the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Initial noise [B, *x_dims] as a .npy file, instead of drawing it.
    #[arg(long)]
    x_init: Option<PathBuf>,
    /// Number of integration steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Integration method: euler, midpoint, heun, rk4, dopri5.
    #[arg(long, default_value = "euler")]
    method: String,
    /// Relative tolerance of --method dopri5 (default 1e-5).
    #[arg(long)]
    rtol: Option<f64>,
    /// Absolute tolerance of --method dopri5 (default 1e-5).
    #[arg(long)]
    atol: Option<f64>,
    /// Classifier-free guidance weight (needs --labels): 0 = unconditional, 1 = conditional.
    #[arg(long)]
    guidance: Option<f64>,
    /// Time grid: uniform, cosine, shift:S, or a comma-separated grid from 0 to 1.
    #[arg(long, default_value = "uniform")]
    schedule: String,
    /// One class per sample for a conditional model, comma-separated (the null label is num_classes).
    #[arg(long)]
    labels: Option<String>,
    /// Where to write the final samples [B, *x_dims] (.npy, f32).
    #[arg(long)]
    out: PathBuf,
    /// Where to write every state [B, T + 1, *x_dims].
    #[arg(long)]
    trajectory: Option<PathBuf>,
    /// Where to write the times [T + 1].
    #[arg(long)]
    times: Option<PathBuf>,
    /// Conditions (--cond NAME=FILE.npy, --per-cond K).
    #[command(flatten)]
    cond: CondFlags,
    /// With --guidance on an ONNX model: the unconditional value of a condition input.
    #[arg(long, value_name = "NAME=FILE.npy")]
    null_cond: Vec<CondArg>,
    /// An ONNX model's sample shape, e.g. 64,2 (needed when its x has a symbolic dimension
    /// besides the batch).
    #[arg(long)]
    x_dims: Option<String>,
}

/// The integration method of `--method`, with `--rtol`/`--atol` for dopri5.
fn parse_method(a: &SampleArgs) -> Result<Method> {
    let mut method: Method = a.method.parse()?;
    if a.rtol.is_some() || a.atol.is_some() {
        match &mut method {
            Method::Dopri5(o) => {
                o.rtol = a.rtol.unwrap_or(o.rtol);
                o.atol = a.atol.unwrap_or(o.atol);
                o.validate()?;
            }
            other => {
                return Err(Error::invalid(
                    "--rtol/--atol",
                    format!("with --method {other}"),
                    "tolerances only with --method dopri5",
                ))
            }
        }
    }
    Ok(method)
}

/// Writes the samples (and the trajectory and times when asked), then says what was written.
fn write_outputs(a: &SampleArgs, out: &Sample, batch: usize, fm: &FlowMatching) -> Result<()> {
    // All outputs are written to temporaries first; only then is any renamed into place.
    let mut staged = vec![stage_npy(&a.out, &out.x)?];
    if let (Some(p), Some(t)) = (&a.trajectory, &out.trajectory) {
        staged.push(stage_npy(p, t)?);
    }
    if let (Some(p), Some(t)) = (&a.times, &out.times) {
        staged.push(stage_npy(p, t)?);
    }
    commit(staged)?;
    eprintln!(
        "wrote {} samples of shape {} to {} ({} steps, {}, {} function evaluations)",
        batch,
        fm.x_dims(),
        a.out.display(),
        out.accepted_steps,
        fm.method,
        out.nfe
    );
    Ok(())
}

/// `sample` for an ONNX velocity network.
#[cfg(feature = "onnx")]
fn run_onnx(a: &SampleArgs) -> Result<()> {
    if a.labels.is_some() {
        return Err(Error::invalid(
            "--labels",
            a.labels.as_deref().unwrap_or_default(),
            "velocity-mlp models only; give an ONNX model's class input with --cond NAME=FILE.npy",
        ));
    }
    let device = Device::Cpu;
    let method = parse_method(a)?;
    let schedule: Schedule = a.schedule.parse()?;
    let x_init = a
        .x_init
        .as_ref()
        .map(|p| read_npy(p, &device))
        .transpose()?;
    let rows = x_init.as_ref().map(|x| x.dim(0)).transpose()?;
    let (mut step, batch) = crate::onnx::prepare(
        &a.model,
        a.x_dims.as_deref(),
        &a.cond,
        &a.null_cond,
        a.guidance,
        a.batch,
        rows,
    )?;
    bounds::sampling(
        batch,
        step.x_dims().numel(),
        a.steps,
        a.trajectory.is_some(),
    )?;
    let mut fm = FlowMatching::new(step.x_dims())?;
    fm.method = method;
    fm.schedule = schedule;
    let options = SampleOptions {
        return_all_steps: a.trajectory.is_some() || a.times.is_some(),
        steps: Some(a.steps),
        x_init,
        seed: Some(a.seed),
        ..Default::default()
    };
    let out = fm.sample(batch, &mut step, &device, &options)?;
    write_outputs(a, &out, batch, &fm)
}

#[cfg(not(feature = "onnx"))]
fn run_onnx(a: &SampleArgs) -> Result<()> {
    Err(Error::invalid(
        "--model",
        a.model.display(),
        "a velocity-mlp file: this build has no ONNX support (build with --features onnx)",
    ))
}

/// Runs `sample`.
pub fn run(a: SampleArgs) -> Result<()> {
    let device = Device::Cpu;
    // Outputs are checked and locked before the model is read or a step is taken.
    let mut outputs = vec![("--out", a.out.as_path())];
    if let Some(p) = &a.trajectory {
        outputs.push(("--trajectory", p.as_path()));
    }
    if let Some(p) = &a.times {
        outputs.push(("--times", p.as_path()));
    }
    let mut inputs = vec![("--model", a.model.as_path())];
    if let Some(p) = &a.x_init {
        inputs.push(("--x-init", p.as_path()));
    }
    let _locks = prepare_outputs(&outputs, &inputs)?;
    bounds::at_least_one("--steps", a.steps)?;
    if a.x_init.is_none() {
        bounds::at_least_one("--batch", a.batch)?;
    }
    if super::is_onnx(&a.model) {
        return run_onnx(&a);
    }
    if let Some(flag) = [
        (!a.cond.cond.is_empty(), "--cond"),
        (a.cond.per_cond.is_some(), "--per-cond"),
        (!a.null_cond.is_empty(), "--null-cond"),
        (a.x_dims.is_some(), "--x-dims"),
    ]
    .iter()
    .find_map(|(given, f)| given.then_some(*f))
    {
        return Err(Error::invalid(
            flag,
            a.model.display(),
            "an ONNX model (.onnx); a velocity-mlp file takes --labels",
        ));
    }
    let model = VelocityMlp::load(&a.model, &device)?;
    let method = parse_method(&a)?;
    let schedule: Schedule = a.schedule.parse()?;
    let mut fm = FlowMatching::new(model.config().x_dims.dims())?;
    fm.method = method;
    fm.schedule = schedule;
    let x_init = a
        .x_init
        .as_ref()
        .map(|p| read_npy(p, &device))
        .transpose()?;
    let batch = match &x_init {
        Some(x) => x.dims().first().copied().unwrap_or(0),
        None => a.batch,
    };
    bounds::at_least_one("--x-init rows", batch)?;
    bounds::sampling(
        batch,
        model.config().x_dims.numel(),
        a.steps,
        a.trajectory.is_some(),
    )?;
    let options = SampleOptions {
        return_all_steps: a.trajectory.is_some() || a.times.is_some(),
        steps: Some(a.steps),
        x_init,
        seed: Some(a.seed),
        ..Default::default()
    };
    let mut conditioned;
    let mut guided;
    let mut plain;
    let labels = a.labels.as_deref().map(super::parse_labels).transpose()?;
    let step_fn: &mut dyn StepFn = match (&labels, a.guidance) {
        (Some(labels), guidance) => {
            if labels.len() != batch {
                return Err(Error::invalid(
                    "--labels",
                    format!("{} labels", labels.len()),
                    format!("one label per sample ({batch})"),
                ));
            }
            match guidance {
                Some(w) => {
                    fm = fm.with_guidance(w)?;
                    guided = fm.guided(&model, labels)?;
                    &mut guided
                }
                None => {
                    conditioned = model.with_labels(labels)?;
                    &mut conditioned
                }
            }
        }
        (None, Some(w)) => {
            return Err(Error::invalid(
                "--guidance",
                w,
                "--labels as well: guidance steers towards the given classes",
            ))
        }
        (None, None) => {
            plain = model.clone();
            &mut plain
        }
    };
    let out = fm.sample(batch, step_fn, &device, &options)?;
    write_outputs(&a, &out, batch, &fm)
}
