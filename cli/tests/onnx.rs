//! `sample`, `eval` and `loglik` with ONNX velocity networks: results against PyTorch's (the
//! fixtures of tests/data/onnx), conditions, guidance, and one-line errors that write nothing.
#![cfg(feature = "onnx")]

mod support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use support::{max_abs_diff, run, tmp};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/onnx")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn npy(path: impl AsRef<Path>) -> Tensor {
    Tensor::read_npy(path.as_ref()).unwrap()
}

fn write(name: &str, t: &Tensor) -> String {
    let p = tmp(name);
    t.write_npy(&p).unwrap();
    p.to_string_lossy().into_owned()
}

/// Runs a command that must succeed and returns the samples it wrote.
fn sample_ok(out: &str, args: &[&str]) -> Tensor {
    let mut all = vec!["sample", "--out", out];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(
        o.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&o.stderr)
    );
    npy(out)
}

/// Runs a command that must fail with one line on stderr and write nothing; returns the line.
fn fails(args: &[&str]) -> String {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One output name per call: tests run in parallel and outputs are locked while written.
    let out = tmp(&format!("never-{n}.npy"));
    let _ = std::fs::remove_file(&out);
    let out_s = out.to_string_lossy().into_owned();
    let mut all: Vec<&str> = args.to_vec();
    if args[0] == "sample" {
        all.extend_from_slice(&["--out", &out_s]);
    }
    let o = run(&all);
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(!o.status.success(), "{args:?} should fail");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
    err
}

/// |a - b| <= 1e-4 + 1e-3 |b| everywhere.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (a, b) in g.iter().zip(&w) {
        assert!(
            (a - b).abs() <= 1e-4 + 1e-3 * b.abs(),
            "{what}: {a} vs PyTorch {b}"
        );
    }
}

#[test]
fn sample_matches_pytorch_with_conditions_and_guidance() {
    let x0 = fixture("traj_x0.npy");
    let out = tmp("traj.npy").to_string_lossy().into_owned();
    let got = sample_ok(
        &out,
        &[
            "--model",
            &fixture("traj.onnx"),
            "--x-init",
            &x0,
            "--cond",
            &format!("ctx={}", fixture("traj_ctx.npy")),
        ],
    );
    assert_close(
        &got,
        &npy(fixture("traj_euler10.npy")),
        "euler, --cond NAME=FILE",
    );
    // A bare file binds the only condition input; one row is shared by every sample.
    let ctx0 = write(
        "ctx0.npy",
        &npy(fixture("traj_ctx.npy")).narrow(0, 0, 1).unwrap(),
    );
    let got = sample_ok(
        &out,
        &[
            "--model",
            &fixture("traj.onnx"),
            "--x-init",
            &x0,
            "--cond",
            &ctx0,
        ],
    );
    assert_close(
        &got,
        &npy(fixture("traj_euler10_ctx0.npy")),
        "one context row",
    );
    let got = sample_ok(
        &out,
        &[
            "--model",
            &fixture("traj.onnx"),
            "--x-init",
            &x0,
            "--cond",
            &fixture("traj_ctx.npy"),
            "--guidance",
            "2.5",
            "--null-cond",
            &format!("ctx={}", fixture("traj_null.npy")),
        ],
    );
    assert_close(&got, &npy(fixture("traj_guided_euler10.npy")), "guided");
    let got = sample_ok(
        &out,
        &[
            "--model",
            &fixture("mlp.onnx"),
            "--x-init",
            &fixture("mlp_x0.npy"),
            "--method",
            "rk4",
            "--steps",
            "5",
        ],
    );
    assert_close(&got, &npy(fixture("mlp_rk4_5.npy")), "mlp, rk4");
}

#[test]
fn per_cond_draws_k_samples_per_condition_row_condition_major() {
    let ctx = npy(fixture("traj_ctx.npy")).narrow(0, 0, 2).unwrap();
    let two = write("ctx2.npy", &ctx);
    let out = tmp("percond.npy").to_string_lossy().into_owned();
    let model = fixture("traj.onnx");
    let got = sample_ok(
        &out,
        &[
            "--model",
            &model,
            "--cond",
            &two,
            "--per-cond",
            "3",
            "--seed",
            "7",
        ],
    );
    assert_eq!(got.dims(), &[6, 64, 2]);
    // The same draw with the rows spelled out: c0 c0 c0 c1 c1 c1.
    let idx = Tensor::new(&[0u32, 0, 0, 1, 1, 1], &Device::Cpu).unwrap();
    let spelled = write("ctx6.npy", &ctx.index_select(&idx, 0).unwrap());
    let out2 = tmp("percond2.npy").to_string_lossy().into_owned();
    let want = sample_ok(
        &out2,
        &["--model", &model, "--cond", &spelled, "--seed", "7"],
    );
    assert!(max_abs_diff(&got, &want) < 1e-6);
}

