//! Issue 19, end to end: hostile inputs, round two. One test per cause of the issue and per
//! smaller item; every file a test uses it makes itself in its own temporary directory (ONNX
//! files byte by byte, tests/support/onnx_proto.rs). A refusal must be exit status 1 with one
//! short `error:` line: no panic, no abort, no hang, no exit 0 with garbage.
//!
//! The memory ceiling is pinned with FLOW_MATCHING_MEMORY_LIMIT (2 GiB).

#[path = "../../tests/support/onnx_proto.rs"]
mod onnx_proto;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use flow_matching::io::{read_npy, write_npy};
use onnx_proto::{float_tensor, int64_tensor, node, Graph, Msg, D, FLOAT};

const LIMIT: &str = "2147483648";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("fm-hostile-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary with the pinned ceiling, killing it after `timeout` (a hang is a failure).
fn fm_timeout(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flow-matching"));
    cmd.args(args)
        .env("FLOW_MATCHING_MEMORY_LIMIT", LIMIT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {timeout:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fm(args: &[&str]) -> Output {
    fm_timeout(args, &[], Duration::from_secs(120))
}

fn check_refusal(args: &[&str], out: &Output, expect: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail with status 1 (no panic, no abort, no success): {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error:"), "{args:?}: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.len() < 1000, "{args:?}: message of {} bytes", err.len());
    assert!(
        err.to_lowercase().contains(&expect.to_lowercase()),
        "{args:?}: expected {expect:?} in {err}"
    );
    err
}

/// Asserts a clean refusal containing `expect`.
fn refused(args: &[&str], expect: &str) -> String {
    let out = fm(args);
    check_refusal(args, &out, expect)
}

fn ok(args: &[&str]) -> String {
    let out = fm(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?} failed: {err}");
    err
}

const TINY: [&str; 12] = [
    "--hidden", "8", "--depth", "1", "--freqs", "2", "--batch", "8", "--warmup", "1", "--steps",
    "4",
];

/// A tiny velocity-mlp for rows of 2 values with a 3-number continuous condition, and a
/// one-row condition file.
fn cond_model(d: &Path) -> (PathBuf, PathBuf) {
    let x = d.join("x.npy");
    let c = d.join("c.npy");
    let xs: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let cs: Vec<f32> = (0..96).map(|i| (i as f32 * 0.11).cos()).collect();
    write_npy(&x, &Tensor::from_vec(xs, (32, 2), &Device::Cpu).unwrap()).unwrap();
    write_npy(&c, &Tensor::from_vec(cs, (32, 3), &Device::Cpu).unwrap()).unwrap();
    let m = d.join("cond.safetensors");
    let mut args = vec!["train", "--data", s(&x), "--cond", s(&c), "--out", s(&m)];
    args.extend_from_slice(&TINY);
    ok(&args);
    let one = d.join("one.npy");
    write_npy(
        &one,
        &Tensor::from_vec(vec![0.1f32, -0.2, 0.3], (1, 3), &Device::Cpu).unwrap(),
    )
    .unwrap();
    (m, one)
}

fn plain_model(d: &Path) -> PathBuf {
    let p = d.join("model.safetensors");
    let mut args = vec!["train", "--data", "moons", "--out", s(&p)];
    args.extend_from_slice(&TINY);
    ok(&args);
    p
}

/// Cause 1 and cause 10: the batch `--per-cond K` implies is bounded before the condition is
/// expanded; a one-row `--cond` is broadcast to `--batch`.
#[test]
fn per_cond_batches_are_bounded_and_one_row_conditions_broadcast() {
    let d = dir("per-cond");
    let (m, one) = cond_model(&d);
    let out = d.join("out.npy");
    let traj = d.join("traj.npy");
    for k in ["1099511627776", "1152921504606846976", "100000000"] {
        let start = Instant::now();
        refused(
            &[
                "sample",
                "--model",
                s(&m),
                "--cond",
                s(&one),
                "--per-cond",
                k,
                "--out",
                s(&out),
            ],
            "--per-cond",
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "--per-cond {k} took {:?}",
            start.elapsed()
        );
    }
    refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--cond",
            s(&one),
            "--per-cond",
            "1000000",
            "--steps",
            "1000",
            "--trajectory",
            s(&traj),
            "--out",
            s(&out),
        ],
        "--trajectory",
    );
    refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--cond",
            s(&one),
            "--batch",
            "1000000000",
            "--out",
            s(&out),
        ],
        "--batch 1000000000",
    );
    assert!(!out.exists() && !traj.exists());
    // Cause 10: one condition row, --batch 5: five samples, as --help says.
    ok(&[
        "sample",
        "--model",
        s(&m),
        "--cond",
        s(&one),
        "--batch",
        "5",
        "--out",
        s(&out),
    ]);
    let x = read_npy(&out, &Device::Cpu).unwrap();
    assert_eq!(
        x.dims(),
        &[5, 2],
        "a one-row --cond is broadcast to --batch"
    );
}

