//! `flow-matching sample`: noise to samples through a model file.

use std::path::PathBuf;

use candle_core::Device;

use crate::bounds;
use flow_matching::condition::repeat_per_cond;
use flow_matching::convention::TimeConvention;
use flow_matching::error::{Error, Result};
use flow_matching::flow_matching::FlowMatching;
use flow_matching::guidance::GuidedCondition;
use flow_matching::io::{read_npy, stage_npy};
use flow_matching::model::{
    file_format, TransformerConditioned, VelocityMlp, WaypointTransformer, TRANSFORMER_FORMAT,
};
use flow_matching::output::{commit, prepare_outputs};
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;
use flow_matching::{Diffusion, Sample, SampleOptions, StepFn};

use crate::cond::{CondArg, CondFlags};

/// Arguments of `sample`.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// A velocity-mlp or waypoint-transformer safetensors file, an ONNX velocity network
    /// (.onnx), or an action expert's directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Number of samples (ignored with --x-init, whose first dimension is the batch, and with
    /// conditions of several rows, whose rows (times --per-cond) set it).
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
    /// Classifier-free guidance weight (needs --labels or --cond): 0 = unconditional,
    /// 1 = conditional.
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
    /// How an ONNX model was trained: noise_at_0 (this crate's and the seed's: t = 0 is
    /// noise) or noise_at_1 (openpi, LeRobot: t = 1 is noise). Default: the file's metadata
    /// time_convention, else noise_at_0. An action expert's config.json names its own.
    #[arg(long, value_name = "noise_at_0|noise_at_1")]
    time_convention: Option<String>,
    /// The ONNX runtime (--runtime, --ort-lib, --ort-threads).
    #[command(flatten)]
    runtime: crate::RuntimeFlags,
}

