//! `flow-matching eval`: sample quality against data for several solvers, grids and step counts.

use std::path::PathBuf;

use candle_core::Device;
use flow_matching::data::DataSource;
use flow_matching::error::{Error, Result};
use flow_matching::evaluate::{
    evaluate_with_progress, noise_floor, subsample, table, EvalOptions, Setting,
};
use flow_matching::model::VelocityMlp;
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;

/// Arguments of `eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A velocity-mlp safetensors file, or an ONNX velocity network (.onnx).
    #[arg(long)]
    model: PathBuf,
    /// For an ONNX model: a condition input as NAME=FILE.npy (one row, or one per sample).
    #[arg(long = "cond", value_name = "NAME=FILE.npy")]
    cond: Vec<crate::cond::CondArg>,
    /// For an ONNX model: its sample shape, e.g. 64,2 (when x has a symbolic dimension).
    #[arg(long)]
    x_dims: Option<String>,
    /// The ONNX runtime (--runtime, --ort-lib, --ort-threads).
    #[command(flatten)]
    runtime: crate::RuntimeFlags,
    /// The data to compare with: a toy name, digits, or a .csv/.npy file.
    #[arg(long)]
    data: String,
    /// For a data file: the 0-based column holding class labels.
    #[arg(long)]
    label_column: Option<usize>,
    /// Samples per setting (and fresh toy points to compare with).
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Step counts, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16,32")]
    steps: String,
    /// Methods, comma-separated (euler, midpoint, heun, rk4, dopri5).
    #[arg(long, default_value = "euler")]
    methods: String,
    /// Time grids, separated by ';' (uniform; cosine; shift:3).
    #[arg(long, default_value = "uniform")]
    schedules: String,
    /// Classifier-free guidance weight for a conditional model.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Seed of the noise, the projections and the fresh data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Parses a comma-separated list of positive step counts.
pub(crate) fn parse_steps(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| match p.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::invalid(
                "--steps",
                flow_matching::limits::excerpt(s),
                "comma-separated step counts of at least 1",
            )),
        })
        .collect()
}

/// Every (method, schedule, steps) combination; an adaptive method picks its own steps, so it
/// runs once, on the uniform grid's ends.
pub(crate) fn settings(methods: &str, schedules: &str, steps: &[usize]) -> Result<Vec<Setting>> {
    let methods: Vec<Method> = methods.split(',').map(str::parse).collect::<Result<_>>()?;
    let schedules: Vec<Schedule> = schedules
        .split(';')
        .map(str::parse)
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for m in &methods {
        if m.is_adaptive() {
            out.push(Setting {
                method: m.clone(),
                schedule: Schedule::Uniform,
                steps: steps[0],
            });
            continue;
        }
        for s in &schedules {
            for &n in steps {
                out.push(Setting {
                    method: m.clone(),
                    schedule: s.clone(),
                    steps: n,
                });
            }
        }
    }
    Ok(out)
}

/// Runs `eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if super::is_onnx(&a.model) {
        return run_onnx(a);
    }
    if !a.cond.is_empty() || a.x_dims.is_some() {
        return Err(Error::invalid(
            "--cond/--x-dims",
            a.model.display(),
            "an ONNX model (.onnx); a velocity-mlp file takes its labels from the data",
        ));
    }
    let device = Device::Cpu;
    crate::bounds::at_least_one("--n", a.n)?;
    let model = VelocityMlp::load(&a.model, &device)?;
    let d = model.config().x_dims.numel();
    // Samples, the reference rows, fresh toy points and the metrics' buffers: a few copies.
    crate::bounds::memory(
        format!("evaluating --n {} samples of {d} values", a.n),
        &[crate::bounds::floats(&[a.n, d, 16])],
    )?;
    let source = DataSource::parse(&a.data)?.with_label_column(a.label_column)?;
    let steps = parse_steps(&a.steps)?;
    let settings = settings(&a.methods, &a.schedules, &steps)?;
    let data = source.load(a.n, a.seed.wrapping_add(1))?;
    // Pairwise metrics cost O(rows²): a table is cut to --n rows (2 --n for the floor's two
    // halves) before any of them, whatever the size of the file.
    let pool = subsample(&data, a.n.saturating_mul(2), a.seed.wrapping_add(3))?;
    let data = subsample(&pool, a.n, a.seed.wrapping_add(4))?;
    let (floor, floor_n) = noise_floor(&source, &pool, a.seed)?;
    let options = EvalOptions {
        n: a.n,
        seed: a.seed,
        guidance: a.guidance,
    };
    let bar = crate::progress::Bar::new(settings.len(), "setting");
    let rows = evaluate_with_progress(&model, &data, &settings, &options, &mut bar.callback())?;
    drop(bar);
    println!("{}", table(&rows));
    println!(
        "reference: sliced W2 between two independent data samples = {floor:.4} (n = {floor_n})"
    );
    Ok(())
}

/// `eval` for an ONNX velocity network: its conditions from --cond, no class accuracy.
#[cfg(feature = "onnx")]
fn run_onnx(a: EvalArgs) -> Result<()> {
    if a.guidance != 1.0 {
        return Err(Error::invalid(
            "--guidance",
            a.guidance,
            "1 for an ONNX model in eval (guide it with sample --guidance W --null-cond ...)",
        ));
    }
    let flags = crate::cond::CondFlags {
        cond: a.cond.clone(),
        per_cond: None,
    };
    let (mut step, _) = crate::onnx::prepare(
        &a.model,
        a.x_dims.as_deref(),
        &a.runtime,
        &flags,
        &[],
        None,
        a.n,
        Some(a.n),
    )?;
    let x_dims = step.x_dims().clone();
    let source = DataSource::parse(&a.data)?.with_label_column(a.label_column)?;
    let steps = parse_steps(&a.steps)?;
    let settings = settings(&a.methods, &a.schedules, &steps)?;
    let data = source.load(a.n, a.seed.wrapping_add(1))?;
    let (floor, floor_n) = noise_floor(&source, &data, a.seed)?;
    let options = EvalOptions {
        n: a.n,
        seed: a.seed,
        guidance: 1.0,
    };
    let rows =
        flow_matching::evaluate::evaluate_step_fn(&mut step, &x_dims, &data, &settings, &options)?;
    println!("{}", table(&rows));
    println!(
        "reference: sliced W2 between two independent data samples = {floor:.4} (n = {floor_n})"
    );
    Ok(())
}

#[cfg(not(feature = "onnx"))]
fn run_onnx(a: EvalArgs) -> Result<()> {
    Err(Error::invalid(
        "--model",
        a.model.display(),
        "a velocity-mlp file: this build has no ONNX support (build with --features onnx)",
    ))
}
