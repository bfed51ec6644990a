//! `train --cond` / `sample --cond --per-cond` for the built-in models (velocity-mlp and the
//! waypoint transformer), and the one-line errors for conditions that do not fit.

mod support;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flow_matching::io::{read_npy, write_npy};
use rand::{Rng, SeedableRng};
use support::{run, tmp};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `n` sequences [4, 2] whose mean is set by a 2-number condition: x[l] = (c0 * l / 4, c1).
fn write_data(n: usize, name: &str) -> (String, String) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (mut x, mut c) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (c0, c1): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(5.0..9.0));
        for l in 0..4 {
            x.push(c0 * l as f32 / 4.0 + 0.05 * rng.random_range(-1.0f32..1.0));
            x.push(c1 - 7.0);
        }
        c.extend([c0, c1]);
    }
    let xp = tmp(&format!("{name}-x.npy"));
    let cp = tmp(&format!("{name}-c.npy"));
    write_npy(&xp, &Tensor::from_vec(x, (n, 4, 2), &Device::Cpu).unwrap()).unwrap();
    write_npy(&cp, &Tensor::from_vec(c, (n, 2), &Device::Cpu).unwrap()).unwrap();
    (s(&xp), s(&cp))
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {err}");
    err
}

/// The one-line error of a failing run.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

