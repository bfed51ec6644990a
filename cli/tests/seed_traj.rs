//! `traj-to-actions`, `actions-to-traj` and `eval-traj --pred-xyz` against the seed's own
//! float64 results (tests/data/golden/seed-traj), and their errors on bad files.

mod support;
use support::{golden_str, run_text as cli, tmp};

use flow_matching::io::{read_npy_f64, stage_npy_f64};
use flow_matching::output::commit;

const STATS: [&str; 8] = [
    "--accel-mean",
    "0.1",
    "--accel-std",
    "1.5",
    "--curv-mean",
    "0.0005",
    "--curv-std",
    "0.04",
];

fn logs(f: &str) -> String {
    golden_str(&format!("seed-traj/logs/{f}"))
}

fn max_abs(a: &str, b: &str) -> f64 {
    let (sa, va) = read_npy_f64(a).unwrap();
    let (sb, vb) = read_npy_f64(b).unwrap();
    assert_eq!(sa, sb, "{a} against {b}");
    va.iter()
        .zip(&vb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn write(path: &std::path::Path, shape: &[usize], data: &[f64]) {
    commit(vec![stage_npy_f64(path, shape, data).unwrap()]).unwrap();
}

#[test]
fn logs_to_actions_to_poses_match_the_seed_and_train_takes_the_actions() {
    let (a, v0) = (tmp("st-actions.npy"), tmp("st-v0.npy"));
    let (a, v0) = (a.to_str().unwrap(), v0.to_str().unwrap());
    let (hx, hr) = (logs("hist_xyz.npy"), logs("hist_rot.npy"));
    let (fx, fr) = (logs("fut_xyz.npy"), logs("fut_rot.npy"));
    let mut args = vec!["traj-to-actions", "--hist-xyz", &hx, "--hist-rot", &hr];
    args.extend(["--fut-xyz", &fx, "--fut-rot", &fr]);
    args.extend(STATS);
    args.extend(["--out", a, "--v0-out", v0]);
    let (ok, out, err) = cli(&args);
    assert!(ok, "{err}");
    assert!(out.contains("23 of 24 within the seed's bounds"), "{out}");
    assert!(max_abs(a, &logs("expected_actions.npy")) < 1e-6);
    assert!(max_abs(v0, &logs("expected_v0.npy")) < 1e-6);

    let (x, r) = (tmp("st-xyz.npy"), tmp("st-rot.npy"));
    let (x, r) = (x.to_str().unwrap(), r.to_str().unwrap());
    let mut args = vec!["actions-to-traj", "--actions", a];
    args.extend(["--hist-xyz", &hx, "--hist-rot", &hr]);
    args.extend(STATS);
    args.extend(["--out-xyz", x, "--out-rot", r]);
    let (ok, _, err) = cli(&args);
    assert!(ok, "{err}");
    assert!(max_abs(x, &logs("expected_traj_xyz.npy")) < 1e-6);
    assert!(max_abs(r, &logs("expected_traj_rot.npy")) < 1e-9);

    // From v0 alone: the same x, y (z is then 0).
    let x2 = tmp("st-xyz-v0.npy");
    let mut args = vec!["actions-to-traj", "--actions", a, "--v0", v0];
    args.extend(STATS);
    args.extend(["--out-xyz", x2.to_str().unwrap()]);
    let (ok, _, err) = cli(&args);
    assert!(ok, "{err}");
    let (_, p) = read_npy_f64(&x2).unwrap();
    let (_, q) = read_npy_f64(x).unwrap();
    let e = p
        .chunks(3)
        .zip(q.chunks(3))
        .map(|(p, q)| (p[0] - q[0]).abs().max((p[1] - q[1]).abs()))
        .fold(0.0, f64::max);
    assert!(e < 1e-12, "{e}");

    // train --data takes the float64 actions as they are.
    let model = tmp("st-model.safetensors");
    let (ok, _, err) = cli(&[
        "train",
        "--data",
        a,
        "--steps",
        "2",
        "--batch",
        "8",
        "--hidden",
        "16",
        "--depth",
        "1",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(model.is_file());
}

#[test]
fn eval_traj_prints_the_seeds_keys_from_positions() {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::golden("seed-traj/minade/case.json")).unwrap(),
    )
    .unwrap();
    let want = c["expected_mean_over_scenes"].as_object().unwrap();
    let pred = golden_str("seed-traj/minade/pred_xyz.npy");
    let gt = golden_str("seed-traj/minade/gt_xyz.npy");
    // The same predictions as rows [B * N * K, T, 3] with --sets 2 --per-cond 6.
    let (shape, data) = read_npy_f64(&pred).unwrap();
    let rows = tmp("st-rows.npy");
    write(&rows, &[shape[0] * 12, 64, 3], &data);
    let rows_s = rows.to_str().unwrap().to_string();
    for args in [
        vec![
            "eval-traj",
            "--pred-xyz",
            &pred,
            "--truth-xyz",
            &gt,
            "--json",
        ],
        vec![
            "eval-traj",
            "--pred-xyz",
            &rows_s,
            "--truth-xyz",
            &gt,
            "--sets",
            "2",
            "--per-cond",
            "6",
            "--json",
        ],
    ] {
        let (ok, out, err) = cli(&args);
        assert!(ok, "{err}");
        assert_eq!(out.trim().lines().count(), 1, "{out}");
        let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let got = got.as_object().unwrap();
        assert_eq!(got.len(), want.len(), "{out}");
        for (k, w) in want {
            let (g, w) = (got[k].as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-9 * w.abs(), "{k}: {g} against {w}");
        }
    }
    let (ok, out, err) = cli(&["eval-traj", "--pred-xyz", &pred, "--truth-xyz", &gt]);
    assert!(ok, "{err}");
    assert!(
        out.contains("min_ade/by_t=0.5_std") && out.contains("min_ade_per_horizon/by_t=0.5"),
        "{out}"
    );
    // Rows that do not divide into the scenes: one line naming the file, expected and got.
    let (ok, _, err) = cli(&["eval-traj", "--pred-xyz", &rows_s, "--truth-xyz", &gt]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("error: --pred-xyz {rows_s}: expected shape [72 (= 12 scenes of --truth-xyz {gt} x --sets 1 x --per-cond 6), T, 2|3], or [B, N, K, T, 2|3], got [144, 64, 3]")
    );
}

#[test]
fn bad_pose_files_are_one_line_errors_and_nothing_is_written() {
    let (hs, h) = read_npy_f64(logs("hist_xyz.npy")).unwrap();
    let (fs, f) = read_npy_f64(logs("fut_xyz.npy")).unwrap();
    let (rs, r) = read_npy_f64(logs("fut_rot.npy")).unwrap();
    let out = tmp("st-never.npy");
    let run = |hist_xyz: &str, fut_xyz: &str, fut_rot: &str| -> String {
        let (hr, o) = (logs("hist_rot.npy"), out.to_str().unwrap().to_string());
        let (ok, _, err) = cli(&[
            "traj-to-actions",
            "--hist-xyz",
            hist_xyz,
            "--hist-rot",
            &hr,
            "--fut-xyz",
            fut_xyz,
            "--fut-rot",
            fut_rot,
            "--out",
            &o,
        ]);
        assert!(!ok);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!out.exists(), "an output was written");
        err.trim().to_string()
    };
    let (hx, fx, fr) = (
        logs("hist_xyz.npy"),
        logs("fut_xyz.npy"),
        logs("fut_rot.npy"),
    );

    let mut nan = h.clone();
    nan[3 * 16 * 3 + 5 * 3 + 1] = f64::NAN;
    let nan_p = tmp("st-nan.npy");
    write(&nan_p, &hs, &nan);
    let n = nan_p.to_str().unwrap();
    assert_eq!(
        run(n, &fx, &fr),
        format!(
            "error: --hist-xyz {n} at [3, 5, 1]: found NaN, expected a finite position in metres"
        )
    );

    let mut skew = r.clone();
    skew[(2 * 64 + 7) * 9] *= 1.5;
    let skew_p = tmp("st-skew.npy");
    write(&skew_p, &rs, &skew);
    let s = skew_p.to_str().unwrap();
    let e = run(&hx, &fx, s);
    assert!(
        e.starts_with(&format!(
            "error: --fut-rot {s} at [2, 7]: not a rotation matrix: max |RᵀR - I| = "
        )),
        "{e}"
    );

    // T not matching: 63 future positions against 64 rotations.
    let short = tmp("st-short.npy");
    let cut: Vec<f64> = f
        .chunks(64 * 3)
        .flat_map(|d| d[..63 * 3].to_vec())
        .collect();
    write(&short, &[fs[0], 63, 3], &cut);
    let sh = short.to_str().unwrap();
    assert_eq!(
        run(&hx, sh, &fr),
        format!("error: --fut-rot {fr}: expected shape [24, 63, 3, 3] (rotation matrices) or [24, 63] (yaw in radians), one per pose of --fut-xyz {sh} [24, 63, 3], got [24, 64, 3, 3]")
    );

    // Wrong shape: positions with 4 columns.
    let wide = tmp("st-wide.npy");
    write(&wide, &[24, 16, 4], &vec![0.0; 24 * 16 * 4]);
    let w = wide.to_str().unwrap();
    assert_eq!(
        run(w, &fx, &fr),
        format!("error: --hist-xyz {w}: expected shape [.., T, 3] (positions x, y, z in metres; or [.., T, 2]), no dimension 0, got [24, 16, 4]")
    );
}
