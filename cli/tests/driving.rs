//! `demo --data driving` and `eval-traj` end to end (tiny runs: the pipeline, not the quality).

mod support;
use support::{run_text as cli, tmp};

#[test]
fn driving_demo_writes_its_table_and_files_and_eval_traj_rescores_them() {
    let dir = tmp("demo");
    let d = dir.to_str().unwrap();
    let (ok, out, err) = cli(&[
        "demo",
        "--data",
        "driving",
        "--steps",
        "5",
        "--n",
        "12",
        "--out-dir",
        d,
    ]);
    assert!(ok, "{err}");
    for row in [
        "flow matching, euler 10 steps (NFE 10)",
        "flow matching, heun 5 steps (NFE 10)",
        "regression baseline",
        "conditional mean",
        "oracle",
        "minADE@0.5s",
        "minFDE@6.4s",
    ] {
        assert!(out.contains(row), "no {row:?} in\n{out}");
    }
    for f in [
        "scenes.png",
        "samples.npy",
        "baseline.npy",
        "test_x.npy",
        "test_cond.npy",
        "test_v0.npy",
        "model.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "no {f}");
    }
    // eval-traj on the demo's own files gives the demo's euler-10 row.
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (ok, again, err) = cli(&[
        "eval-traj",
        "--samples",
        &path("samples.npy"),
        "--truth",
        &path("test_x.npy"),
        "--v0",
        &path("test_v0.npy"),
    ]);
    assert!(ok, "{err}");
    let cells = |table: &str, prefix: &str| -> String {
        let line = table.lines().find(|l| l.starts_with(prefix)).unwrap();
        line.split('|').skip(2).collect::<Vec<_>>().join("|")
    };
    assert_eq!(
        cells(&out, "| flow matching, euler 10"),
        cells(&again, &format!("| {}", path("samples.npy")))
    );

    // One prediction per scene is not K = 6 samples per scene: a one-line error naming the file.
    let (ok, _, err) = cli(&[
        "eval-traj",
        "--samples",
        &path("baseline.npy"),
        "--truth",
        &path("test_x.npy"),
        "--v0",
        &path("test_v0.npy"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("baseline.npy")
            && err.contains("[72 (= 12 rows of --truth x --per-cond 6), 64, 2]")
            && err.contains("[12, 64, 2]"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // The user's path: train --data driving (the scenes' own condition), sample 6 futures per
    // held-out scene from the demo's test_cond.npy, score them with eval-traj.
    for arch in ["mlp", "transformer"] {
        let model = path(&format!("train-{arch}.safetensors"));
        let (ok, _, err) = cli(&[
            "train",
            "--data",
            "driving",
            "--arch",
            arch,
            "--steps",
            "3",
            "--batch",
            "16",
            "--hidden",
            "32",
            "--width",
            "16",
            "--mlp-hidden",
            "32",
            "--depth",
            "1",
            "--out",
            &model,
        ]);
        assert!(ok, "{err}");
        let samples = path(&format!("train-{arch}-samples.npy"));
        let (ok, _, err) = cli(&[
            "sample",
            "--model",
            &model,
            "--cond",
            &path("test_cond.npy"),
            "--per-cond",
            "6",
            "--out",
            &samples,
        ]);
        assert!(ok, "{err}");
        let (ok, table, err) = cli(&[
            "eval-traj",
            "--samples",
            &samples,
            "--truth",
            &path("test_x.npy"),
            "--v0",
            &path("test_v0.npy"),
        ]);
        assert!(ok, "{err}");
        assert!(table.contains(&samples), "{table}");
    }
    // A condition file on the driving scenes is refused, naming the flag; nothing written.
    let never = path("never.safetensors");
    let (ok, _, err) = cli(&[
        "train",
        "--data",
        "driving",
        "--cond",
        &path("test_cond.npy"),
        "--out",
        &never,
    ]);
    assert!(
        !ok && err.contains("--cond") && err.contains("their own condition"),
        "{err}"
    );
    assert!(!dir.join("never.safetensors").exists());
}