/// Cause 2: `encode --n`, `reflow --pairs`, `--batch`, `--rounds` are bounded.
#[test]
fn encode_and_reflow_counts_are_bounded() {
    let d = dir("counts");
    let m = plain_model(&d);
    let out = d.join("out.npy");
    let m2 = d.join("m2.safetensors");
    let huge = "4611686018427387904";
    refused(
        &[
            "encode",
            "--model",
            s(&m),
            "--data",
            "moons",
            "--n",
            huge,
            "--out",
            s(&out),
        ],
        "--n",
    );
    for (flag, expect) in [
        ("--pairs", "--pairs"),
        ("--rounds", "--rounds"),
        ("--batch", "--batch"),
    ] {
        refused(
            &["reflow", "--model", s(&m), "--out", s(&m2), flag, huge],
            expect,
        );
    }
    assert!(!out.exists() && !m2.exists());
}

fn write_f32(p: &Path, dims: &[usize], v: Vec<f32>) {
    write_npy(p, &Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap();
}

/// Files for eval-traj: 4 scenes of 8 waypoints, 6 samples each.
fn traj_files(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (truth, v0, samples) = (d.join("truth.npy"), d.join("v0.npy"), d.join("samples.npy"));
    write_f32(
        &truth,
        &[4, 8, 2],
        (0..64).map(|i| (i as f32 * 0.1).sin()).collect(),
    );
    write_f32(&v0, &[4], vec![5.0, 6.0, 7.0, 8.0]);
    write_f32(
        &samples,
        &[24, 8, 2],
        (0..384).map(|i| (i as f32 * 0.07).cos()).collect(),
    );
    (truth, v0, samples)
}

/// Cause 3: `eval-traj --per-cond` multiplies in checked arithmetic.
#[test]
fn eval_traj_products_are_checked() {
    let d = dir("eval-traj-products");
    let (truth, v0, samples) = traj_files(&d);
    // 4 x (2^62 + 6) wraps to 24, the samples' rows.
    let k = "4611686018427387910";
    let e = refused(
        &[
            "eval-traj",
            "--samples",
            s(&samples),
            "--truth",
            s(&truth),
            "--v0",
            s(&v0),
            "--per-cond",
            k,
        ],
        "--per-cond",
    );
    assert!(!e.contains("[0 "), "{e}");
    let xyz = d.join("xyz.npy");
    let gt = d.join("gt.npy");
    write_f32(&xyz, &[24, 8, 3], vec![0.5; 576]);
    write_f32(&gt, &[4, 8, 3], vec![0.0; 96]);
    refused(
        &[
            "eval-traj",
            "--pred-xyz",
            s(&xyz),
            "--truth-xyz",
            s(&gt),
            "--per-cond",
            k,
        ],
        "--per-cond",
    );
}

/// Cause 4: every number eval-traj reads is finite, or the run is refused naming the file.
#[test]
fn eval_traj_refuses_non_finite_inputs() {
    let d = dir("eval-traj-finite");
    let (truth, v0, samples) = traj_files(&d);
    let run = |truth: &Path, v0: &Path, samples: &Path, extra: &[&str], expect: &str| {
        let mut args = vec![
            "eval-traj",
            "--samples",
            s(samples),
            "--truth",
            s(truth),
            "--v0",
            s(v0),
        ];
        args.extend_from_slice(extra);
        refused(&args, expect);
    };
    let bad_v0 = d.join("bad_v0.npy");
    write_f32(&bad_v0, &[4], vec![5.0, f32::NAN, 7.0, 8.0]);
    run(&truth, &bad_v0, &samples, &[], "--v0");
    let inf_v0 = d.join("inf_v0.npy");
    write_f32(&inf_v0, &[4], vec![5.0, f32::INFINITY, 7.0, 8.0]);
    run(&truth, &inf_v0, &samples, &["--json"], "--v0");
    let bad_truth = d.join("bad_truth.npy");
    let mut t: Vec<f32> = (0..64).map(|i| (i as f32 * 0.1).sin()).collect();
    t[17] = f32::INFINITY;
    write_f32(&bad_truth, &[4, 8, 2], t);
    run(&bad_truth, &v0, &samples, &[], "--truth");
    // A whole scene of NaN samples, and a single NaN sample.
    let mut sv: Vec<f32> = (0..384).map(|i| (i as f32 * 0.07).cos()).collect();
    let one = d.join("one_nan.npy");
    sv[100] = f32::NAN;
    write_f32(&one, &[24, 8, 2], sv.clone());
    run(&truth, &v0, &one, &[], "--samples");
    for v in &mut sv[96..192] {
        *v = f32::NAN;
    }
    let scene = d.join("scene_nan.npy");
    write_f32(&scene, &[24, 8, 2], sv);
    run(&truth, &v0, &scene, &["--json"], "--samples");
    run(
        &truth,
        &v0,
        &samples,
        &["--curv-mean", "inf"],
        "--curv-mean",
    );
    let xyz = d.join("xyz.npy");
    let gt = d.join("gt.npy");
    let mut p = vec![0.5f32; 576];
    p[7] = f32::NAN;
    write_f32(&xyz, &[24, 8, 3], p);
    write_f32(&gt, &[4, 8, 3], vec![0.0; 96]);
    refused(
        &["eval-traj", "--pred-xyz", s(&xyz), "--truth-xyz", s(&gt)],
        "--pred-xyz",
    );
    write_f32(&xyz, &[24, 8, 3], vec![0.5; 576]);
    refused(
        &[
            "eval-traj",
            "--pred-xyz",
            s(&xyz),
            "--truth-xyz",
            s(&gt),
            "--curv-mean",
            "inf",
        ],
        "--curv-mean",
    );
}

fn write_onnx(d: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn sample_onnx(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "sample",
        "--model",
        s(model),
        "--out",
        s(out),
        "--steps",
        "2",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn refused_owned(args: &[String], expect: &str) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&a, expect)
}

/// Cause 5: small unusual graphs that used to panic inside tract are one-line refusals.
#[test]
fn unusual_onnx_graphs_are_refused_without_a_panic() {
    let d = dir("onnx-unusual");
    let out = d.join("out.npy");
    // A graph with no nodes.
    let empty = write_onnx(&d, "empty.onnx", &Graph::velocity().bytes());
    refused_owned(&sample_onnx(&empty, &out, &[]), "no nodes");
    // A string-typed initializer (raw bytes, which tract cannot build).
    let mut g = Graph::velocity();
    g.initializers.push(
        Msg::default()
            .int(1, 2)
            .int(2, onnx_proto::STRING)
            .str(8, "names")
            .bytes(9, b"ab"),
    );
    g.nodes.push(node("Identity", "id", &["x"], &["v"]));
    let strings = write_onnx(&d, "string.onnx", &g.bytes());
    refused_owned(&sample_onnx(&strings, &out, &[]), "STRING");
    assert!(!out.exists());
}

/// A graph whose velocity is `op(x, size)`, the size an int64 initializer.
/// Cause 6: tiny files that ask for terabytes at load or at run time are refused first.
#[test]
fn small_onnx_files_cannot_allocate_without_limit() {
    let d = dir("onnx-alloc");
    let out = d.join("out.npy");
    let cases: Vec<(&str, Vec<u8>, Vec<&str>, &str)> = vec![
        (
            "cos.onnx",
            onnx_proto::size_op("ConstantOfShape", &[1_000_000, 1_000_000, 2]),
            vec![],
            "grow",
        ),
        (
            "expand.onnx",
            onnx_proto::size_op("Expand", &[100_000, 12_000, 2]),
            vec![],
            "grow",
        ),
        // At batch 1 this Tile is 8 GB of declared shapes: refused at load.
        (
            "tile.onnx",
            onnx_proto::size_op("Tile", &[1_000_000, 1_000]),
            vec![],
            "memory",
        ),
        // 8 MB at batch 1, 2 * 10^18 bytes at --batch 10^6: refused when that plan is built.
        (
            "tile_batch.onnx",
            onnx_proto::size_op("Tile", &[16_000, 16_000]),
            vec!["--batch", "1000000"],
            "batch 1000000",
        ),
    ];
    for (name, bytes, extra, expect) in cases {
        assert!(bytes.len() < 400, "{name}: {} bytes", bytes.len());
        let p = write_onnx(&d, name, &bytes);
        let start = Instant::now();
        refused_owned(&sample_onnx(&p, &out, &extra), expect);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name}: {:?}",
            start.elapsed()
        );
    }
    // Range from constants.
    let mut g = Graph::velocity();
    g.initializers.push(int64_tensor("a", &[], &[0]));
    g.initializers
        .push(int64_tensor("b", &[], &[1_000_000_000_000]));
    g.initializers.push(int64_tensor("c", &[], &[1]));
    g.nodes
        .push(node("Range", "range", &["a", "b", "c"], &["v"]));
    let p = write_onnx(&d, "range.onnx", &g.bytes());
    refused_owned(&sample_onnx(&p, &out, &[]), "range");
    assert!(!out.exists());
}

