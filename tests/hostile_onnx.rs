//! Issue 19, the library side: an ONNX file cannot make `OnnxStep` panic, block or allocate
//! without limit. The files are built byte by byte (tests/support/onnx_proto.rs).
#![cfg(feature = "onnx")]

#[path = "support/onnx_proto.rs"]
mod onnx_proto;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flow_matching::onnx::OnnxStep;
use flow_matching::{Diffusion, Error, FlowMatching, SampleOptions, StepFn};
use onnx_proto::{node, Graph, Msg};

fn dir(name: &str) -> PathBuf {
    // Every test pins the same ceiling, so setting it from several threads is harmless.
    std::env::set_var("FLOW_MATCHING_MEMORY_LIMIT", "2147483648");
    let d = std::env::temp_dir()
        .join(format!("fm-hostile-onnx-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(d: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn unusual_graphs_are_errors_not_panics() {
    let d = dir("unusual");
    let e = OnnxStep::load(write(&d, "empty.onnx", &Graph::velocity().bytes())).unwrap_err();
    assert!(e.to_string().contains("no nodes"), "{e}");
    let mut g = Graph::velocity();
    g.initializers.push(
        Msg::default()
            .int(1, 2)
            .int(2, onnx_proto::STRING)
            .str(8, "names")
            .bytes(9, b"ab"),
    );
    g.nodes.push(node("Identity", "id", &["x"], &["v"]));
    let e = OnnxStep::load(write(&d, "string.onnx", &g.bytes())).unwrap_err();
    assert!(matches!(e, Error::Onnx { .. }), "{e}");
    assert!(e.to_string().contains("STRING"), "{e}");
}

#[test]
fn size_ops_from_constants_are_refused_by_node() {
    let d = dir("size-ops");
    for (op, size) in [
        ("ConstantOfShape", vec![1_000_000i64, 1_000_000, 2]),
        ("Expand", vec![100_000, 12_000, 2]),
    ] {
        let e = OnnxStep::load(write(&d, "m.onnx", &onnx_proto::size_op(op, &size))).unwrap_err();
        match &e {
            Error::TooLarge { what, .. } => {
                assert!(what.contains("\"grow\"") && what.contains(op), "{e}")
            }
            other => panic!("{op}: expected TooLarge, got {other}"),
        }
    }
}

/// A size computed from constants (PyTorch's `expand(b, l, -1)` exports as `Equal`/`Where`
/// over constants) is folded before loading: a small one loads and runs, a huge one is refused
/// by node, and one made by an op the fold does not know is refused as unbounded.
#[test]
fn computed_sizes_are_folded_before_loading() {
    let d = dir("computed-size");
    // [1, 1] * 2 = [2, 2]: x [2, 2] expands to itself.
    let mut step = OnnxStep::load(write(
        &d,
        "small.onnx",
        &onnx_proto::computed_expand(&[1, 1], "Mul"),
    ))
    .unwrap();
    let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap();
    let v = step.step(&x, &t).unwrap();
    assert_eq!(v.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
    let e = OnnxStep::load(write(
        &d,
        "huge.onnx",
        &onnx_proto::computed_expand(&[50_000, 12_000, 1], "Mul"),
    ))
    .unwrap_err();
    match &e {
        Error::TooLarge { what, .. } => {
            assert!(what.contains("\"grow\" (Expand)"), "{e}");
            assert!(what.contains("4800000000 elements"), "{e}")
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    let e = OnnxStep::load(write(
        &d,
        "unknown.onnx",
        &onnx_proto::computed_expand(&[50_000, 12_000, 1], "BitShift"),
    ))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("node \"grow\" (Expand) takes its size from a constant expression that is not bounded before loading"),
        "{e}"
    );
}

#[test]
fn declared_shapes_bound_the_load_and_every_plan() {
    let d = dir("plans");
    let e = OnnxStep::load(write(
        &d,
        "tile.onnx",
        &onnx_proto::size_op("Tile", &[1_000_000, 1_000]),
    ))
    .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("batch 1"), "{e}");
    // Small at batch 1, 2 * 10^18 bytes at batch 10^6: refused when that plan is built.
    let mut step = OnnxStep::load(write(
        &d,
        "tile_b.onnx",
        &onnx_proto::size_op("Tile", &[16_000, 16_000]),
    ))
    .unwrap();
    let fm = FlowMatching::new(step.x_dims())
        .unwrap()
        .with_steps(1)
        .unwrap();
    let e = fm
        .sample(
            1_000_000,
            &mut step,
            &Device::Cpu,
            &SampleOptions::seeded(0),
        )
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("batch 1000000"), "{e}");
}

#[test]
#[cfg(unix)]
fn external_data_from_a_fifo_is_refused_without_blocking() {
    let d = dir("fifo");
    let fifo = d.join("w.bin");
    if !std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("note: mkfifo unavailable; skipped");
        return;
    }
    let mut g = Graph::velocity();
    g.initializers
        .push(onnx_proto::external_tensor("w", &[2], "w.bin", Some(8)));
    g.nodes.push(node("Mul", "scale", &["x", "w"], &["v"]));
    let p = write(&d, "ext.onnx", &g.bytes());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(OnnxStep::load(&p).map(|_| ()).map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading a model whose external data is a FIFO blocked");
    let e = r.unwrap_err();
    assert!(e.contains("regular file"), "{e}");
}
