//! The seed's trajectory conventions against its own float64 results
//! (tests/data/golden/seed-traj, computed by the seed's `UnicycleAccelCurvatureActionSpace`
//! and `compute_minade`), plus round trips, degenerate drives and bad input.

use std::path::{Path, PathBuf};

use flow_matching::io::read_npy_f64;
use flow_matching::trajectory::{seed_min_ade, ActionScales};
use flow_matching::unicycle::{Actions, NamedArray, Poses, UnicycleActionSpace};
use serde_json::Value;

fn case_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden/seed-traj")
        .join(sub)
}

fn npy(sub: &str, file: &str) -> (Vec<usize>, Vec<f64>) {
    read_npy_f64(case_dir(sub).join(file)).unwrap()
}

fn case_json(sub: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(sub).join("case.json")).unwrap())
        .unwrap()
}

/// The golden logs' action space: the seed's constants with the case's normalisation.
fn golden_space() -> UnicycleActionSpace {
    let c = case_json("logs");
    let s = &c["stats"];
    let f = |k: &str| s[k].as_f64().unwrap();
    UnicycleActionSpace {
        scales: ActionScales {
            accel_mean: f("accel_mean"),
            accel_std: f("accel_std"),
            curv_mean: f("curvature_mean"),
            curv_std: f("curvature_std"),
        },
        ..UnicycleActionSpace::default()
    }
}

fn poses(xyz: &str, rot: &str) -> Poses {
    let (xs, x) = npy("logs", xyz);
    let (rs, r) = npy("logs", rot);
    Poses::from_arrays(
        NamedArray {
            name: xyz,
            shape: &xs,
            data: &x,
        },
        NamedArray {
            name: rot,
            shape: &rs,
            data: &r,
        },
    )
    .unwrap()
}

fn arr<'a>(name: &'a str, shape: &'a [usize], data: &'a [f64]) -> NamedArray<'a> {
    NamedArray { name, shape, data }
}