/// `v = x * w`, `w [2]` float32 in external data at `location`.
fn external_model(d: &Path, location: &str, length: Option<u64>) -> PathBuf {
    let mut g = Graph::velocity();
    g.initializers
        .push(onnx_proto::external_tensor("w", &[2], location, length));
    g.nodes.push(node("Mul", "scale", &["x", "w"], &["v"]));
    write_onnx(d, "ext.onnx", &g.bytes())
}

/// Cause 7: external data only from regular files, and only the tensor's declared bytes.
#[test]
#[cfg(unix)]
fn onnx_external_data_is_read_from_regular_files_and_bounded() {
    let d = dir("onnx-external");
    let out = d.join("out.npy");
    // A FIFO: refused at once, never opened for a blocking read.
    let fifo = d.join("fifo.bin");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let m = external_model(&d, "fifo.bin", Some(8));
        let args = sample_onnx(&m, &out, &[]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = fm_timeout(&a, &[], Duration::from_secs(30));
        check_refusal(&a, &o, "regular file");
    } else {
        eprintln!("note: mkfifo unavailable; the FIFO case is skipped");
    }
    // A sparse 6 GB data file, the tensor 8 bytes: sampling reads 8 bytes, under a 3 GB
    // address-space limit that a read of the whole file could not fit.
    let sparse = d.join("sparse.bin");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(6 << 30).unwrap();
    drop(f);
    let m = external_model(&d, "sparse.bin", None);
    let cmd = format!(
        "ulimit -v 4000000 && FLOW_MATCHING_MEMORY_LIMIT={LIMIT} exec '{}' sample --model '{}' --out '{}' --steps 2 --batch 4",
        env!("CARGO_BIN_EXE_flow-matching"),
        s(&m),
        s(&out)
    );
    let o = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sparse external data: {err}");
    let x = read_npy(&out, &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[4, 2]);
    // A declared length that disagrees with the tensor's size is refused.
    std::fs::remove_file(&out).unwrap();
    let m = external_model(&d, "sparse.bin", Some(1 << 32));
    refused_owned(&sample_onnx(&m, &out, &[]), "declared size");
}

