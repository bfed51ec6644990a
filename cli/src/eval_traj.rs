//! `flow-matching eval-traj`: minADE_K / minFDE_K of sampled futures against the true ones.

use std::path::PathBuf;

use candle_core::Device;
use flow_matching::error::{Error, Result};
use flow_matching::io::read_npy;
use flow_matching::trajectory::{
    horizon_steps, minade_table, score_actions, ActionScales, DT, HORIZONS_S,
};

/// Arguments of `eval-traj`.
#[derive(Debug, clap::Args)]
pub struct EvalTrajArgs {
    /// Sampled futures `[N * K, T, 2]`, condition-major (what `sample --cond C --per-cond K`
    /// writes); repeat the flag to score several files side by side.
    #[arg(long, required = true)]
    samples: Vec<PathBuf>,
    /// The true futures `[N, T, 2]` (normalised acceleration, curvature).
    #[arg(long)]
    truth: PathBuf,
    /// Start speeds `[N]` in m/s (or `[N, 1]`).
    #[arg(long)]
    v0: PathBuf,
    /// Samples per scene K (each samples file has N * K rows).
    #[arg(long, default_value_t = 6)]
    per_cond: usize,
    /// Acceleration scale (m/s²) and mean of the normalisation: a = a_norm * std + mean.
    #[arg(long, default_value_t = 2.0)]
    accel_std: f64,
    /// Mean acceleration of the normalisation, m/s².
    #[arg(long, default_value_t = 0.0)]
    accel_mean: f64,
    /// Curvature scale of the normalisation, 1/m (the built-in driving data uses 0.05).
    #[arg(long, default_value_t = 0.05)]
    curv_std: f64,
    /// Mean curvature of the normalisation, 1/m.
    #[arg(long, default_value_t = 0.0)]
    curv_mean: f64,
}

/// Runs `eval-traj`: one table row per samples file.
pub fn run(a: EvalTrajArgs) -> Result<()> {
    let dev = Device::Cpu;
    for (name, v) in [("--accel-std", a.accel_std), ("--curv-std", a.curv_std)] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(Error::invalid(name, v, "a finite scale > 0"));
        }
    }
    let scales = ActionScales {
        accel_mean: a.accel_mean,
        accel_std: a.accel_std,
        curv_mean: a.curv_mean,
        curv_std: a.curv_std,
    };
    let truth = read_npy(&a.truth, &dev)?;
    let v0_t = read_npy(&a.v0, &dev)?;
    let n = truth.dims().first().copied().unwrap_or(0);
    if v0_t.elem_count() != n || v0_t.rank() > 2 {
        return Err(Error::Shape {
            what: format!("--v0 {}", a.v0.display()),
            expected: format!("[{n}] (one start speed per row of --truth)"),
            got: v0_t.dims().to_vec(),
        });
    }
    let v0: Vec<f64> = v0_t
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let t = truth.dims().get(1).copied().unwrap_or(0);
    let h: Vec<usize> = horizon_steps(&HORIZONS_S)
        .into_iter()
        .filter(|&s| s <= t)
        .chain(std::iter::once(t))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rows = Vec::new();
    for p in &a.samples {
        let s = read_npy(p, &dev)?;
        if s.dims().first() != Some(&(n * a.per_cond)) || s.dims().get(1..) != truth.dims().get(1..)
        {
            return Err(Error::Shape {
                what: format!("--samples {}", p.display()),
                expected: format!(
                    "[{} (= {n} rows of --truth x --per-cond {}), {t}, 2]",
                    n * a.per_cond,
                    a.per_cond
                ),
                got: s.dims().to_vec(),
            });
        }
        let m = score_actions(&s, &truth, &v0, a.per_cond, &scales, &h)?;
        rows.push((p.display().to_string(), m));
    }
    println!(
        "minADE_{k} / minFDE_{k} in metres over {n} scenes (dt {DT} s):\n",
        k = a.per_cond
    );
    println!("{}", minade_table(&rows));
    Ok(())
}
