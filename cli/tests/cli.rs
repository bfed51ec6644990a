//! The train, eval and demo commands end to end (small runs).

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use flow_matching::VelocityMlp;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flow-matching"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const SMALL: [&str; 8] = [
    "--hidden", "32", "--depth", "2", "--batch", "64", "--warmup", "5",
];

#[test]
fn train_writes_a_spec_model_and_resume_continues_it() {
    let out = tmp("moons.safetensors");
    let o = out.to_str().unwrap();
    let mut args = vec!["train", "--data", "moons", "--steps", "20", "--out", o];
    args.extend(SMALL);
    let (ok, _, err) = cli(&args);
    assert!(ok, "{err}");
    assert!(err.contains("trained 20 steps on moons"), "{err}");
    let m = VelocityMlp::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        (m.config().hidden, m.config().depth, m.config().num_classes),
        (32, 2, 0)
    );

    // Resuming to 30 steps equals a straight 30-step run (constant schedule after warm-up).
    let resumed = tmp("resumed.safetensors");
    std::fs::copy(&out, &resumed).unwrap();
    let r = resumed.to_str().unwrap();
    let mut args = vec![
        "train",
        "--data",
        "moons",
        "--steps",
        "30",
        "--lr-schedule",
        "constant",
    ];
    args.extend(SMALL);
    let straight = tmp("straight.safetensors");
    let s = straight.to_str().unwrap();
    let mut a1 = args.clone();
    a1.extend(["--out", s]);
    assert!(cli(&a1).0);
    // First 20 steps with the same (constant) schedule, then resume to 30.
    let mut a2 = vec![
        "train",
        "--data",
        "moons",
        "--steps",
        "20",
        "--lr-schedule",
        "constant",
    ];
    a2.extend(SMALL);
    a2.extend(["--out", r]);
    assert!(cli(&a2).0);
    let mut a3 = args.clone();
    a3.extend(["--resume", r, "--out", r]);
    let (ok, _, err) = cli(&a3);
    assert!(ok, "{err}");
    let (a, b) = (
        VelocityMlp::load(&straight, &Device::Cpu).unwrap(),
        VelocityMlp::load(&resumed, &Device::Cpu).unwrap(),
    );
    for ((k, x), (_, y)) in a.tensors().iter().zip(b.tensors()) {
        let (x, y) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{k} differs after resume");
    }
}

#[test]
fn train_refuses_bad_data_and_settings() {
    let out = tmp("bad.safetensors");
    let o = out.to_str().unwrap();
    let (ok, _, err) = cli(&["train", "--data", "spirals", "--out", o]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: unknown dataset \"spirals\"; expected one of: moons, 8gaussians, checkerboard, circles, swissroll, digits, driving, or the path of an existing .csv or .npy file"
    );
    let (ok, _, err) = cli(&["train", "--data", "8gaussians", "--conditional", "--out", o]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: invalid --conditional 8gaussians: a dataset with labels (digits, moons, or a file with --label-column)"
    );
    let (ok, _, err) = cli(&["train", "--data", "moons", "--steps", "0", "--out", o]);
    assert!(!ok);
    assert_eq!(err.trim(), "error: invalid --steps 0: at least 1");
    let csv = tmp("ragged.csv");
    std::fs::write(&csv, "1,2\n3\n").unwrap();
    let (ok, _, err) = cli(&["train", "--data", csv.to_str().unwrap(), "--out", o]);
    assert!(!ok);
    assert!(
        err.starts_with("error: data file ") && err.contains("line 2"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
}

#[test]
fn eval_prints_a_row_per_setting_and_the_noise_floor() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/golden/mlp-2d/model.safetensors");
    let (ok, stdout, err) = cli(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "moons",
        "--n",
        "200",
        "--methods",
        "euler,rk4",
        "--schedules",
        "uniform;shift:2",
        "--steps",
        "1,4",
    ]);
    assert!(ok, "{err}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| euler") || l.starts_with("| rk4"))
        .collect();
    assert_eq!(rows.len(), 8, "{stdout}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("| rk4 | shift:2 | 4 | 16 |")),
        "{stdout}"
    );
    assert!(stdout.contains("reference: sliced W2 between two independent data samples = "));
}

#[test]
fn demo_writes_its_files_and_table() {
    let dir = tmp("demo");
    let (ok, stdout, err) = cli(&[
        "demo",
        "--steps",
        "30",
        "--n",
        "300",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for f in [
        "model.safetensors",
        "samples.npy",
        "samples.png",
        "loss.png",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    for steps in [1, 2, 4, 8, 16, 32] {
        assert!(
            stdout.contains(&format!("| euler | uniform | {steps} | {steps} |")),
            "{stdout}"
        );
    }
    let x = flow_matching::io::read_npy(dir.join("samples.npy"), &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[300, 2]);
}

#[test]
fn loglik_takes_named_data() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/golden/mlp-2d/model.safetensors");
    let (ok, stdout, err) = cli(&[
        "loglik",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "moons",
        "--n",
        "50",
        "--steps",
        "4",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("(N = 50, D = 2)"), "{stdout}");
    let (ok, _, err) = cli(&[
        "loglik",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "digits",
        "--steps",
        "2",
    ]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: data digits: expected shape [N, 2] with N >= 1 (the model's x_dims), got [1797, 64]"
    );
}

/// `bench --device cuda` on a build without the `cuda` feature fails at once, saying how to
/// get one (and writes no figures).
#[cfg(not(feature = "cuda"))]
#[test]
fn bench_on_cuda_needs_a_cuda_build() {
    let (ok, out, err) = cli(&["bench", "--device", "cuda", "--python", "/nonexistent"]);
    assert!(!ok, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("built without the `cuda` feature") && err.contains("--features cuda"),
        "{err}"
    );
}