#[test]
fn a_symbolic_dimension_takes_x_dims_and_a_fixed_batch_says_so() {
    let err = fails(&["sample", "--model", &fixture("pointwise.onnx")]);
    assert!(err.contains("--x-dims") && err.contains("tokens"), "{err}");
    let out = tmp("pw.npy").to_string_lossy().into_owned();
    let got = sample_ok(
        &out,
        &[
            "--model",
            &fixture("pointwise.onnx"),
            "--x-dims",
            "5,2",
            "--x-init",
            &fixture("pointwise_x0.npy"),
        ],
    );
    assert_close(&got, &npy(fixture("pointwise_euler10.npy")), "pointwise");
    let ctx = fixture("traj_ctx.npy");
    let err = fails(&[
        "sample",
        "--model",
        &fixture("traj_fixed2.onnx"),
        "--cond",
        &ctx,
    ]);
    assert!(
        err.contains("fixed batch of 2") && err.contains("not 4"),
        "{err}"
    );
}

#[test]
fn model_file_errors_are_one_line() {
    let bytes = std::fs::read(fixture("traj.onnx")).unwrap();
    let cut: PathBuf = tmp("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(&["sample", "--model", cut.to_str().unwrap()]);
    assert!(err.contains("cut.onnx"), "{err}");
    let text = tmp("text.onnx");
    std::fs::write(&text, "hello\n").unwrap();
    let err = fails(&["sample", "--model", text.to_str().unwrap()]);
    assert!(err.contains("text.onnx"), "{err}");
    let err = fails(&["sample", "--model", tmp("absent.onnx").to_str().unwrap()]);
    assert!(err.contains("absent.onnx"), "{err}");
    let err = fails(&["sample", "--model", &fixture("bernoulli.onnx")]);
    assert!(
        err.contains("Bernoulli") && err.contains("dropout_mask"),
        "{err}"
    );
}

#[test]
fn condition_errors_name_inputs_and_shapes() {
    let model = fixture("traj.onnx");
    let ctx = fixture("traj_ctx.npy");
    let err = fails(&["sample", "--model", &model]);
    assert!(err.contains("\"ctx\"") && err.contains("--cond"), "{err}");
    let err = fails(&[
        "sample",
        "--model",
        &model,
        "--cond",
        &format!("scene={ctx}"),
    ]);
    assert!(
        err.contains("scene") && err.contains("ctx [batch, 4, 8]"),
        "{err}"
    );
    let bad = write(
        "bad.npy",
        &Tensor::zeros((4, 4, 9), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = fails(&["sample", "--model", &model, "--cond", &bad]);
    assert!(
        err.contains("[batch, 4, 8]") && err.contains("[4, 4, 9]"),
        "{err}"
    );
    let three = write("ctx3.npy", &npy(&ctx).narrow(0, 0, 3).unwrap());
    let err = fails(&[
        "sample",
        "--model",
        &model,
        "--cond",
        &three,
        "--x-init",
        &fixture("traj_x0.npy"),
    ]);
    assert!(err.contains("[3, 4, 8]") && err.contains("4"), "{err}");
    let err = fails(&[
        "sample",
        "--model",
        &model,
        "--cond",
        &ctx,
        "--guidance",
        "2",
    ]);
    assert!(err.contains("--null-cond"), "{err}");
}

#[test]
fn a_non_finite_velocity_names_the_step() {
    let nan = write(
        "nan.npy",
        &Tensor::new(&[[f32::NAN, 0.0, 0.0]], &Device::Cpu).unwrap(),
    );
    let err = fails(&["sample", "--model", &fixture("mlp.onnx"), "--x-init", &nan]);
    assert!(
        err.contains("non-finite") && err.contains("step 1"),
        "{err}"
    );
}

#[test]
fn eval_runs_an_onnx_model_and_loglik_refuses_one() {
    let data = write(
        "evaldata.npy",
        &Tensor::randn(0f32, 1.0, (64, 3), &Device::Cpu).unwrap(),
    );
    let o = run(&[
        "eval",
        "--model",
        &fixture("mlp.onnx"),
        "--data",
        &data,
        "--n",
        "64",
        "--steps",
        "2,4",
        "--methods",
        "euler,rk4",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("| euler") || l.starts_with("| rk4"))
            .count(),
        4,
        "{stdout}"
    );
    let err = fails(&["loglik", "--model", &fixture("mlp.onnx"), "--data", &data]);
    assert!(err.contains("gradients"), "{err}");
}

/// `--runtime ort --ort-lib $ORT_DYLIB_PATH` gets PyTorch's results too (conditions, guidance,
/// RK4); skipped without the feature `ort` or without a library.
#[cfg(feature = "ort")]
#[test]
fn the_ort_runtime_matches_pytorch() {
    let Some(lib) = std::env::var("ORT_DYLIB_PATH")
        .ok()
        .filter(|p| !p.is_empty())
    else {
        eprintln!("skipped: set ORT_DYLIB_PATH to an ONNX Runtime library to test --runtime ort");
        return;
    };
    let ort = ["--runtime", "ort", "--ort-lib", lib.as_str()];
    let out = tmp("ort.npy").to_string_lossy().into_owned();
    let x0 = fixture("traj_x0.npy");
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec![
                "--model".into(),
                fixture("traj.onnx"),
                "--x-init".into(),
                x0.clone(),
                "--cond".into(),
                fixture("traj_ctx.npy"),
            ],
            "traj_euler10.npy",
        ),
        (
            vec![
                "--model".into(),
                fixture("traj.onnx"),
                "--x-init".into(),
                x0.clone(),
                "--cond".into(),
                fixture("traj_ctx.npy"),
                "--guidance".into(),
                "2.5".into(),
                "--null-cond".into(),
                format!("ctx={}", fixture("traj_null.npy")),
            ],
            "traj_guided_euler10.npy",
        ),
        (
            vec![
                "--model".into(),
                fixture("mlp.onnx"),
                "--x-init".into(),
                fixture("mlp_x0.npy"),
                "--method".into(),
                "rk4".into(),
                "--steps".into(),
                "5".into(),
                "--ort-threads".into(),
                "2".into(),
                "--ort-spin".into(),
            ],
            "mlp_rk4_5.npy",
        ),
    ];
    for (args, want) in cases {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend_from_slice(&ort);
        let got = sample_ok(&out, &all);
        assert_close(&got, &npy(fixture(want)), want);
    }
}

/// A missing library, a file that is not one, and no library at all: one line naming the path
/// and the fix, nothing written.
#[cfg(feature = "ort")]
#[test]
fn a_missing_ort_library_is_a_one_line_error() {
    let mlp = fixture("mlp.onnx");
    let missing = tmp("libonnxruntime.so.1.99.0");
    let m = missing.to_str().unwrap();
    let err = fails(&[
        "sample",
        "--model",
        &mlp,
        "--runtime",
        "ort",
        "--ort-lib",
        m,
    ]);
    assert!(
        err.contains(m) && err.contains("--ort-lib") && err.contains("1.17"),
        "{err}"
    );
    let text = tmp("libonnxruntime.so.1.20.0");
    std::fs::write(&text, "not a library\n").unwrap();
    let t = text.to_str().unwrap();
    let err = fails(&[
        "sample",
        "--model",
        &mlp,
        "--runtime",
        "ort",
        "--ort-lib",
        t,
    ]);
    assert!(err.contains(t) && err.contains("failed to load"), "{err}");
    let out = tmp("no-lib.npy");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_flow-matching"))
        .args(["sample", "--model", &mlp, "--runtime", "ort", "--out"])
        .arg(&out)
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(!o.status.success() && !out.exists(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no library was named") && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
}

/// Without the feature, `--runtime ort` says how to get it.
#[cfg(not(feature = "ort"))]
#[test]
fn the_ort_runtime_needs_a_build_with_it() {
    let err = fails(&[
        "sample",
        "--model",
        &fixture("mlp.onnx"),
        "--runtime",
        "ort",
    ]);
    assert!(err.contains("--features ort"), "{err}");
}

#[test]
fn ort_flags_need_the_ort_runtime() {
    let err = fails(&[
        "sample",
        "--model",
        &fixture("mlp.onnx"),
        "--ort-lib",
        "/x/libonnxruntime.so",
    ]);
    assert!(
        err.contains("--ort-lib") && err.contains("--runtime ort"),
        "{err}"
    );
    let mlp = fixture("mlp.onnx");
    for flags in [&["--ort-threads", "2"][..], &["--ort-spin"][..]] {
        let mut args = vec!["sample", "--model", &mlp];
        args.extend_from_slice(flags);
        let err = fails(&args);
        assert!(
            err.contains(flags[0]) && err.contains("--runtime ort"),
            "{err}"
        );
    }
}

/// `--time-convention noise_at_1` samples the network as openpi trained it (Euler from t = 1
/// down to 0 on the network itself), which differs from the default; a wrong name or a model
/// that names its own convention is a one-line error.
#[test]
fn time_convention_flag_runs_the_model_as_trained() {
    let x0 = fixture("mlp_x0.npy");
    let model = fixture("mlp.onnx");
    let a = tmp("tc0.npy").to_string_lossy().into_owned();
    let b = tmp("tc1.npy").to_string_lossy().into_owned();
    let plain = sample_ok(&a, &["--model", &model, "--x-init", &x0, "--steps", "4"]);
    let flipped = sample_ok(
        &b,
        &[
            "--model",
            &model,
            "--x-init",
            &x0,
            "--steps",
            "4",
            "--time-convention",
            "noise_at_1",
        ],
    );
    assert!(
        max_abs_diff(&plain, &flipped) > 1e-3,
        "the flag changes the flow"
    );
    let err = fails(&["sample", "--model", &model, "--time-convention", "t1"]);
    assert!(
        err.contains("--time-convention") && err.contains("noise_at_0 or noise_at_1"),
        "{err}"
    );
}