/// Cause 8: a 5.6 MB chain of 200,000 Identity nodes loads quickly.
#[test]
fn a_long_identity_chain_loads_in_linear_time() {
    let d = dir("onnx-identity");
    let mut g = Graph::velocity();
    let n = 200_000;
    let names: Vec<String> = (0..n).map(|i| format!("h{i}")).collect();
    for i in 0..n {
        let input = if i == 0 { "x" } else { names[i - 1].as_str() };
        let output = if i == n - 1 { "v" } else { names[i].as_str() };
        g.nodes
            .push(node("Identity", &format!("id{i}"), &[input], &[output]));
    }
    let p = write_onnx(&d, "chain.onnx", &g.bytes());
    let out = d.join("out.npy");
    let args = sample_onnx(&p, &out, &["--batch", "3"]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let o = fm_timeout(&a, &[], Duration::from_secs(60));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(read_npy(&out, &Device::Cpu).unwrap().dims(), &[3, 2]);
}

/// Cause 9: `train --out M --loss-plot P` with P's disk full leaves M as it was and never says
/// "wrote". Needs a tmpfs, so root; skipped with a note otherwise.
#[test]
fn a_full_disk_under_one_output_keeps_every_output() {
    let d = dir("disk-full");
    let m = d.join("model.safetensors");
    let before = b"the previous model".to_vec();
    std::fs::write(&m, &before).unwrap();
    let mnt = d.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", s(&mnt)])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("note: cannot mount a tmpfs (not root?); the disk-full case is skipped");
        return;
    }
    // Fill it.
    let mut filler = Vec::new();
    for i in 0.. {
        let f = mnt.join(format!("fill{i}"));
        if std::fs::write(&f, vec![7u8; 4096]).is_err() {
            break;
        }
        filler.push(f);
    }
    let plot = mnt.join("loss.png");
    let mut args = vec![
        "train",
        "--data",
        "moons",
        "--out",
        s(&m),
        "--loss-plot",
        s(&plot),
    ];
    args.extend_from_slice(&TINY);
    let o = fm(&args);
    let _ = Command::new("umount").arg(&mnt).status();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("wrote"), "said wrote before failing: {err}");
    assert_eq!(
        std::fs::read(&m).unwrap(),
        before,
        "the previous --out is kept"
    );
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fm-tmp") || n.ends_with(".fm-lock"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Smaller items: long values and paths are cut; 250-byte names work; a bad memory ceiling,
/// `--checkpoint-every 0` and an `.onnx` file given to encode/reflow are refused by name.
#[test]
fn smaller_items_of_issue_19() {
    let d = dir("small");
    let m = plain_model(&d);
    let out = d.join("out.npy");
    let long_value = "x".repeat(100_000);
    refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--method",
            &long_value,
            "--out",
            s(&out),
        ],
        "characters in all",
    );
    let long_path = d.join("p".repeat(200)).join("q".repeat(10_000));
    let e = refused(
        &["sample", "--model", s(&long_path), "--out", s(&out)],
        "characters in all",
    );
    assert!(e.len() < 600, "{e}");
    let e = refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--x-init",
            s(&long_path),
            "--out",
            s(&out),
        ],
        "characters in all",
    );
    assert!(e.len() < 600, "{e}");
    // A base name of 250 bytes (NAME_MAX is 255).
    let long_name = d.join(format!("{}.npy", "n".repeat(246)));
    ok(&[
        "sample",
        "--model",
        s(&m),
        "--batch",
        "3",
        "--out",
        s(&long_name),
    ]);
    assert_eq!(read_npy(&long_name, &Device::Cpu).unwrap().dims(), &[3, 2]);
    let o = fm_timeout(
        &["sample", "--model", s(&m), "--out", s(&out)],
        &[("FLOW_MATCHING_MEMORY_LIMIT", "abc")],
        Duration::from_secs(60),
    );
    check_refusal(
        &["FLOW_MATCHING_MEMORY_LIMIT=abc"],
        &o,
        "FLOW_MATCHING_MEMORY_LIMIT",
    );
    let ck = d.join("ck.safetensors");
    let mut args = vec![
        "train",
        "--data",
        "moons",
        "--out",
        s(&ck),
        "--checkpoint-every",
        "0",
    ];
    args.extend_from_slice(&TINY);
    refused(&args, "--checkpoint-every");
    let onnx = write_onnx(&d, "net.onnx", &onnx_proto::identity_velocity());
    refused(
        &[
            "encode",
            "--model",
            s(&onnx),
            "--data",
            "moons",
            "--out",
            s(&out),
        ],
        "ONNX model",
    );
    refused(
        &[
            "reflow",
            "--model",
            s(&onnx),
            "--out",
            s(&d.join("r.safetensors")),
        ],
        "ONNX model",
    );
    // The same graph runs through sample (the builder's files are real ONNX).
    ok(&[
        "sample",
        "--model",
        s(&onnx),
        "--batch",
        "2",
        "--out",
        s(&out),
    ]);
    let _ = (D::N(1), FLOAT, float_tensor("unused", &[1], &[0.0]));
}
