//! Issue 11, end to end: nothing a file or a flag says crashes the program, exhausts memory or
//! costs a user their work. Each class of the issue has a table of cases; every case must exit
//! with status 1 and a short `error:` line (no panic, no abort, no exit-0 garbage), and the
//! files that were there before must be unchanged.
//!
//! The memory ceiling is pinned with FLOW_MATCHING_MEMORY_LIMIT (2 GiB) so the flag cases do
//! not depend on the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::Device;
use flow_matching::train::Trainer;

const LIMIT: &str = "2147483648";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("fm-reliability-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow-matching"))
        .args(args)
        .env("FLOW_MATCHING_MEMORY_LIMIT", LIMIT)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a clean refusal: exit status 1, one short `error:` message containing `expect`.
fn refused(args: &[&str], expect: &str) -> String {
    let out = fm(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail with status 1 (no panic, no abort, no success): {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error:"), "{args:?}: {err}");
    assert!(err.len() < 1500, "{args:?}: message of {} bytes", err.len());
    assert!(
        err.to_lowercase().contains(&expect.to_lowercase()),
        "{args:?}: expected {expect:?} in {err}"
    );
    err
}

const TINY: [&str; 12] = [
    "--hidden", "8", "--depth", "1", "--freqs", "2", "--batch", "8", "--warmup", "1", "--steps",
    "4",
];

/// A tiny trained checkpoint (a valid model file too).
fn tiny_model(d: &Path) -> PathBuf {
    let p = d.join("model.safetensors");
    let mut args = vec!["train", "--data", "moons", "--out", s(&p)];
    args.extend_from_slice(&TINY);
    let out = fm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// Rewrites a safetensors file's JSON header (and optionally its data) through `edit`.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(dst, out).unwrap();
}

fn npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut f = b"\x93NUMPY\x01\x00".to_vec();
    f.extend_from_slice(&(header.len() as u16).to_le_bytes());
    f.extend_from_slice(header.as_bytes());
    f.extend_from_slice(data);
    f
}

#[test]
fn sizes_read_from_files_are_checked_before_allocating() {
    let d = dir("sizes");
    let model = tiny_model(&d);
    let out = d.join("x.npy");
    let mut cases = 0;
    for (key, value, expect) in [
        ("depth", "1000000000000", "depth"),
        ("depth", "18446744073709551616", "depth"),
        ("hidden", "1000000000000", "hidden"),
        ("x_dims", "9223372036854775809,2", "overflows"),
        ("x_dims", "4611686018427387904,4", "overflows"),
        ("num_classes", "18446744073709551615", "model"),
    ] {
        let bad = d.join(format!("bad-{key}.safetensors"));
        rewrite(&model, &bad, |h, _| {
            h["__metadata__"][key] = serde_json::Value::String(value.into());
        });
        refused(&["sample", "--model", s(&bad), "--out", s(&out)], expect);
        refused(
            &["eval", "--model", s(&bad), "--data", "moons", "--n", "10"],
            expect,
        );
        cases += 2;
    }
    // Truncations of a valid model at every 37th byte.
    let bytes = std::fs::read(&model).unwrap();
    let cut = d.join("cut.safetensors");
    for len in (0..bytes.len()).step_by(bytes.len() / 7) {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        refused(
            &["sample", "--model", s(&cut), "--out", s(&out)],
            "model file",
        );
        cases += 1;
    }
    // Lying .npy headers as --x-init and as training data.
    for (shape, expect) in [
        ("(1000000000000, 2)", "bytes of data follow"),
        ("(9223372036854775808, 2)", "overflows"),
        ("(4611686018427387904, 4)", "overflows"),
        ("(2, 2)", "bytes of data follow"),
    ] {
        let f = d.join("lying.npy");
        let h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        std::fs::write(&f, npy(&h, &[0; 8])).unwrap();
        refused(
            &[
                "sample",
                "--model",
                s(&model),
                "--x-init",
                s(&f),
                "--out",
                s(&out),
            ],
            expect,
        );
        let mut args = vec!["train", "--data", s(&f), "--out", s(&out)];
        args.extend_from_slice(&TINY);
        refused(&args, expect);
        cases += 2;
    }
    assert!(!out.exists(), "no refused run wrote an output");
    // Devices are not read as files.
    refused(
        &["sample", "--model", "/dev/zero", "--out", s(&out)],
        "regular file",
    );
    cases += 1;
    eprintln!("size cases: {cases}");
}

#[test]
fn csv_through_a_real_parser() {
    let d = dir("csv");
    let out = d.join("m.safetensors");
    // A BOM on a headerless file keeps its first row; quotes and CRLF are fine.
    let f = d.join("bom.csv");
    std::fs::write(&f, b"\xEF\xBB\xBF\"0.5\",1\r\n-1,\"2\"\r\n0,0\r\n").unwrap();
    let ds = flow_matching::data::load_file(&f, None).unwrap();
    assert_eq!(ds.len(), 3);
    for (text, expect) in [
        (&b"1,2\n3\n"[..], "expected 2"),
        (b"x,y\n", "no data"),
        (b"1,2\n\xff,2\n", "expected a number"),
        (b"1,1e39\n", "finite"),
    ] {
        std::fs::write(&f, text).unwrap();
        let mut args = vec!["train", "--data", s(&f), "--out", s(&out)];
        args.extend_from_slice(&TINY);
        refused(&args, expect);
    }
}

#[test]
fn flags_are_bounded() {
    let d = dir("flags");
    let model = tiny_model(&d);
    let out = d.join("x.npy");
    let m = s(&model);
    let o = s(&out);
    let grid = format!("0,{}1", "0.5,".repeat(20_000));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "sample",
                "--model",
                m,
                "--out",
                o,
                "--batch",
                "9223372036854775808",
            ],
            "2^64",
        ),
        (
            vec![
                "sample",
                "--model",
                m,
                "--out",
                o,
                "--batch",
                "1000000000000",
            ],
            "available",
        ),
        (
            vec![
                "sample",
                "--model",
                m,
                "--out",
                o,
                "--batch",
                "4611686018427387904",
            ],
            "--batch",
        ),
        (
            vec!["sample", "--model", m, "--out", o, "--batch", "0"],
            "--batch",
        ),
        (
            vec!["sample", "--model", m, "--out", o, "--steps", "1000000000"],
            "--steps",
        ),
        (
            vec![
                "sample",
                "--model",
                m,
                "--out",
                o,
                "--steps",
                "18446744073709551615",
            ],
            "--steps",
        ),
        (
            vec!["sample", "--model", m, "--out", o, "--steps", "0"],
            "--steps",
        ),
        (vec!["bench", "--rounds", "0"], "--rounds"),
        (vec!["bench", "--rounds", "1000000000000"], "from 1 to 100"),
        (vec!["bench", "--reps-scale", "NaN"], "--reps-scale"),
        (vec!["bench", "--reps-scale=-1"], "--reps-scale"),
        (vec!["bench", "--reps-scale", "1e300"], "at most 100"),
        (
            vec!["sample", "--model", m, "--out", o, "--schedule", &grid],
            "values)",
        ),
        (
            vec!["sample", "--model", m, "--out", o, "--labels", &grid],
            "characters in all",
        ),
        (
            vec!["eval", "--model", m, "--data", "moons", "--n", "1000000000"],
            "--n",
        ),
        (
            vec!["eval", "--model", m, "--data", "moons", "--n", "0"],
            "--n",
        ),
        (
            vec!["eval", "--model", m, "--data", "moons", "--steps", &grid],
            "characters in all",
        ),
        (
            vec![
                "loglik",
                "--model",
                m,
                "--data",
                "moons",
                "--probes",
                "1000000000",
            ],
            "probes",
        ),
        (
            vec![
                "loglik",
                "--model",
                m,
                "--data",
                "moons",
                "--n",
                "1000000000",
            ],
            "--n",
        ),
        (
            vec![
                "loglik",
                "--model",
                m,
                "--data",
                "moons",
                "--batch",
                "4611686018427387904",
            ],
            "--batch",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--out",
                o,
                "--hidden",
                "1000000000",
            ],
            "--hidden",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--out",
                o,
                "--hidden",
                "4611686018427387904",
            ],
            "overflows",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--out",
                o,
                "--freqs",
                "1000000000",
            ],
            "--freqs",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--out",
                o,
                "--depth",
                "1000000000",
            ],
            "--depth",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--out",
                o,
                "--batch",
                "1000000000000",
            ],
            "--batch",
        ),
        (
            vec![
                "train",
                "--data",
                "moons",
                "--out",
                o,
                "--steps",
                "1000000000000",
            ],
            "--steps",
        ),
        (
            vec!["train", "--data", "moons", "--out", o, "--clip", "-1"],
            "--clip",
        ),
        (
            vec!["train", "--data", "moons", "--out", o, "--clip=-1"],
            "--clip",
        ),
        (
            vec!["train", "--data", "moons", "--out", o, "--clip", "NaN"],
            "--clip",
        ),
        (
            vec!["train", "--data", "moons", "--out", o, "--lr", "inf"],
            "learning rate",
        ),
    ];
    for (args, expect) in &cases {
        refused(args, expect);
    }
    assert!(!out.exists());
    eprintln!("flag cases: {}", cases.len());
}

