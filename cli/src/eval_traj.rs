//! `flow-matching eval-traj`: minADE_K / minFDE_K of sampled futures against the true ones,
//! as the seed scores them; from positions (`--pred-xyz --truth-xyz`) or from normalised
//! actions (`--samples --truth --v0`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use flow_matching::error::{Error, Result};
use flow_matching::io::{read_npy, read_npy_f64};
use flow_matching::trajectory::{
    horizon_steps, minade_table, score_actions, seed_min_ade, SeedMinAde, DT, HORIZONS_S,
};
use flow_matching::unicycle::{Actions, NamedArray, UnicycleActionSpace};

use crate::poses::StatsFlags;

/// Arguments of `eval-traj`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("form").required(true).args(["samples", "pred_xyz"])))]
pub struct EvalTrajArgs {
    /// Predicted positions `[B, N, K, T, 2|3]` (B scenes, N sets of K samples; metres), or
    /// rows `[B * N * K, T, 2|3]` scene-major with --sets N --per-cond K.
    #[arg(long, requires = "truth_xyz", conflicts_with_all = ["samples", "truth", "v0"])]
    pred_xyz: Option<PathBuf>,
    /// True positions `[B, T, 2|3]` (metres; only x, y are scored).
    #[arg(long, requires = "pred_xyz")]
    truth_xyz: Option<PathBuf>,
    /// Sampled futures as normalised actions `[B * N * K, T, 2]`, condition-major (what
    /// `sample --cond C --per-cond K` writes); repeat the flag to score several files side by
    /// side.
    #[arg(long, requires_all = ["truth", "v0"])]
    samples: Vec<PathBuf>,
    /// The true futures `[B, T, 2]` (normalised acceleration, curvature).
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Start speeds `[B]` in m/s (or `[B, 1]`).
    #[arg(long)]
    v0: Option<PathBuf>,
    /// Samples per set K (default 6, the seed's; with a 5-D --pred-xyz, its K).
    #[arg(long)]
    per_cond: Option<usize>,
    /// Sets N of K samples per scene (default 1; with a 5-D --pred-xyz, its N); with N > 1
    /// the seed's `_std` keys give the spread over sets.
    #[arg(long)]
    sets: Option<usize>,
    /// Print the seed's keys (mean over scenes) as one JSON object on one line.
    #[arg(long)]
    json: bool,
    /// With --json: the extra metrics too (min_fde, min_ade_per_horizon).
    #[arg(long, requires = "json")]
    extras: bool,
    #[command(flatten)]
    stats: StatsFlags,
}

/// Refuses a NaN or infinite number in an input, naming the file and the index: a score over
/// such a value is meaningless (an all-`inf` table, a sample silently dropped).
fn finite(what: &str, shape: &[usize], data: &[f64]) -> Result<()> {
    let Some(i) = data.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let mut index = Vec::with_capacity(shape.len());
    let mut rest = i;
    for (j, _) in shape.iter().enumerate() {
        let stride: usize = shape[j + 1..].iter().product();
        index.push(rest / stride.max(1));
        rest %= stride.max(1);
    }
    Err(Error::BadValue {
        what: format!("{what} at {index:?}"),
        reason: format!("found {}, expected a finite number", data[i]),
    })
}

/// A tensor's values in float64, checked finite (see [`finite`]).
fn finite_values(what: &str, t: &candle_core::Tensor) -> Result<Vec<f64>> {
    let v: Vec<f64> = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    finite(what, t.dims(), &v)?;
    Ok(v)
}

/// `scenes * sets * per_cond` in checked arithmetic: the rows a samples file must have.
fn rows_for(scenes: usize, sets: usize, k: usize) -> Result<usize> {
    scenes
        .checked_mul(sets)
        .and_then(|r| r.checked_mul(k))
        .ok_or_else(|| {
            Error::invalid(
                "--per-cond",
                k,
                format!(
                    "a count whose product with {scenes} scenes and --sets {sets} fits in 64 bits"
                ),
            )
        })
}

/// Runs `eval-traj`.
pub fn run(a: EvalTrajArgs) -> Result<()> {
    for (flag, v) in [("--per-cond", a.per_cond), ("--sets", a.sets)] {
        if v == Some(0) {
            return Err(Error::invalid(flag, 0, "at least 1"));
        }
    }
    // The normalisation flags are checked on every path, even where positions make them
    // unused: a non-finite one is a mistake worth naming.
    a.stats.scales()?;
    match (&a.pred_xyz, &a.truth_xyz) {
        (Some(p), Some(g)) => run_positions(&a, p, g),
        _ => run_actions(&a),
    }
}

