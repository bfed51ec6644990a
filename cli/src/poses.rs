//! `flow-matching traj-to-actions` and `actions-to-traj`: logged poses to the seed's
//! normalised actions and back (`flow_matching::unicycle`).

use std::path::{Path, PathBuf};

use flow_matching::error::{Error, Result};
use flow_matching::io::{read_npy_f64, stage_npy_f64};
use flow_matching::output::{commit, prepare_outputs};
use flow_matching::trajectory::ActionScales;
use flow_matching::unicycle::{Actions, NamedArray, Poses, UnicycleActionSpace};

/// The normalisation flags shared by the trajectory commands: `a = a_norm * std + mean`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsFlags {
    /// Mean acceleration of the normalisation, m/s².
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    accel_mean: f64,
    /// Acceleration scale of the normalisation, m/s² (the built-in driving data's 2.0; the
    /// seed's own constructor default is 1).
    #[arg(long, default_value_t = 2.0)]
    accel_std: f64,
    /// Mean curvature of the normalisation, 1/m.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    curv_mean: f64,
    /// Curvature scale of the normalisation, 1/m (the built-in driving data's 0.05).
    #[arg(long, default_value_t = 0.05)]
    curv_std: f64,
}

impl StatsFlags {
    /// The scales, refusing a scale that is not finite and positive or a mean that is not
    /// finite.
    pub fn scales(&self) -> Result<ActionScales> {
        for (name, v) in [
            ("--accel-std", self.accel_std),
            ("--curv-std", self.curv_std),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::invalid(name, v, "a finite scale > 0"));
            }
        }
        for (name, v) in [
            ("--accel-mean", self.accel_mean),
            ("--curv-mean", self.curv_mean),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(name, v, "a finite mean"));
            }
        }
        Ok(ActionScales {
            accel_mean: self.accel_mean,
            accel_std: self.accel_std,
            curv_mean: self.curv_mean,
            curv_std: self.curv_std,
        })
    }
}

/// Arguments of `traj-to-actions`.
#[derive(Debug, clap::Args)]
pub struct TrajToActionsArgs {
    /// History positions `[N, H, 3]` (metres, ego frame at t0: the last pose is the origin).
    #[arg(long)]
    hist_xyz: PathBuf,
    /// History rotations `[N, H, 3, 3]`, or yaw `[N, H]` in radians.
    #[arg(long)]
    hist_rot: PathBuf,
    /// Future positions `[N, T, 3]` (metres, the same frame).
    #[arg(long)]
    fut_xyz: PathBuf,
    /// Future rotations `[N, T, 3, 3]`, or yaw `[N, T]` in radians.
    #[arg(long)]
    fut_rot: PathBuf,
    #[command(flatten)]
    stats: StatsFlags,
    /// Seconds between poses.
    #[arg(long, default_value_t = 0.1)]
    dt: f64,
    /// The normalised actions `[N, T, 2]` (float64), what `train --data` takes.
    #[arg(long)]
    out: PathBuf,
    /// The start speeds `[N]` (m/s, float64) estimated from the history.
    #[arg(long)]
    v0_out: Option<PathBuf>,
}

/// Arguments of `actions-to-traj`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("start").required(true).args(["v0", "hist_xyz"])))]
pub struct ActionsToTrajArgs {
    /// Normalised actions `[N, T, 2]` (what `sample` or `traj-to-actions` writes).
    #[arg(long)]
    actions: PathBuf,
    /// Start speeds `[N]` in m/s (z is then 0).
    #[arg(long, conflicts_with_all = ["hist_xyz", "hist_rot"])]
    v0: Option<PathBuf>,
    /// History positions `[N, H, 3]`: v0 is estimated from them and z carried from the last.
    #[arg(long, requires = "hist_rot")]
    hist_xyz: Option<PathBuf>,
    /// History rotations `[N, H, 3, 3]`, or yaw `[N, H]` in radians.
    #[arg(long, requires = "hist_xyz")]
    hist_rot: Option<PathBuf>,
    #[command(flatten)]
    stats: StatsFlags,
    /// Seconds between poses.
    #[arg(long, default_value_t = 0.1)]
    dt: f64,
    /// Positions `[N, T, 3]` (metres, float64).
    #[arg(long)]
    out_xyz: PathBuf,
    /// Rotation matrices `[N, T, 3, 3]` (float64, yaw only).
    #[arg(long)]
    out_rot: Option<PathBuf>,
    /// The actions are K rows per drive of --v0 or the history, drive-major (what `sample
    /// --cond C --per-cond K` writes): each drive's start is used for its K rows.
    #[arg(long, default_value_t = 1)]
    per_cond: usize,
}