/// `train --cond` with the tests' small sizes (both architectures' flags) and `extra` flags;
/// returns its stderr.
fn train(x: &str, c: &str, arch: &str, steps: &str, model: &Path, extra: &[&str]) -> String {
    let model = s(model);
    let mut args = vec![
        "train",
        "--data",
        x,
        "--cond",
        c,
        "--arch",
        arch,
        "--steps",
        steps,
        "--batch",
        "64",
        "--hidden",
        "64",
        "--depth",
        "2",
        "--width",
        "32",
        "--mlp-hidden",
        "64",
        "--warmup",
        "10",
        "--out",
        &model,
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

#[test]
fn conditional_train_and_sample_for_both_architectures() {
    let (x, c) = write_data(256, "both");
    for arch in ["mlp", "transformer"] {
        let model = tmp(&format!("{arch}.safetensors"));
        // 1500 MLP steps: under logit-normal times and the EMA, 300 leave the second channel
        // about 0.45 off its target (measured); 1500 land within 0.08 (seeds 0-2).
        let steps = if arch == "mlp" { "1500" } else { "60" };
        train(&x, &c, arch, steps, &model, &[]);
        // Two condition rows, 5 samples each: [10, 4, 2], condition-major.
        let cond2 = tmp(&format!("{arch}-c2.npy"));
        write_npy(
            &cond2,
            &Tensor::new(&[[-1f32, 6.0], [1.0, 8.0]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let out = tmp(&format!("{arch}-samples.npy"));
        ok(&[
            "sample",
            "--model",
            &s(&model),
            "--cond",
            &s(&cond2),
            "--per-cond",
            "5",
            "--out",
            &s(&out),
        ]);
        let v = read_npy(&out, &Device::Cpu).unwrap();
        assert_eq!(v.dims(), &[10, 4, 2], "{arch}");
        if arch == "mlp" {
            // The second channel follows c1 - 7: -1 for the first five rows, +1 for the rest.
            let rows = v.to_vec3::<f32>().unwrap();
            let mean = |r: std::ops::Range<usize>| -> f32 {
                r.clone()
                    .map(|i| rows[i].iter().map(|p| p[1]).sum::<f32>() / 4.0)
                    .sum::<f32>()
                    / r.len() as f32
            };
            assert!((mean(0..5) + 1.0).abs() < 0.3, "{}", mean(0..5));
            assert!((mean(5..10) - 1.0).abs() < 0.3, "{}", mean(5..10));
        }
        // Guidance with a continuous condition.
        ok(&[
            "sample",
            "--model",
            &s(&model),
            "--cond",
            &s(&cond2),
            "--per-cond",
            "2",
            "--guidance",
            "2",
            "--out",
            &s(&out),
        ]);
        assert_eq!(read_npy(&out, &Device::Cpu).unwrap().dims(), &[4, 4, 2]);
    }
}

/// `n` sequences [l, 2] with a 1-number condition (zeros: only the shapes matter here).
fn write_sequences(n: usize, l: usize, name: &str) -> (String, String) {
    let xp = tmp(&format!("{name}-x.npy"));
    let cp = tmp(&format!("{name}-c.npy"));
    write_npy(
        &xp,
        &Tensor::zeros((n, l, 2), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    write_npy(
        &cp,
        &Tensor::zeros((n, 1), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    (s(&xp), s(&cp))
}

#[test]
fn the_architecture_is_chosen_from_the_data_and_printed() {
    let model = tmp("auto-big.safetensors");
    // `train` with every size chosen, plus `extra`; returns its stderr.
    let train_chosen = |x: &str, c: &str, extra: &[&str]| {
        let m = s(&model);
        let mut args = vec!["train", "--data", x, "--cond", c, "--out", &m];
        args.extend_from_slice(extra);
        ok(&args)
    };
    // 10,000 sequences of 32 waypoints: the transformer (the rule's smallest such table).
    let (x, c) = write_sequences(10_000, 32, "auto-big");
    let err = train_chosen(&x, &c, &["--steps", "2"]);
    assert!(
        err.contains("sizes: transformer width 64, depth 3, heads 4, batch 256, 2 steps (chosen from the data: 10000 rows of dimension 64 with a 1-number condition"),
        "{err}"
    );
    // Without --steps the transformer takes the measured 3,000 steps at most, within 9
    // minutes or within the budget given.
    let err = train_chosen(&x, &c, &["--time-budget", "1s"]);
    assert!(
        err.contains("sizes: transformer width 64, depth 3, heads 4, batch 256, at most 3000 steps planned to fit 1s"),
        "{err}"
    );
    // Fewer rows or shorter sequences: the velocity-mlp.
    for (n, l) in [(9_999, 32), (10_000, 31)] {
        let (x, c) = write_sequences(n, l, &format!("auto-{n}-{l}"));
        let err = train_chosen(&x, &c, &["--steps", "2"]);
        assert!(
            err.contains("sizes: velocity-mlp hidden 256, depth 3"),
            "{n} x {l}: {err}"
        );
    }
}

#[test]
fn early_stopping_holds_out_condition_rows_for_both_architectures() {
    let (x, c) = write_data(200, "early");
    for arch in ["mlp", "transformer"] {
        let model = tmp(&format!("early-{arch}.safetensors"));
        let early = [
            "--early-stop",
            "--val-every",
            "20",
            "--patience",
            "2",
            "--val-fraction",
            "0.25",
        ];
        let err = train(&x, &c, arch, "60", &model, &early);
        // A quarter of 200 rows, scored at steps 20, 40 and 60 (unless stopped first).
        assert!(
            err.contains("early stopping: best held-out loss")
                && err.contains("on 50 held-out rows"),
            "{arch}: {err}"
        );
        let out = tmp(&format!("early-{arch}-samples.npy"));
        ok(&[
            "sample",
            "--model",
            &s(&model),
            "--cond",
            &c,
            "--per-cond",
            "1",
            "--out",
            &s(&out),
        ]);
        assert_eq!(read_npy(&out, &Device::Cpu).unwrap().dims(), &[200, 4, 2]);
    }
    let e = fails(&[
        "train",
        "--data",
        &x,
        "--cond",
        &c,
        "--steps",
        "5",
        "--early-stop",
        "--val-fraction",
        "1.5",
        "--out",
        &s(&tmp("early-bad.safetensors")),
    ]);
    assert_eq!(
        e,
        "error: invalid --val-fraction 1.5: a fraction strictly between 0 and 1"
    );
}

#[test]
fn condition_errors_are_one_line_and_write_nothing() {
    let (x, c) = write_data(64, "err");
    let model = tmp("err-model.safetensors");
    ok(&[
        "train",
        "--data",
        &x,
        "--cond",
        &c,
        "--steps",
        "2",
        "--batch",
        "8",
        "--hidden",
        "8",
        "--depth",
        "1",
        "--out",
        &s(&model),
    ]);
    // Row counts that differ: the error names both files.
    let (_, c_short) = write_data(10, "short");
    let e = fails(&[
        "train",
        "--data",
        &x,
        "--cond",
        &c_short,
        "--steps",
        "1",
        "--out",
        &s(&tmp("never.safetensors")),
    ]);
    assert!(
        e.contains(&c_short) && e.contains(&x) && e.contains("[64, ...]") && e.contains("[10, 2]"),
        "{e}"
    );
    assert!(!tmp("never.safetensors").exists());
    let out = tmp("err-out.npy");
    // Wrong shape for the model.
    let wrong = tmp("wrong.npy");
    write_npy(
        &wrong,
        &Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let e = fails(&[
        "sample",
        "--model",
        &s(&model),
        "--cond",
        &s(&wrong),
        "--out",
        &s(&out),
    ]);
    assert!(
        e.contains(&s(&wrong)) && e.contains("[N, 2]") && e.contains("[3, 5]"),
        "{e}"
    );
    // An unknown architecture, and a continuous condition with class labels.
    let e = fails(&[
        "train",
        "--data",
        &x,
        "--cond",
        &c,
        "--arch",
        "lstm",
        "--out",
        &s(&tmp("never.safetensors")),
    ]);
    assert!(
        e.contains("--arch") && e.contains("lstm") && e.contains("mlp, transformer"),
        "{e}"
    );
    let e = fails(&[
        "train",
        "--data",
        "moons",
        "--cond",
        &c,
        "--out",
        &s(&tmp("never.safetensors")),
    ]);
    assert!(
        e.contains("--cond") && e.contains(&c) && e.contains("a data file"),
        "{e}"
    );
    assert!(!tmp("never.safetensors").exists());
    // --per-cond 0.
    let e = fails(&[
        "sample",
        "--model",
        &s(&model),
        "--cond",
        &c,
        "--per-cond",
        "0",
        "--out",
        &s(&out),
    ]);
    assert!(e.contains("--per-cond"), "{e}");
    // A label on a model with a continuous condition.
    let e = fails(&[
        "sample",
        "--model",
        &s(&model),
        "--labels",
        "0,1",
        "--out",
        &s(&out),
    ]);
    assert!(
        e.contains("--labels") && e.contains("continuous condition"),
        "{e}"
    );
    // --cond on a model trained without one.
    let plain = tmp("plain.safetensors");
    ok(&[
        "train",
        "--data",
        &x,
        "--steps",
        "2",
        "--batch",
        "8",
        "--hidden",
        "8",
        "--depth",
        "1",
        "--out",
        &s(&plain),
    ]);
    let e = fails(&[
        "sample",
        "--model",
        &s(&plain),
        "--cond",
        &c,
        "--out",
        &s(&out),
    ]);
    assert!(e.contains(&c) && e.contains("trained without one"), "{e}");
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}
