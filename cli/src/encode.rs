//! `flow-matching encode`: map data to noise by integrating the model's flow backwards.

use std::path::PathBuf;

use candle_core::Device;

use flow_matching::error::{Error, Result};
use flow_matching::model::VelocityMlp;
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;
use flow_matching::step::StepFn;
use flow_matching::{FlowMatching, SampleOptions};

/// Arguments of `encode`.
#[derive(Debug, clap::Args)]
pub struct EncodeArgs {
    /// A velocity-mlp safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// The data: a .npy or .csv file of rows [N, *x_dims], digits, or a toy name (moons, ...).
    #[arg(long)]
    data: String,
    /// Points drawn from a toy distribution.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Integration method: euler, midpoint, heun, rk4, dopri5.
    #[arg(long, default_value = "rk4")]
    method: String,
    /// Number of steps from the data (t = 1) back to the noise (t = 0).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Time grid: uniform, cosine, shift:S, or a comma-separated grid from 0 to 1.
    #[arg(long, default_value = "uniform")]
    schedule: String,
    /// One class for every row, or one per row, comma-separated (conditional models).
    #[arg(long)]
    labels: Option<String>,
    /// Seed of the toy points.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The noise, [N, *x_dims] float32 .npy.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `encode`.
pub fn run(a: EncodeArgs) -> Result<()> {
    let device = Device::Cpu;
    let data_path = std::path::Path::new(&a.data);
    let mut inputs = vec![("--model", a.model.as_path())];
    if data_path.is_file() {
        inputs.push(("--data", data_path));
    }
    let _locks = flow_matching::output::prepare_outputs(&[("--out", &a.out)], &inputs)?;
    let model = VelocityMlp::load(&a.model, &device)?;
    let method: Method = a.method.parse()?;
    let schedule: Schedule = a.schedule.parse()?;
    if a.steps == 0 {
        return Err(Error::invalid("--steps", 0, "at least 1"));
    }
    let data = crate::loglik::load_rows(&a.data, a.n, a.seed, &model, &device)?;
    let n = data.dim(0)?;
    let labels = crate::loglik::row_labels(a.labels.as_deref(), n)?;
    let fm = FlowMatching::new(model.config().x_dims.dims())?;
    let opts = SampleOptions {
        steps: Some(a.steps),
        method: Some(method.clone()),
        schedule: Some(schedule),
        ..Default::default()
    };
    let mut conditioned;
    let mut plain;
    let field: &mut dyn StepFn = match &labels {
        Some(l) => {
            conditioned = model.with_labels(l)?;
            &mut conditioned
        }
        None => {
            plain = model.clone();
            &mut plain
        }
    };
    let out = fm.encode(&data, field, &opts)?;
    flow_matching::io::write_npy(&a.out, &out.x)?;
    crate::wrote(format!(
        "encoded {n} rows with {method} ({} evaluations); wrote {}",
        out.nfe,
        a.out.display()
    ));
    Ok(())
}