/// A flag's file, read as float64: its shape, values and the name errors use.
struct Input {
    name: String,
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Input {
    fn read(flag: &str, path: &Path) -> Result<Input> {
        let (shape, data) = read_npy_f64(path)?;
        Ok(Input {
            name: format!("{flag} {}", path.display()),
            shape,
            data,
        })
    }

    fn array(&self) -> NamedArray<'_> {
        NamedArray {
            name: &self.name,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// The poses of a pair of position and rotation flags.
fn read_poses(xyz: (&str, &Path), rot: (&str, &Path)) -> Result<(Poses, String)> {
    let x = Input::read(xyz.0, xyz.1)?;
    let r = Input::read(rot.0, rot.1)?;
    let p = Poses::from_arrays(x.array(), r.array())?;
    Ok((p, x.name))
}

/// The action space of the flags: the seed's constants, the given normalisation and dt.
fn space(stats: &StatsFlags, dt: f64) -> Result<UnicycleActionSpace> {
    if !(dt > 0.0 && dt.is_finite()) {
        return Err(Error::invalid(
            "--dt",
            dt,
            "a finite time step > 0 in seconds",
        ));
    }
    Ok(UnicycleActionSpace {
        scales: stats.scales()?,
        dt,
        ..UnicycleActionSpace::default()
    })
}

/// `M of N futures within the bounds (..)`.
fn bounds_line(space: &UnicycleActionSpace, actions: &Actions) -> String {
    let ok = space.within_bounds(actions);
    format!(
        "{} of {} within the seed's bounds (acceleration {} to {} m/s², curvature {} to {} 1/m)",
        ok.iter().filter(|&&b| b).count(),
        ok.len(),
        space.accel_bounds[0],
        space.accel_bounds[1],
        space.curv_bounds[0],
        space.curv_bounds[1]
    )
}

/// Runs `traj-to-actions`.
pub fn run_traj_to_actions(a: TrajToActionsArgs) -> Result<()> {
    let space = space(&a.stats, a.dt)?;
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &a.out)];
    if let Some(p) = &a.v0_out {
        outputs.push(("--v0-out", p));
    }
    let inputs: Vec<(&str, &Path)> = vec![
        ("--hist-xyz", &a.hist_xyz),
        ("--hist-rot", &a.hist_rot),
        ("--fut-xyz", &a.fut_xyz),
        ("--fut-rot", &a.fut_rot),
    ];
    let _locks = prepare_outputs(&outputs, &inputs)?;
    let (hist, hist_name) = read_poses(("--hist-xyz", &a.hist_xyz), ("--hist-rot", &a.hist_rot))?;
    let (fut, fut_name) = read_poses(("--fut-xyz", &a.fut_xyz), ("--fut-rot", &a.fut_rot))?;
    if fut.batch != hist.batch {
        return Err(Error::Shape {
            what: fut_name,
            expected: format!(
                "{:?} + [T, 3] (the drives of {hist_name} {:?})",
                hist.batch,
                hist.xyz_shape()
            ),
            got: fut.xyz_shape(),
        });
    }
    if hist.t < 2 {
        return Err(Error::Shape {
            what: hist_name,
            expected: "[N, H, 3] with H >= 2 (the start speed comes from the history's steps)"
                .into(),
            got: hist.xyz_shape(),
        });
    }
    let v0 = space.estimate_v0(&hist)?;
    let actions = space.traj_to_action_with_v0(&hist, &fut, &v0)?;
    let mut staged = vec![stage_npy_f64(&a.out, &actions.shape(), &actions.flat())?];
    if let Some(p) = &a.v0_out {
        staged.push(stage_npy_f64(p, &hist.batch, &v0)?);
    }
    commit(staged)?;
    crate::finish()?;
    println!(
        "wrote {} normalised actions {:?} (float64; accel mean {}, std {}; curvature mean {}, std {}){}",
        a.out.display(),
        actions.shape(),
        space.scales.accel_mean,
        space.scales.accel_std,
        space.scales.curv_mean,
        space.scales.curv_std,
        a.v0_out
            .as_ref()
            .map(|p| format!(" and start speeds {}", p.display()))
            .unwrap_or_default()
    );
    println!("{}", bounds_line(&space, &actions));
    Ok(())
}

/// Runs `actions-to-traj`.
pub fn run_actions_to_traj(a: ActionsToTrajArgs) -> Result<()> {
    let space = space(&a.stats, a.dt)?;
    let mut outputs: Vec<(&str, &Path)> = vec![("--out-xyz", &a.out_xyz)];
    if let Some(p) = &a.out_rot {
        outputs.push(("--out-rot", p));
    }
    let mut inputs: Vec<(&str, &Path)> = vec![("--actions", &a.actions)];
    for (flag, p) in [
        ("--v0", &a.v0),
        ("--hist-xyz", &a.hist_xyz),
        ("--hist-rot", &a.hist_rot),
    ] {
        if let Some(p) = p {
            inputs.push((flag, p));
        }
    }
    let _locks = prepare_outputs(&outputs, &inputs)?;
    let act_in = Input::read("--actions", &a.actions)?;
    let actions = Actions::from_array(act_in.array())?;
    if a.per_cond == 0 {
        return Err(Error::invalid("--per-cond", 0, "at least 1"));
    }
    let k = a.per_cond;
    // The batch of the starts: the actions' own, or N of [N * K] rows with --per-cond K.
    let start_batch = if k == 1 {
        actions.batch.clone()
    } else if actions.batch.len() == 1 && actions.batch[0] % k == 0 {
        vec![actions.batch[0] / k]
    } else {
        return Err(Error::Shape {
            what: act_in.name,
            expected: format!("[N * {k}, T, 2] (K = --per-cond {k} rows per drive)"),
            got: act_in.shape,
        });
    };
    let per = if k > 1 {
        format!(", --per-cond {k}")
    } else {
        String::new()
    };
    let (v0, z0) = match (&a.v0, &a.hist_xyz, &a.hist_rot) {
        (Some(v0_path), _, _) => {
            let v = Input::read("--v0", v0_path)?;
            // [N] or [N, 1]: one speed per drive.
            let fits = v.shape == start_batch
                || (v.shape.len() == start_batch.len() + 1
                    && v.shape[..start_batch.len()] == start_batch[..]
                    && v.shape.last() == Some(&1));
            if !fits {
                return Err(Error::Shape {
                    what: v.name,
                    expected: format!(
                        "{start_batch:?} (one start speed in m/s per drive of {} {:?}{per})",
                        act_in.name, act_in.shape
                    ),
                    got: v.shape,
                });
            }
            if let Some(i) = v.data.iter().position(|x| !x.is_finite()) {
                return Err(Error::BadValue {
                    what: format!("{} at [{i}]", v.name),
                    reason: format!("found {}, expected a finite speed in m/s", v.data[i]),
                });
            }
            let n = v.data.len();
            (v.data, vec![0.0; n])
        }
        (None, Some(hx), Some(hr)) => {
            let (hist, hist_name) = read_poses(("--hist-xyz", hx), ("--hist-rot", hr))?;
            if hist.batch != start_batch || hist.t < 2 {
                return Err(Error::Shape {
                    what: hist_name,
                    expected: format!(
                        "{start_batch:?} + [H, 3] with H >= 2 (the drives of {} {:?}{per})",
                        act_in.name, act_in.shape
                    ),
                    got: hist.xyz_shape(),
                });
            }
            let v0 = space.estimate_v0(&hist)?;
            let z0 = (0..hist.drives())
                .map(|d| hist.xyz[(d + 1) * hist.t - 1][2])
                .collect();
            (v0, z0)
        }
        _ => {
            return Err(Error::invalid(
                "start",
                "neither --v0 nor --hist-xyz with --hist-rot",
                "--v0 V0.npy, or --hist-xyz H.npy --hist-rot HR.npy",
            ))
        }
    };
    let rep =
        |v: &[f64]| -> Vec<f64> { v.iter().flat_map(|&x| std::iter::repeat_n(x, k)).collect() };
    let poses = space.action_to_traj(&actions, &rep(&v0), &rep(&z0))?;
    let mut staged = vec![stage_npy_f64(
        &a.out_xyz,
        &poses.xyz_shape(),
        &poses.xyz_flat(),
    )?];
    if let Some(p) = &a.out_rot {
        staged.push(stage_npy_f64(p, &poses.rot_shape(), &poses.rot_flat())?);
    }
    commit(staged)?;
    crate::finish()?;
    println!(
        "wrote positions {} {:?}{} (float64, metres)",
        a.out_xyz.display(),
        poses.xyz_shape(),
        a.out_rot
            .as_ref()
            .map(|p| format!(" and rotations {} {:?}", p.display(), poses.rot_shape()))
            .unwrap_or_default()
    );
    println!("{}", bounds_line(&space, &actions));
    Ok(())
}
