//! `flow-matching loglik`: log-likelihoods of data under a model file.

use std::path::PathBuf;

use candle_core::Device;

use flow_matching::data::DataSource;
use flow_matching::error::{Error, Result};
use flow_matching::likelihood::{log_likelihood, Divergence, LikelihoodOptions, ProbeKind};
use flow_matching::model::VelocityMlp;
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;
use flow_matching::StepFn;

/// Arguments of `loglik`.
#[derive(Debug, clap::Args)]
pub struct LoglikArgs {
    /// A velocity-mlp safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// The data: a .npy or .csv file of rows [N, *x_dims], digits, or a toy name (moons, ...).
    #[arg(long)]
    data: String,
    /// Points drawn from a toy distribution.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Exact divergence, one backward pass per dimension (the default).
    #[arg(long)]
    exact: bool,
    /// Hutchinson's estimator with K probes per row instead of the exact divergence.
    #[arg(long)]
    probes: Option<usize>,
    /// The probes' distribution: rademacher or gaussian.
    #[arg(long, default_value = "rademacher")]
    probe_kind: String,
    /// Number of integration steps from the data back to the noise.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Integration method: euler, midpoint, heun, rk4, dopri5.
    #[arg(long, default_value = "rk4")]
    method: String,
    /// Time grid: uniform, cosine, shift:S, or a comma-separated grid from 0 to 1.
    #[arg(long, default_value = "uniform")]
    schedule: String,
    /// Seed of the probes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows per batch (the probes of batch i are drawn from seed + i).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// One class for every row, or one per row, comma-separated (conditional models).
    #[arg(long)]
    labels: Option<String>,
    /// Also write each row's log-likelihood (nats) as a float32 .npy array [N].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write each row's bits per dimension as a float32 .npy array [N].
    #[arg(long)]
    bpd_out: Option<PathBuf>,
}

/// The rows to score or encode: a .npy array keeps its shape ([N, *x_dims], as `sample`
/// writes them); a named toy draws `n` fresh points (seeded); digits and CSV tables are read
/// whole, their flat rows given the model's sample shape.
pub(crate) fn load_rows(
    data: &str,
    n: usize,
    seed: u64,
    model: &VelocityMlp,
    device: &Device,
) -> Result<candle_core::Tensor> {
    let x_dims = model.config().x_dims.clone();
    let npy = std::path::Path::new(data);
    let mut rows = if npy.extension().is_some_and(|e| e == "npy") && npy.is_file() {
        flow_matching::io::read_npy(npy, device)?
    } else {
        // A toy's --n rows, with the solver's state and stages, bounded before they are drawn.
        crate::bounds::at_least_one("--n", n)?;
        crate::bounds::memory(
            format!(
                "drawing --n {n} rows of {} values from {data}",
                x_dims.numel()
            ),
            &[crate::bounds::floats(&[n, x_dims.numel(), 10])],
        )?;
        DataSource::parse(data)?.load(n, seed)?.x
    };
    if rows.rank() == 2 && rows.dim(1)? == x_dims.numel() {
        rows = rows.reshape(x_dims.batched(rows.dim(0)?))?;
    }
    if rows.rank() < 2 || rows.dims()[1..] != *x_dims.dims() || rows.dim(0)? == 0 {
        return Err(Error::Shape {
            what: format!("data {data}"),
            expected: format!("[N, {x_dims}] with N >= 1 (the model's x_dims)"),
            got: rows.dims().to_vec(),
        });
    }
    Ok(rows)
}

/// `--labels` for `n` rows: one label for all, or one per row.
pub(crate) fn row_labels(labels: Option<&str>, n: usize) -> Result<Option<Vec<u32>>> {
    let parsed = labels.map(super::parse_labels).transpose()?;
    Ok(match parsed {
        None => None,
        Some(l) if l.len() == 1 => Some(vec![l[0]; n]),
        Some(l) if l.len() == n => Some(l),
        Some(l) => {
            return Err(Error::invalid(
                "--labels",
                format!("{} labels", l.len()),
                format!("one label for every row, or one per row ({n})"),
            ))
        }
    })
}