/// The text or JSON report of one score.
fn report(a: &EvalTrajArgs, m: &SeedMinAde, label: Option<&str>) -> String {
    if a.json {
        let mut obj = serde_json::Map::new();
        if let Some(l) = label {
            obj.insert("samples".into(), serde_json::Value::from(l));
        }
        let extra: &[(String, f64)] = if a.extras { &m.extra } else { &[] };
        for (k, v) in m.keys.iter().chain(extra) {
            // JSON has no infinity: a scene whose samples all diverged reads null.
            let value =
                serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into);
            obj.insert(k.clone(), value);
        }
        return serde_json::Value::Object(obj).to_string();
    }
    let mut s = format!(
        "minADE as the seed scores it, metres, mean over {} scenes ({} set{} of {} samples; per scene and set the one sample with the lowest mean distance over the whole {} waypoints, its error at every horizon){}:\n",
        m.scenes,
        m.sets,
        if m.sets == 1 { "" } else { "s" },
        m.k,
        m.t,
        label.map(|l| format!(", {l}")).unwrap_or_default()
    );
    let width = m
        .keys
        .iter()
        .chain(&m.extra)
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    for (k, v) in &m.keys {
        s.push_str(&format!("{k:<width$}  {v}\n"));
    }
    s.push_str("extras, not the seed's minADE (min_fde: each horizon's own best, as the seed's minFDE; min_ade_per_horizon: each horizon's own best sample):\n");
    for (k, v) in &m.extra {
        s.push_str(&format!("{k:<width$}  {v}\n"));
    }
    s
}

/// `--pred-xyz P --truth-xyz GT`.
fn run_positions(a: &EvalTrajArgs, p: &Path, g: &Path) -> Result<()> {
    let (gshape, gt) = read_npy_f64(g)?;
    let (pshape, pred) = read_npy_f64(p)?;
    let gname = format!("--truth-xyz {}", g.display());
    let pname = format!("--pred-xyz {}", p.display());
    finite(&gname, &gshape, &gt)?;
    finite(&pname, &pshape, &pred)?;
    let b = gshape.first().copied().unwrap_or(0);
    let shape = match pshape.len() {
        5 => {
            for (flag, given, has) in [
                ("--sets", a.sets, pshape[1]),
                ("--per-cond", a.per_cond, pshape[2]),
            ] {
                if let Some(v) = given.filter(|&v| v != has) {
                    return Err(Error::Shape {
                        what: pname,
                        expected: format!(
                            "{flag} {v} in its dimension {}",
                            if flag == "--sets" { 1 } else { 2 }
                        ),
                        got: pshape,
                    });
                }
            }
            pshape
        }
        3 => {
            let (n, k) = (a.sets.unwrap_or(1), a.per_cond.unwrap_or(6));
            let rows = rows_for(b, n, k)?;
            if pshape[0] != rows || gshape.len() != 3 {
                return Err(Error::Shape {
                    what: pname,
                    expected: format!(
                        "[{rows} (= {b} scenes of {gname} x --sets {n} x --per-cond {k}), T, 2|3], or [B, N, K, T, 2|3]"
                    ),
                    got: pshape,
                });
            }
            vec![b, n, k, pshape[1], pshape[2]]
        }
        _ => {
            return Err(Error::Shape {
                what: pname,
                expected:
                    "[B, N, K, T, 2|3], or rows [B * N * K, T, 2|3] with --sets N --per-cond K"
                        .into(),
                got: pshape,
            })
        }
    };
    let m = seed_min_ade(
        NamedArray {
            name: &pname,
            shape: &shape,
            data: &pred,
        },
        NamedArray {
            name: &gname,
            shape: &gshape,
            data: &gt,
        },
        DT,
    )?;
    print!("{}", report(a, &m, None));
    if a.json {
        println!();
    }
    Ok(())
}