fn err(x: NamedArray, r: NamedArray) -> String {
    Poses::from_arrays(x, r).unwrap_err().to_string()
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn golden_constants_are_the_seeds() {
    let c = case_json("logs");
    let s = UnicycleActionSpace::default();
    assert_eq!(s.dt, c["dt"].as_f64().unwrap());
    let b = |k: &str, i: usize| c["bounds"][k][i].as_f64().unwrap();
    assert_eq!(s.accel_bounds, [b("accel", 0), b("accel", 1)]);
    assert_eq!(s.curv_bounds, [b("curvature", 0), b("curvature", 1)]);
    assert_eq!((s.theta.lambda, s.theta.ridge), (1e-6, 1e-8));
    assert_eq!((s.v.lambda, s.v.ridge), (1e-6, 1e-4));
    assert_eq!((s.accel.lambda, s.accel.ridge), (1e-4, 1e-4));
    assert_eq!((s.curv.lambda, s.curv.ridge), (1e-4, 1e-4));
}

#[test]
fn golden_v0_and_actions_match_the_seed_within_1e_6() {
    let space = golden_space();
    let hist = poses("hist_xyz.npy", "hist_rot.npy");
    let fut = poses("fut_xyz.npy", "fut_rot.npy");
    let v0 = space.estimate_v0(&hist).unwrap();
    let (_, want_v0) = npy("logs", "expected_v0.npy");
    let e = max_abs(&v0, &want_v0);
    assert!(e < 1e-6, "v0 off by {e}");
    let actions = space.traj_to_action(&hist, &fut).unwrap();
    let (shape, want) = npy("logs", "expected_actions.npy");
    assert_eq!(actions.shape(), shape);
    let e = max_abs(&actions.flat(), &want);
    assert!(e < 1e-6, "actions off by {e}");
}

#[test]
fn golden_yaw_is_an_alternative_to_rotation_matrices() {
    let space = golden_space();
    let (hs, h) = npy("logs", "hist_xyz.npy");
    let (fs, f) = npy("logs", "fut_xyz.npy");
    let yaw_of = |file: &str| -> (Vec<usize>, Vec<f64>) {
        let (s, r) = npy("logs", file);
        let yaw = r.chunks(9).map(|m| m[3].atan2(m[0])).collect();
        (s[..s.len() - 2].to_vec(), yaw)
    };
    let (hys, hy) = yaw_of("hist_rot.npy");
    let (fys, fy) = yaw_of("fut_rot.npy");
    let hist = Poses::from_arrays(arr("h", &hs, &h), arr("hy", &hys, &hy)).unwrap();
    let fut = Poses::from_arrays(arr("f", &fs, &f), arr("fy", &fys, &fy)).unwrap();
    let from_yaw = space.traj_to_action(&hist, &fut).unwrap();
    let from_rot = space
        .traj_to_action(
            &poses("hist_xyz.npy", "hist_rot.npy"),
            &poses("fut_xyz.npy", "fut_rot.npy"),
        )
        .unwrap();
    assert_eq!(from_yaw, from_rot);
}

#[test]
fn golden_poses_match_the_seed_within_1e_6_m_and_rotations_within_1e_9() {
    let space = golden_space();
    let hist = poses("hist_xyz.npy", "hist_rot.npy");
    let (ashape, a) = npy("logs", "expected_actions.npy");
    let actions = Actions::from_array(NamedArray {
        name: "expected_actions.npy",
        shape: &ashape,
        data: &a,
    })
    .unwrap();
    let traj = space.action_to_traj_from_history(&actions, &hist).unwrap();
    let (xs, want_xyz) = npy("logs", "expected_traj_xyz.npy");
    let (rs, want_rot) = npy("logs", "expected_traj_rot.npy");
    assert_eq!((traj.xyz_shape(), traj.rot_shape()), (xs, rs));
    let e = max_abs(&traj.xyz_flat(), &want_xyz);
    assert!(e < 1e-6, "positions off by {e} m");
    let e = max_abs(&traj.rot_flat(), &want_rot);
    assert!(e < 1e-9, "rotations off by {e}");
    // The bounds check agrees drive by drive.
    let (_, want) = npy("logs", "expected_within_bounds.npy");
    let got: Vec<f64> = space
        .within_bounds(&actions)
        .into_iter()
        .map(|b| f64::from(u8::from(b)))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn golden_min_ade_keys_match_the_seed_within_1e_9_relative() {
    let (ps, p) = npy("minade", "pred_xyz.npy");
    let (gs, g) = npy("minade", "gt_xyz.npy");
    let m = seed_min_ade(
        NamedArray {
            name: "pred",
            shape: &ps,
            data: &p,
        },
        NamedArray {
            name: "gt",
            shape: &gs,
            data: &g,
        },
        0.1,
    )
    .unwrap();
    let c = case_json("minade");
    let mean = c["expected_mean_over_scenes"].as_object().unwrap();
    let names: Vec<&str> = m.keys.iter().map(|(k, _)| k.as_str()).collect();
    let mut want_names: Vec<&str> = mean.keys().map(|k| k.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    want_names.sort();
    assert_eq!(sorted, want_names, "the seed's keys, exactly");
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-9 * want.abs();
    for (i, (k, v)) in m.keys.iter().enumerate() {
        let want = mean[k].as_f64().unwrap();
        assert!(close(*v, want), "{k}: {v} against {want}");
        let per = c["expected_per_scene"][k].as_array().unwrap();
        for (scene, w) in per.iter().enumerate() {
            let (got, w) = (m.per_scene[scene][i], w.as_f64().unwrap());
            assert!(close(got, w), "{k} scene {scene}: {got} against {w}");
        }
    }
    // The extras keep their own names and the old convention's lower short-horizon errors.
    let ph = m.get("min_ade_per_horizon/by_t=0.5").unwrap();
    assert!(ph < m.get("min_ade/by_t=0.5").unwrap(), "{ph}");
    assert!(m.get("min_fde").is_some() && m.get("min_fde/by_t=5.0").is_some());
}

// --- drives made here ---

/// A drive integrated at 0.1 s from physical actions, with `hist` poses before t0 on a
/// straight line at the start speed: (history, future, actions normalised by `space`).
fn drive(space: &UnicycleActionSpace, v0: f64, phys: &[[f64; 2]], hist: usize) -> (Poses, Poses) {
    let h: Vec<[f64; 3]> = (0..hist)
        .map(|i| [-((hist - 1 - i) as f64) * v0 * space.dt, 0.0, 1.5])
        .collect();
    let hp = Poses::from_yaw(vec![1], hist, h, vec![0.0; hist]).unwrap();
    let actions = Actions {
        batch: vec![1],
        t: phys.len(),
        values: phys.iter().map(|&p| space.scales.normalise(p)).collect(),
    };
    let fut = space.action_to_traj(&actions, &[v0], &[1.5]).unwrap();
    (hp, fut)
}

/// Smooth physical actions: gentle acceleration and a slow curvature wave.
fn smooth(t: usize, amp_a: f64, amp_k: f64) -> Vec<[f64; 2]> {
    (0..t)
        .map(|i| {
            let s = i as f64 / t as f64;
            [
                amp_a * (2.0 * std::f64::consts::PI * s).sin(),
                amp_k * (std::f64::consts::PI * s).sin(),
            ]
        })
        .collect()
}

fn worst_xy(a: &Poses, b: &Poses) -> f64 {
    a.xyz
        .iter()
        .zip(&b.xyz)
        .map(|(p, q)| ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt())
        .fold(0.0, f64::max)
}

#[test]
fn smooth_drives_round_trip_actions_poses_actions() {
    let space = UnicycleActionSpace {
        scales: ActionScales {
            accel_mean: 0.0,
            accel_std: 2.0,
            curv_mean: 0.0,
            curv_std: 0.05,
        },
        ..UnicycleActionSpace::default()
    };
    for (v0, amp_a, amp_k) in [(10.0, 1.0, 0.02), (5.0, -0.5, -0.05), (20.0, 0.3, 0.005)] {
        let phys = smooth(64, amp_a, amp_k);
        let (hist, fut) = drive(&space, v0, &phys, 16);
        let v = space.estimate_v0(&hist).unwrap();
        // The ridge pulls the speed toward 0 by about 6e-5 relative.
        assert!((v[0] - v0).abs() < 1e-4 * v0, "v0 {} against {v0}", v[0]);
        let back = space.traj_to_action(&hist, &fut).unwrap();
        let worst = back
            .values
            .iter()
            .zip(&phys)
            .map(|(n, p)| {
                let q = space.scales.denormalise(*n);
                ((q[0] - p[0]).abs() / 2.0).max((q[1] - p[1]).abs() / 0.05)
            })
            .fold(0.0, f64::max);
        // The smoothing costs a little at the ends; in normalised units it stays small.
        assert!(worst < 0.01, "v0 {v0}: actions off by {worst} (normalised)");
        let again = space.action_to_traj_from_history(&back, &hist).unwrap();
        let e = worst_xy(&again, &fut);
        assert!(e < 0.02, "v0 {v0}: poses off by {e} m after the round trip");
        assert!(
            again.xyz.iter().all(|p| p[2] == 1.5),
            "z carried from the history"
        );
    }
}

#[test]
fn a_car_standing_still_gives_zero_speed_and_finite_actions() {
    let space = UnicycleActionSpace::default();
    let hist = Poses::from_yaw(vec![1], 16, vec![[0.0; 3]; 16], vec![0.0; 16]).unwrap();
    let fut = Poses::from_yaw(vec![1], 64, vec![[0.0; 3]; 64], vec![0.0; 64]).unwrap();
    let v0 = space.estimate_v0(&hist).unwrap();
    assert!(v0[0].abs() < 1e-12, "{v0:?}");
    // Every arc is 0, so the curvature problem is singular but for its ridge: still finite.
    let a = space.traj_to_action(&hist, &fut).unwrap();
    assert!(
        a.values
            .iter()
            .all(|p| p[0].abs() < 1e-9 && p[1].abs() < 1e-9),
        "{a:?}"
    );
    let back = space.action_to_traj(&a, &v0, &[0.0]).unwrap();
    assert!(back
        .xyz
        .iter()
        .all(|p| p[0].abs() < 1e-9 && p[1].abs() < 1e-9));
}

#[test]
fn starting_from_rest_round_trips() {
    let space = UnicycleActionSpace::default();
    // v0 = 0, then 2 m/s² for 3.2 s and a gentle left turn once moving.
    let phys: Vec<[f64; 2]> = (0..64)
        .map(|i| [2.0, if i > 20 { 0.02 } else { 0.0 }])
        .collect();
    let (hist, fut) = drive(&space, 0.0, &phys, 16);
    let v0 = space.estimate_v0(&hist).unwrap();
    assert!(v0[0].abs() < 1e-9);
    let back = space.traj_to_action(&hist, &fut).unwrap();
    assert!(back
        .values
        .iter()
        .all(|p| p[0].is_finite() && p[1].is_finite()));
    let again = space.action_to_traj(&back, &v0, &[1.5]).unwrap();
    let e = worst_xy(&again, &fut);
    assert!(e < 0.1, "poses off by {e} m");
}

#[test]
fn a_u_turn_and_yaw_wrapping_past_pi() {
    let space = UnicycleActionSpace::default();
    // 8 m/s on a 10 m radius for 64 steps: 51 m of arc, a turn of 5.1 rad (past +π).
    let phys = vec![[0.0, 0.1]; 64];
    let (hist, fut) = drive(&space, 8.0, &phys, 16);
    assert!(fut.yaw[63] > std::f64::consts::PI, "{}", fut.yaw[63]);
    // The log stores yaw wrapped to (-π, π]: the same actions either way.
    let mut wrapped = fut.clone();
    for y in &mut wrapped.yaw {
        *y = y.sin().atan2(y.cos());
    }
    assert!(wrapped.yaw.iter().any(|&y| y < 0.0));
    let a = space.traj_to_action(&hist, &fut).unwrap();
    let b = space.traj_to_action(&hist, &wrapped).unwrap();
    let e = max_abs(&a.flat(), &b.flat());
    assert!(e < 1e-9, "wrapping changed the actions by {e}");
    // The curvature comes back as 0.1 away from the ends, with no spike where yaw wraps.
    for (i, p) in a.values.iter().enumerate().skip(3).take(58) {
        assert!((p[1] - 0.1).abs() < 2e-3, "step {i}: curvature {}", p[1]);
    }
    let again = space.action_to_traj_from_history(&a, &hist).unwrap();
    let e = worst_xy(&again, &fut);
    assert!(e < 0.05, "poses off by {e} m after the turn");
}

#[test]
fn bad_poses_are_one_line_errors_naming_the_file() {
    let xyz = vec![0.0; 2 * 4 * 3];
    let eye = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let rots = eye.repeat(8);
    let rot10 = eye.repeat(10);

    // Wrong shape of positions.
    let e = err(
        arr("--fut-xyz F.npy", &[2, 4, 4], &[0.0; 32]),
        arr("--fut-rot R.npy", &[2, 4, 3, 3], &rots),
    );
    assert_eq!(
        e,
        "--fut-xyz F.npy: expected shape [.., T, 3] (positions x, y, z in metres; or [.., T, 2]), no dimension 0, got [2, 4, 4]"
    );
    // T not matching between positions and rotations.
    let e = err(
        arr("--fut-xyz F.npy", &[2, 4, 3], &xyz),
        arr("--fut-rot R.npy", &[2, 5, 3, 3], &rot10),
    );
    assert_eq!(
        e,
        "--fut-rot R.npy: expected shape [2, 4, 3, 3] (rotation matrices) or [2, 4] (yaw in radians), one per pose of --fut-xyz F.npy [2, 4, 3], got [2, 5, 3, 3]"
    );
    // A NaN position.
    let mut nan = xyz.clone();
    nan[3 * 5 + 1] = f64::NAN;
    let e = err(
        arr("--hist-xyz H.npy", &[2, 4, 3], &nan),
        arr("--hist-rot R.npy", &[2, 4, 3, 3], &rots),
    );
    assert_eq!(
        e,
        "--hist-xyz H.npy at [1, 1, 1]: found NaN, expected a finite position in metres"
    );
    // A matrix that is not a rotation (a reflection, then a stretch).
    let mut refl = rots.clone();
    refl[9 * 6 + 8] = -1.0;
    let e = err(
        arr("--hist-xyz H.npy", &[2, 4, 3], &xyz),
        arr("--hist-rot R.npy", &[2, 4, 3, 3], &refl),
    );
    assert_eq!(
        e,
        "--hist-rot R.npy at [1, 2]: not a rotation matrix: max |RᵀR - I| = 0.000e0 and det = -1.000000, expected orthonormal with det +1 (within 1e-4)"
    );
    let mut stretch = rots.clone();
    stretch[0] = 1.1;
    let e = err(
        arr("--hist-xyz H.npy", &[2, 4, 3], &xyz),
        arr("--hist-rot R.npy", &[2, 4, 3, 3], &stretch),
    );
    assert!(
        e.starts_with(
            "--hist-rot R.npy at [0, 0]: not a rotation matrix: max |RᵀR - I| = 2.100e-1"
        ),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
    // NaN yaw.
    let e = err(
        arr("--fut-xyz F.npy", &[2, 4, 3], &xyz),
        arr(
            "--fut-rot Y.npy",
            &[2, 4],
            &[0.0, 0.0, f64::NAN, 0.0, 0.0, 0.0, 0.0, 0.0],
        ),
    );
    assert_eq!(
        e,
        "--fut-rot Y.npy at [0, 2]: found NaN, expected a finite yaw in radians"
    );
}

#[test]
fn min_ade_shapes_are_checked_against_the_truth() {
    let e = seed_min_ade(
        NamedArray {
            name: "--pred-xyz P.npy",
            shape: &[2, 1, 6, 63, 3],
            data: &vec![0.0; 2 * 6 * 63 * 3],
        },
        NamedArray {
            name: "--truth-xyz GT.npy",
            shape: &[2, 64, 3],
            data: &[0.0; 2 * 64 * 3],
        },
        0.1,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "--pred-xyz P.npy: expected shape [2, N, K, 64, 2|3] (the scenes and waypoints of --truth-xyz GT.npy [2, 64, 3], N sets of K samples), got [2, 1, 6, 63, 3]"
    );
}