/// Runs `loglik`.
pub fn run(a: LoglikArgs) -> Result<()> {
    if super::is_onnx(&a.model) {
        return Err(Error::invalid(
            "--model",
            a.model.display(),
            "a velocity-mlp file: loglik needs the divergence of the velocity (its gradients), \
             which an ONNX network run for inference does not give",
        ));
    }
    let device = Device::Cpu;
    let divergence = match (a.exact, a.probes) {
        (true, Some(_)) => {
            return Err(Error::invalid(
                "--exact with --probes",
                "both given",
                "one of them: --exact, or --probes K for Hutchinson's estimator",
            ))
        }
        (_, Some(0)) => return Err(Error::invalid("--probes", 0, "at least 1 (or --exact)")),
        (_, Some(k)) => Divergence::Hutchinson {
            probes: k,
            kind: a.probe_kind.parse::<ProbeKind>()?,
            seed: a.seed,
        },
        (_, None) => Divergence::Exact,
    };
    if a.batch == 0 {
        return Err(Error::invalid("--batch", 0, "at least 1 row per batch"));
    }
    let method: Method = a.method.parse()?;
    let schedule: Schedule = a.schedule.parse()?;
    // The per-row files are checked and locked before any work.
    let mut outputs: Vec<(&str, &std::path::Path)> = Vec::new();
    if let Some(p) = &a.out {
        outputs.push(("--out", p));
    }
    if let Some(p) = &a.bpd_out {
        outputs.push(("--bpd-out", p));
    }
    let _locks = flow_matching::output::prepare_outputs(&outputs, &[("--model", &a.model)])?;
    // Detached weights: the backward passes then reach only x, never the model.
    let model = VelocityMlp::load(&a.model, &device)?.detach();
    let x_dims = model.config().x_dims.clone();
    {
        use crate::bounds::{at_least_one, floats, memory};
        at_least_one("--steps", a.steps)?;
        at_least_one("--n", a.n)?;
        let d = x_dims.numel();
        // Per batch: the state, one gradient per probe (or per dimension when exact) and
        // the solver's stages; a toy's --n points are drawn up front.
        let probes = a.probes.unwrap_or(d);
        memory(
            format!(
                "log-likelihoods of --batch {} rows of {d} values with {probes} probes (--n {})",
                a.batch, a.n
            ),
            &[
                probes
                    .checked_add(8)
                    .and_then(|k| floats(&[a.batch, d, k, 2])),
                floats(&[a.n, d, 2]),
            ],
        )?;
    }
    let data = load_rows(&a.data, a.n, a.seed, &model, &device)?;
    let n = data.dim(0)?;
    let labels = row_labels(a.labels.as_deref(), n)?;
    let mut log_p = Vec::with_capacity(n);
    let mut nfe = 0;
    for (i, start) in (0..n).step_by(a.batch).enumerate() {
        let rows = a.batch.min(n - start);
        let x = data.narrow(0, start, rows)?;
        let divergence = match &divergence {
            Divergence::Hutchinson { probes, kind, seed } => Divergence::Hutchinson {
                probes: *probes,
                kind: *kind,
                seed: seed.wrapping_add(i as u64),
            },
            d => d.clone(),
        };
        let options = LikelihoodOptions {
            divergence,
            method: method.clone(),
            steps: a.steps,
            schedule: schedule.clone(),
            ..Default::default()
        };
        let mut conditioned;
        let mut plain;
        let field: &mut dyn StepFn = match &labels {
            Some(l) => {
                conditioned = model.with_labels(&l[start..start + rows])?;
                &mut conditioned
            }
            None => {
                plain = model.clone();
                &mut plain
            }
        };
        let ll = log_likelihood(field, &x, &options)?;
        nfe += ll.nfe;
        log_p.extend(ll.log_p);
    }
    let d = x_dims.numel();
    let mean = flow_matching::likelihood::mean(&log_p);
    let se = flow_matching::likelihood::std_err(&log_p);
    let bpd = -mean / (d as f64 * std::f64::consts::LN_2);
    let how = match &divergence {
        Divergence::Exact => "exact divergence".to_string(),
        Divergence::Hutchinson { probes, kind, .. } => {
            format!("Hutchinson estimator, {probes} {kind:?} probe(s)")
        }
    };
    let scale = d as f64 * std::f64::consts::LN_2;
    let per_row = |f: &dyn Fn(f64) -> f64| -> Result<candle_core::Tensor> {
        let v: Vec<f32> = log_p.iter().map(|&l| f(l) as f32).collect();
        Ok(candle_core::Tensor::from_vec(v, n, &Device::Cpu)?)
    };
    if let Some(p) = &a.out {
        flow_matching::io::write_npy(p, &per_row(&|l| l)?)?;
    }
    if let Some(p) = &a.bpd_out {
        flow_matching::io::write_npy(p, &per_row(&|l| -l / scale)?)?;
    }
    for p in [&a.out, &a.bpd_out].into_iter().flatten() {
        crate::wrote(format!("wrote {}", p.display()));
    }
    println!("log p(x): mean {mean:.6} nats, standard error {se:.6} (N = {n}, D = {d})");
    println!("bits/dim: {bpd:.6}");
    println!("{how}, {method}, {nfe} function evaluations");
    Ok(())
}
