//! The `sample` command: one-line errors, kept outputs, schedules, tolerances, guidance.

mod support;

use candle_core::{DType, Device, Tensor};
use flow_matching::io::read_npy;
use flow_matching::schedule::Schedule;
use support::{golden_str, max_abs_diff, tmp};

fn cli(args: &[&str]) -> std::process::Output {
    support::run(args)
}

fn read_vec(path: &std::path::Path) -> Vec<f32> {
    Tensor::read_npy(path)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn cli2(args: &[&str]) -> (bool, String) {
    let out = cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cli_errors_are_one_clear_line() {
    let model = golden_str("mlp-2d/model.safetensors");
    let model = model.as_str();
    let out = tmp("cli-out.npy");
    let out = out.to_str().unwrap();
    let (ok, err) = cli2(&[
        "sample", "--model", model, "--method", "verlet", "--out", out,
    ]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: unknown integration method \"verlet\"; expected one of: euler, midpoint, heun, rk4, dopri5"
    );
    let (ok, err) = cli2(&["sample", "--model", "/no/such.safetensors", "--out", out]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: /no/such.safetensors: No such file or directory (os error 2)"
    );
    let (ok, err) = cli2(&["sample", "--model", model, "--batch", "0", "--out", out]);
    assert!(!ok);
    assert_eq!(err.trim(), "error: invalid --batch 0: at least 1");
    let (ok, err) = cli2(&["sample", "--model", model, "--labels", "1,x", "--out", out]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: invalid --labels 1,x: comma-separated class indices; \"x\" is not a non-negative integer"
    );
    let (ok, _) = cli2(&[
        "sample", "--model", model, "--batch", "5", "--seed", "3", "--out", out,
    ]);
    assert!(ok);
    let x = flow_matching::io::read_npy(out, &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[5, 2]);
}

#[test]
fn an_existing_output_survives_a_failed_run() {
    let out = tmp("keep.npy");
    std::fs::write(&out, b"precious").unwrap();
    let (ok, _) = cli2(&[
        "sample",
        "--model",
        "/no/such.safetensors",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

fn model() -> String {
    golden_str("mlp-2d/model.safetensors")
}

#[test]
fn cli_schedule_writes_the_grid_used() {
    let (out, times) = (tmp("sched-out.npy"), tmp("sched-times.npy"));
    let o = cli(&[
        "sample",
        "--model",
        &model(),
        "--batch",
        "3",
        "--steps",
        "5",
        "--schedule",
        "shift:3",
        "--method",
        "midpoint",
        "--out",
        out.to_str().unwrap(),
        "--times",
        times.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let grid = Schedule::Shift(3.0).grid(5, DType::F32).unwrap();
    let want: Vec<f32> = grid.iter().map(|&t| t as f32).collect();
    assert_eq!(read_vec(&times), want);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(5 steps, midpoint, 10 function evaluations)")
    );

    let o = cli(&[
        "sample",
        "--model",
        &model(),
        "--schedule",
        "0,0.7,0.5,1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: invalid time grid [0.0, 0.7, 0.5, 1.0]: strictly increasing times\n"
    );
    let o = cli(&[
        "sample",
        "--model",
        &model(),
        "--schedule",
        "wavy",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: unknown time schedule \"wavy\"; expected one of: uniform, shift:S, cosine, or a grid such as 0,0.5,1\n"
    );
}

#[test]
fn cli_tolerances_drive_dopri5() {
    let (out, times) = (tmp("tol-out.npy"), tmp("tol-times.npy"));
    let steps_with = |rtol: &str| {
        let o = cli(&[
            "sample",
            "--model",
            &model(),
            "--batch",
            "4",
            "--method",
            "dopri5",
            "--rtol",
            rtol,
            "--atol",
            rtol,
            "--out",
            out.to_str().unwrap(),
            "--times",
            times.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_vec(&times).len() - 1
    };
    let loose = steps_with("1e-2");
    let tight = steps_with("1e-6");
    assert!(loose < tight, "loose {loose} vs tight {tight} steps");

    let o = cli(&[
        "sample",
        "--model",
        &model(),
        "--rtol",
        "1e-3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: invalid --rtol/--atol with --method euler: tolerances only with --method dopri5\n"
    );
    let o = cli(&[
        "sample",
        "--model",
        &model(),
        "--method",
        "dopri5",
        "--atol=-1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: invalid atol -1: a finite number greater than 0\n"
    );
}

#[test]
fn cli_guidance_weights_zero_and_one() {
    let cond_model = golden_str("mlp-cond/model.safetensors");
    let dir = std::env::temp_dir().join(format!("fm-guidance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sample = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec![
            "sample",
            "--model",
            &cond_model,
            "--batch",
            "3",
            "--steps",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = cli(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_npy(&out, &Device::Cpu).unwrap()
    };
    let null = sample("null.npy", &["--labels", "3,3,3"]);
    let cond = sample("cond.npy", &["--labels", "0,1,2"]);
    let w0 = sample("w0.npy", &["--labels", "0,1,2", "--guidance", "0"]);
    let w1 = sample("w1.npy", &["--labels", "0,1,2", "--guidance", "1"]);
    let w3 = sample("w3.npy", &["--labels", "0,1,2", "--guidance", "3"]);
    assert!(max_abs_diff(&w0, &null) < 1e-6);
    assert!(max_abs_diff(&w1, &cond) < 1e-6);
    assert!(max_abs_diff(&w3, &cond) > 1e-3);
    let o = cli(&[
        "sample",
        "--model",
        &cond_model,
        "--guidance",
        "2",
        "--out",
        dir.join("x.npy").to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: invalid --guidance 2: --labels as well: guidance steers towards the given classes\n"
    );
}