/// The convention `--time-convention` names, if given.
fn time_convention(a: &SampleArgs) -> Result<Option<TimeConvention>> {
    a.time_convention
        .as_deref()
        .map(|c| {
            c.parse::<TimeConvention>().map_err(|_| {
                Error::invalid(
                    "--time-convention",
                    c,
                    TimeConvention::ALL.map(|c| c.name()).join(" or "),
                )
            })
        })
        .transpose()
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
    crate::wrote(format!(
        "wrote {} samples of shape {} to {} ({} steps, {}, {} function evaluations)",
        batch,
        fm.x_dims(),
        a.out.display(),
        out.accepted_steps,
        fm.method,
        out.nfe
    ));
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
    let convention = time_convention(a)?;
    let (mut step, batch) = crate::onnx::prepare(
        &a.model,
        a.x_dims.as_deref(),
        &a.runtime,
        &a.cond,
        &a.null_cond,
        a.guidance,
        a.batch,
        rows,
    )?;
    if let Some(c) = convention {
        step = step.with_time_convention(c);
    }
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

/// The continuous condition of a built-in model from `--cond FILE.npy` `[N, *c_dims]`, as
/// read (not yet expanded to the batch); `None` without `--cond`.
fn builtin_condition(
    flags: &CondFlags,
    check: impl Fn(&candle_core::Tensor, &str) -> Result<()>,
    device: &Device,
) -> Result<Option<candle_core::Tensor>> {
    let arg = match flags.cond.as_slice() {
        [] => {
            if let Some(k) = flags.per_cond {
                return Err(Error::invalid(
                    "--per-cond",
                    k,
                    "--cond FILE.npy as well: K samples are drawn for each condition row",
                ));
            }
            return Ok(None);
        }
        [one] => one,
        more => {
            return Err(Error::invalid(
                "--cond",
                format!("{} files", more.len()),
                "one condition file for a built-in model",
            ))
        }
    };
    // Refused before the file is read, naming the flag.
    if let Some(k) = flags.per_cond {
        bounds::at_least_one("--per-cond", k)?;
    }
    let c = read_npy(&arg.path, device)?;
    check(&c, &format!("--cond {}", arg.path.display()))?;
    Ok(Some(c))
}

/// The condition `c` (as read) for `batch` samples: K copies of each row with `--per-cond K`,
/// one row broadcast to every sample, or one row per sample as given. The batch was bounded
/// against memory before this expands anything.
fn expand_condition(
    c: &candle_core::Tensor,
    per_cond: Option<usize>,
    batch: usize,
    what: &str,
) -> Result<candle_core::Tensor> {
    let c = match per_cond {
        Some(k) => repeat_per_cond(c, k)?,
        None => c.clone(),
    };
    flow_matching::condition::expand_rows(&c, batch, what)
}

/// `sample` for an action expert: `--model DIR` (config.json, model.safetensors) and `--cond
/// kv.safetensors`, the prefix cache; `--per-cond K` draws K samples for each cache row.
fn run_expert(a: &SampleArgs) -> Result<()> {
    use flow_matching::model::expert::{ActionExpert, PrefixCache};
    let device = Device::Cpu;
    for (given, flag) in [
        (a.labels.is_some(), "--labels"),
        (a.guidance.is_some(), "--guidance"),
        (!a.null_cond.is_empty(), "--null-cond"),
        (a.x_dims.is_some(), "--x-dims"),
    ] {
        if given {
            return Err(Error::invalid(
                flag,
                a.model.display(),
                "a velocity-mlp, transformer or ONNX model; an action expert (a model directory) takes --cond kv.safetensors and --per-cond K",
            ));
        }
    }
    let cond = match a.cond.cond.as_slice() {
        [one] if one.name.is_none() => &one.path,
        [] => {
            return Err(Error::invalid(
                "--cond",
                "none",
                format!(
                    "the prefix KV cache of {} (--cond kv.safetensors)",
                    a.model.display()
                ),
            ))
        }
        other => {
            return Err(Error::invalid(
                "--cond",
                other
                    .iter()
                    .map(|c| c.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                "one prefix cache file (--cond kv.safetensors) for an action expert",
            ))
        }
    };
    let method = parse_method(a)?;
    let schedule: Schedule = a.schedule.parse()?;
    let convention = time_convention(a)?;
    let mut expert = ActionExpert::load(&a.model, &device)?;
    if let Some(c) = convention.filter(|&c| c != expert.time_convention()) {
        return Err(Error::invalid(
            "--time-convention",
            c,
            format!(
                "{} or no flag: {} was trained so (its config.json's time_convention)",
                expert.time_convention(),
                a.model.display()
            ),
        ));
    }
    let cache = PrefixCache::load(cond)?;
    let rows = cache.batch();
    expert.set_condition(cache)?;
    let x_init = a
        .x_init
        .as_ref()
        .map(|p| read_npy(p, &device))
        .transpose()?;
    let x_rows = x_init
        .as_ref()
        .map(|x| x.dims().first().copied().unwrap_or(0));
    let batch = bounds::implied_batch(a.batch, x_rows, Some(rows), a.cond.per_cond)?;
    if let (Some(k), Some(_)) = (a.cond.per_cond, &x_init) {
        if Some(batch) != rows.checked_mul(k) {
            return Err(Error::invalid(
                "--per-cond",
                k,
                format!("{batch} / {rows} (the --x-init rows over the cache rows)"),
            ));
        }
    }
    let x_dims = expert.x_dims();
    bounds::sampling(
        batch,
        x_dims.iter().product(),
        a.steps,
        a.trajectory.is_some(),
    )?;
    let mut fm = FlowMatching::new(x_dims)?;
    fm.method = method;
    fm.schedule = schedule;
    let options = SampleOptions {
        return_all_steps: a.trajectory.is_some() || a.times.is_some(),
        steps: Some(a.steps),
        x_init,
        seed: Some(a.seed),
        ..Default::default()
    };
    let out = fm.sample(batch, &mut expert, &device, &options)?;
    write_outputs(a, &out, batch, &fm)
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
    for c in &a.cond.cond {
        inputs.push(("--cond", c.path.as_path()));
    }
    let _locks = prepare_outputs(&outputs, &inputs)?;
    bounds::at_least_one("--steps", a.steps)?;
    if a.x_init.is_none() && a.cond.cond.is_empty() {
        bounds::at_least_one("--batch", a.batch)?;
    }
    if super::is_onnx(&a.model) {
        return run_onnx(&a);
    }
    if a.model.is_dir() {
        return run_expert(&a);
    }
    if let Some(flag) = [
        (!a.null_cond.is_empty(), "--null-cond"),
        (a.x_dims.is_some(), "--x-dims"),
        (a.time_convention.is_some(), "--time-convention"),
    ]
    .iter()
    .find_map(|(given, f)| given.then_some(*f))
    {
        return Err(Error::invalid(
            flag,
            a.model.display(),
            "an ONNX model (.onnx); a built-in model takes --labels or --cond FILE.npy",
        ));
    }
    let method = parse_method(&a)?;
    let schedule: Schedule = a.schedule.parse()?;
    let transformer = file_format(&a.model)?.as_deref() == Some(TRANSFORMER_FORMAT);
    let (vmodel, tmodel) = if transformer {
        (None, Some(WaypointTransformer::load(&a.model, &device)?))
    } else {
        (Some(VelocityMlp::load(&a.model, &device)?), None)
    };
    let x_dims = match (&vmodel, &tmodel) {
        (Some(m), _) => m.config().x_dims.clone(),
        (_, Some(m)) => m.config().x_dims.clone(),
        _ => unreachable!("one model is loaded"),
    };
    let cond = builtin_condition(
        &a.cond,
        |c, what| match (&vmodel, &tmodel) {
            (Some(m), _) => m.check_condition(c, what),
            (_, Some(m)) => m.check_condition(c, what),
            _ => Ok(()),
        },
        &device,
    )?;
    let labels = a.labels.as_deref().map(super::parse_labels).transpose()?;
    if labels.is_some() {
        let continuous = match (&vmodel, &tmodel) {
            (Some(m), _) => m.config().cond_dims.clone(),
            (_, Some(m)) => m.config().cond_dims.clone(),
            _ => None,
        };
        if let Some(d) = continuous {
            return Err(Error::invalid(
                "--labels",
                a.labels.as_deref().unwrap_or_default(),
                format!(
                    "no labels: {} has a continuous condition; give --cond FILE.npy with rows [N, {d}]",
                    a.model.display()
                ),
            ));
        }
        if tmodel.is_some() {
            return Err(Error::invalid(
                "--labels",
                a.labels.as_deref().unwrap_or_default(),
                format!("no labels: {} is a waypoint transformer", a.model.display()),
            ));
        }
    }
    let mut fm = FlowMatching::new(x_dims.dims())?;
    fm.method = method;
    fm.schedule = schedule;
    let x_init = a
        .x_init
        .as_ref()
        .map(|p| read_npy(p, &device))
        .transpose()?;
    let x_rows = x_init
        .as_ref()
        .map(|x| x.dims().first().copied().unwrap_or(0));
    let cond_rows = cond.as_ref().map(|c| c.dim(0)).transpose()?;
    let batch = bounds::implied_batch(a.batch, x_rows, cond_rows, a.cond.per_cond)?;
    let cond_values = cond
        .as_ref()
        .map_or(0, |c| c.dims()[1..].iter().product::<usize>());
    // Bounded before the condition is expanded or any state allocated.
    bounds::sampling_with_cond(
        batch,
        x_dims.numel(),
        cond_values,
        a.cond.per_cond,
        a.steps,
        a.trajectory.is_some(),
    )?;
    let cond = match (&cond, x_rows) {
        (Some(c), Some(x)) => {
            let implied = match a.cond.per_cond {
                Some(k) => c.dim(0)?.saturating_mul(k),
                None => c.dim(0)?,
            };
            if implied != x && implied != 1 {
                return Err(Error::Shape {
                    what: format!(
                        "--x-init {}",
                        a.x_init
                            .as_ref()
                            .map_or(String::new(), |p| p.display().to_string())
                    ),
                    expected: format!(
                        "{implied} rows (the --cond rows times --per-cond), or a one-row --cond"
                    ),
                    got: x_init.as_ref().map_or(Vec::new(), |x| x.dims().to_vec()),
                });
            }
            Some(expand_condition(c, a.cond.per_cond, batch, "--cond")?)
        }
        (Some(c), None) => Some(expand_condition(c, a.cond.per_cond, batch, "--cond")?),
        (None, _) => None,
    };
    let options = SampleOptions {
        return_all_steps: a.trajectory.is_some() || a.times.is_some(),
        steps: Some(a.steps),
        x_init,
        seed: Some(a.seed),
        ..Default::default()
    };
    if let Some(w) = a.guidance {
        fm = fm.with_guidance(w)?;
    }
    let mut conditioned;
    let mut guided;
    let mut plain;
    let mut vcond;
    let mut vguided;
    let mut tstep;
    let mut tguided;
    let step_fn: &mut dyn StepFn = match (&vmodel, &tmodel, &labels, &cond, a.guidance) {
        (_, _, None, None, Some(w)) => {
            return Err(Error::invalid(
                "--guidance",
                w,
                "--labels or --cond as well: guidance steers towards the given condition",
            ))
        }
        (Some(model), _, Some(labels), _, guidance) => {
            if labels.len() != batch {
                return Err(Error::invalid(
                    "--labels",
                    format!("{} labels", labels.len()),
                    format!("one label per sample ({batch})"),
                ));
            }
            match guidance {
                Some(_) => {
                    guided = fm.guided(model, labels)?;
                    &mut guided
                }
                None => {
                    conditioned = model.with_labels(labels)?;
                    &mut conditioned
                }
            }
        }
        (Some(model), _, None, Some(c), Some(_)) => {
            vguided = GuidedCondition::new(model, c, fm.guidance_weight)?;
            &mut vguided
        }
        (Some(model), _, None, Some(c), None) => {
            vcond = model.with_condition(c)?;
            &mut vcond
        }
        (Some(model), _, None, None, None) => {
            plain = model.clone();
            &mut plain
        }
        (_, Some(model), _, Some(c), Some(_)) => {
            tguided = GuidedCondition::new(model, c, fm.guidance_weight)?;
            &mut tguided
        }
        (_, Some(model), _, c, _) => {
            tstep = match c {
                Some(c) => model.with_condition(c)?,
                None => TransformerConditioned { model, cond: None },
            };
            &mut tstep
        }
        _ => unreachable!("one model is loaded"),
    };
    let out = fm.sample(batch, step_fn, &device, &options)?;
    write_outputs(&a, &out, batch, &fm)
}