/// `--samples S.npy.. --truth X.npy --v0 V0.npy`: normalised actions integrated from v0.
fn run_actions(a: &EvalTrajArgs) -> Result<()> {
    let (Some(truth_path), Some(v0_path)) = (&a.truth, &a.v0) else {
        return Err(Error::invalid(
            "eval-traj",
            "--samples without --truth and --v0",
            "--samples S.npy --truth X.npy --v0 V0.npy, or --pred-xyz P.npy --truth-xyz GT.npy",
        ));
    };
    let scales = a.stats.scales()?;
    let (k, sets) = (a.per_cond.unwrap_or(6), a.sets.unwrap_or(1));
    let dev = Device::Cpu;
    let truth = read_npy(truth_path, &dev)?;
    let v0_t = read_npy(v0_path, &dev)?;
    finite_values(&format!("--truth {}", truth_path.display()), &truth)?;
    let speeds = finite_values(&format!("--v0 {}", v0_path.display()), &v0_t)?;
    let n = truth.dims().first().copied().unwrap_or(0);
    if v0_t.elem_count() != n || v0_t.rank() > 2 {
        return Err(Error::Shape {
            what: format!("--v0 {}", v0_path.display()),
            expected: format!("[{n}] (one start speed per row of --truth)"),
            got: v0_t.dims().to_vec(),
        });
    }
    let t = truth.dims().get(1).copied().unwrap_or(0);
    let rows = rows_for(n, sets, k)?;
    let mut table = Vec::new();
    let mut reports = Vec::new();
    for p in &a.samples {
        let s = read_npy(p, &dev)?;
        if s.dims().first() != Some(&rows) || s.dims().get(1..) != truth.dims().get(1..) {
            let per = if sets == 1 {
                format!("--per-cond {k}")
            } else {
                format!("--sets {sets} x --per-cond {k}")
            };
            return Err(Error::Shape {
                what: format!("--samples {}", p.display()),
                expected: format!("[{rows} (= {n} rows of --truth x {per}), {t}, 2]"),
                got: s.dims().to_vec(),
            });
        }
        finite_values(&format!("--samples {}", p.display()), &s)?;
        if a.json || sets > 1 {
            reports.push((p, seed_from_actions(a, p, truth_path, v0_path, sets, k)?));
        } else {
            let v0 = speeds.clone();
            let h: Vec<usize> = horizon_steps(&HORIZONS_S)
                .into_iter()
                .filter(|&s| s <= t)
                .chain(std::iter::once(t))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let m = score_actions(&s, &truth, &v0, k, &scales, &h)?;
            table.push((p.display().to_string(), m));
        }
    }
    if !table.is_empty() {
        println!("minADE_{k} / minFDE_{k} in metres over {n} scenes (dt {DT} s):\n");
        println!("{}", minade_table(&table));
    }
    for (p, m) in &reports {
        println!("{}", report(a, m, Some(&p.display().to_string())));
    }
    Ok(())
}

/// The seed's minADE of one actions file: samples and truth integrated in float64 from v0.
fn seed_from_actions(
    a: &EvalTrajArgs,
    samples: &Path,
    truth: &Path,
    v0: &Path,
    sets: usize,
    k: usize,
) -> Result<SeedMinAde> {
    let space = UnicycleActionSpace {
        scales: a.stats.scales()?,
        dt: DT,
        ..UnicycleActionSpace::default()
    };
    let read = |flag: &str, p: &Path| -> Result<(String, Vec<usize>, Vec<f64>)> {
        let (shape, data) = read_npy_f64(p)?;
        Ok((format!("{flag} {}", p.display()), shape, data))
    };
    let (sname, sshape, sdata) = read("--samples", samples)?;
    let (tname, tshape, tdata) = read("--truth", truth)?;
    let (_, _, speeds) = read("--v0", v0)?;
    let sact = Actions::from_array(NamedArray {
        name: &sname,
        shape: &sshape,
        data: &sdata,
    })?;
    let tact = Actions::from_array(NamedArray {
        name: &tname,
        shape: &tshape,
        data: &tdata,
    })?;
    let rep: Vec<f64> = speeds
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, sets * k))
        .collect();
    let spos = space.action_to_traj(&sact, &rep, &vec![0.0; rep.len()])?;
    let tpos = space.action_to_traj(&tact, &speeds, &vec![0.0; speeds.len()])?;
    let (b, t) = (speeds.len(), tact.t);
    seed_min_ade(
        NamedArray {
            name: &sname,
            shape: &[b, sets, k, t, 3],
            data: &spos.xyz_flat(),
        },
        NamedArray {
            name: &tname,
            shape: &[b, t, 3],
            data: &tpos.xyz_flat(),
        },
        DT,
    )
}