#[test]
fn outputs_are_never_destroyed() {
    let d = dir("outputs");
    let model = tiny_model(&d);
    let before = std::fs::read(&model).unwrap();
    let data = d.join("data.csv");
    std::fs::write(&data, "0,1\n1,0\n0.5,0.5\n").unwrap();
    let data_before = std::fs::read(&data).unwrap();
    let (m, o) = (s(&model), d.join("x.npy"));
    let missing = d.join("no-such-dir").join("m.safetensors");
    // A named pipe stands for /dev/null and other special files (a test must not depend on
    // the machine's /dev/null still being a device).
    let fifo = d.join("pipe");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut cases = 0;
    let train = |extra: &[&str], expect: &str| {
        let mut args = vec!["train"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&TINY);
        refused(&args, expect);
    };
    train(
        &["--data", "moons", "--out", m, "--loss-plot", m],
        "also the output --out",
    );
    train(&["--data", s(&data), "--out", s(&data)], "input --data");
    train(&["--data", "moons", "--out", s(&missing)], "does not exist");
    train(&["--data", "moons", "--out", s(&fifo)], "regular file");
    train(&["--data", "moons", "--out", s(&d)], "directory");
    train(
        &[
            "--data",
            "moons",
            "--resume",
            m,
            "--out",
            s(&d.join("n.safetensors")),
            "--loss-plot",
            m,
        ],
        "input --resume",
    );
    cases += 6;
    for (extra, expect) in [
        (vec!["--out", m], "input --model"),
        (
            vec!["--out", s(&o), "--trajectory", s(&o)],
            "also the output --out",
        ),
        (vec!["--out", s(&o), "--times", m], "input --model"),
        (vec!["--out", s(&fifo)], "regular file"),
        (vec!["--out", s(&missing)], "does not exist"),
    ] {
        let mut args = vec!["sample", "--model", m];
        args.extend_from_slice(&extra);
        refused(&args, expect);
        cases += 1;
    }
    assert_eq!(
        std::fs::read(&model).unwrap(),
        before,
        "the model is untouched"
    );
    assert_eq!(
        std::fs::read(&data).unwrap(),
        data_before,
        "the data is untouched"
    );
    assert!(!o.exists());

    // A diverging run leaves the earlier checkpoint as it was.
    let mut args = vec!["train", "--data", "moons", "--out", m, "--lr", "1e10"];
    args.extend_from_slice(&[
        "--hidden", "8", "--depth", "1", "--freqs", "2", "--batch", "8",
    ]);
    args.extend_from_slice(&["--steps", "200", "--warmup", "1", "--clip", "0"]);
    refused(&args, "diverged");
    assert_eq!(std::fs::read(&model).unwrap(), before);
    cases += 1;

    // A checkpoint whose EMA weights are NaN cannot be resumed.
    let nan = d.join("nan.safetensors");
    rewrite(&model, &nan, |h, data| {
        let [a, _] = h["net.0.weight"]["data_offsets"]
            .as_array()
            .map(|v| {
                [
                    v[0].as_u64().unwrap() as usize,
                    v[1].as_u64().unwrap() as usize,
                ]
            })
            .unwrap();
        data[a..a + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let mut args = vec!["train", "--data", "moons", "--resume", s(&nan)];
    let fresh = d.join("fresh.safetensors");
    args.extend_from_slice(&["--out", s(&fresh)]);
    args.extend_from_slice(&TINY);
    refused(&args, "non-finite");
    assert!(!fresh.exists());
    cases += 1;

    // A successful sample replaces an existing --out and writes the trajectory beside it
    // (both staged, then renamed; the all-or-nothing part is tested in output.rs).
    let keep = d.join("keep.npy");
    std::fs::write(&keep, b"earlier samples").unwrap();
    let out = fm(&[
        "sample",
        "--model",
        m,
        "--out",
        s(&keep),
        "--trajectory",
        s(&d.join("t.npy")),
    ]);
    assert!(out.status.success());
    assert_ne!(std::fs::read(&keep).unwrap(), b"earlier samples");
    cases += 1;

    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".fm-tmp") || n.ends_with(".fm-lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!("output cases: {cases}");
}

#[test]
fn a_second_writer_gets_a_lock_error() {
    let d = dir("lock");
    let out = d.join("m.safetensors");
    let mut first = Command::new(env!("CARGO_BIN_EXE_flow-matching"))
        .args([
            "train",
            "--data",
            "moons",
            "--out",
            s(&out),
            "--steps",
            "10000000",
        ])
        .args([
            "--hidden", "8", "--depth", "1", "--freqs", "2", "--batch", "8",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = d.join(".m.safetensors.fm-lock");
    while !lock.exists() {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut args = vec!["train", "--data", "moons", "--out", s(&out)];
    args.extend_from_slice(&TINY);
    refused(&args, "another run is writing");
    refused(
        &["sample", "--model", s(&out), "--out", s(&out)],
        "input --model",
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

/// Whether a temporary output file exists in `d`.
fn temp_files(d: &Path) -> bool {
    std::fs::read_dir(d).unwrap().any(|e| {
        e.as_ref()
            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".fm-tmp"))
    })
}

#[test]
fn kill_during_checkpoint_keeps_the_old_one() {
    let d = dir("kill");
    // A default-width model: its checkpoint (weights, EMA, moments: ~3 MB) takes long
    // enough to write that some kills land inside a write.
    let ckpt = d.join("model.safetensors");
    let out = fm(&[
        "train",
        "--data",
        "moons",
        "--out",
        s(&ckpt),
        "--steps",
        "4",
        "--batch",
        "8",
        "--warmup",
        "1",
        "--checkpoint-every",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut kills, mut caught_mid_write) = (0, 0);
    for round in 0..10u64 {
        let good = std::fs::read(&ckpt).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_flow-matching"))
            .args([
                "train",
                "--data",
                "moons",
                "--resume",
                s(&ckpt),
                "--out",
                s(&ckpt),
            ])
            // A resumed run keeps the checkpoint's settings: a checkpoint every step.
            .args(["--steps", "1000000"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it write a few checkpoints, then kill it at a varying moment.
        let mut seen = 0;
        let mut last = std::fs::metadata(&ckpt).unwrap().modified().unwrap();
        while seen < 2 + round % 3 {
            std::thread::sleep(std::time::Duration::from_millis(3));
            if let Ok(t) = std::fs::metadata(&ckpt).and_then(|m| m.modified()) {
                if t != last {
                    seen += 1;
                    last = t;
                }
            }
            assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        }
        if round % 2 == 1 {
            // Odd rounds: kill the moment a temporary file shows up, i.e. inside a write.
            let start = std::time::Instant::now();
            while !temp_files(&d) && start.elapsed() < std::time::Duration::from_secs(5) {}
        } else {
            std::thread::sleep(std::time::Duration::from_micros(500 * round));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        caught_mid_write += usize::from(temp_files(&d));
        // Whatever the moment, the file is a complete checkpoint (the old or a newer one).
        let t = Trainer::resume(&ckpt, &Device::Cpu)
            .unwrap_or_else(|e| panic!("round {round}: checkpoint unusable after kill -9: {e}"));
        assert!(t.steps_done() >= 4, "round {round}");
        drop(good);
    }
    // The next run resumes, finishes, and removes the killed runs' temporaries and lock.
    let steps = Trainer::resume(&ckpt, &Device::Cpu).unwrap().steps_done() + 3;
    let out = fm(&[
        "train",
        "--data",
        "moons",
        "--resume",
        s(&ckpt),
        "--out",
        s(&ckpt),
        "--steps",
        &steps.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        Trainer::resume(&ckpt, &Device::Cpu).unwrap().steps_done(),
        steps
    );
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".fm-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!("kill -9 rounds: {kills}, {caught_mid_write} of them inside a checkpoint write");
    assert!(caught_mid_write > 0, "no kill landed inside a write");
}
