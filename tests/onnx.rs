//! ONNX step functions against the results PyTorch gets with the same networks
//! (tests/data/onnx/make_fixtures.py), across solvers, schedules, batches, conditions, guidance.
#![cfg(feature = "onnx")]

use candle_core::{DType, Device, Tensor};
use flow_matching::io::read_npy;
use flow_matching::onnx::OnnxStep;
use flow_matching::{Diffusion, Error, FlowMatching, Method, SampleOptions, Schedule, XDims};

const DIR: &str = "tests/data/onnx";

fn npy(name: &str) -> Tensor {
    read_npy(format!("{DIR}/{name}"), &Device::Cpu).expect(name)
}

fn path(name: &str) -> String {
    format!("{DIR}/{name}")
}

/// Asserts |got - want| <= 1e-4 + 1e-3 |want| everywhere.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let w = want
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = 1e-4 + 1e-3 * b.abs();
        assert!(
            (a - b).abs() <= tol,
            "{what}: element {i}: got {a}, PyTorch {b} (tolerance {tol})"
        );
    }
}

fn run(
    v: &mut OnnxStep,
    x0: &Tensor,
    method: &str,
    steps: usize,
    schedule: Schedule,
    dtype: DType,
) -> Tensor {
    let mut fm = FlowMatching::new(v.x_dims())
        .unwrap()
        .with_method(method)
        .unwrap();
    fm.schedule = schedule;
    let opts = SampleOptions {
        steps: Some(steps),
        x_init: Some(x0.clone()),
        dtype,
        ..Default::default()
    };
    fm.sample(x0.dim(0).unwrap(), v, &Device::Cpu, &opts)
        .unwrap()
        .x
}

#[test]
fn mlp_matches_pytorch_across_solvers() {
    let mut v = OnnxStep::load(path("mlp.onnx")).unwrap();
    assert_eq!(v.x_dims().dims(), &[3]);
    assert!(v.condition_inputs().is_empty());
    let x0 = npy("mlp_x0.npy");
    let u = Schedule::Uniform;
    let cases = [
        ("euler", 10, "mlp_euler10.npy"),
        ("midpoint", 8, "mlp_midpoint8.npy"),
        ("heun", 8, "mlp_heun8.npy"),
        ("rk4", 5, "mlp_rk4_5.npy"),
        ("rk4", 64, "mlp_rk4_64.npy"),
    ];
    for (m, n, want) in cases {
        let got = run(&mut v, &x0, m, n, u.clone(), DType::F32);
        assert_close(&got, &npy(want), &format!("{m} {n} steps"));
    }
    // f64 states take the generic tensor path instead of the Euler fast path.
    let got = run(&mut v, &x0, "euler", 10, u.clone(), DType::F64);
    assert_close(&got, &npy("mlp_euler10.npy"), "euler, f64 state");
    // The adaptive solver lands near the 64-step RK4 solution.
    let got = run(&mut v, &x0, "dopri5", 1, u, DType::F32);
    let want = npy("mlp_rk4_64.npy");
    let err = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err < 1e-3, "dopri5 vs rk4 64: {err}");
}

#[test]
fn mlp_matches_pytorch_on_other_schedules_and_encode() {
    let mut v = OnnxStep::load(path("mlp.onnx")).unwrap();
    let x0 = npy("mlp_x0.npy");
    let got = run(&mut v, &x0, "euler", 6, Schedule::Cosine, DType::F32);
    assert_close(&got, &npy("mlp_euler_cosine6.npy"), "cosine grid");
    let custom: Schedule = "0,0.1,0.3,0.6,1".parse().unwrap();
    let got = run(&mut v, &x0, "euler", 4, custom, DType::F32);
    assert_close(&got, &npy("mlp_euler_custom.npy"), "custom grid");
    let fm = FlowMatching::new(v.x_dims()).unwrap();
    let back = fm.encode(&x0, &mut v, &SampleOptions::default()).unwrap().x;
    assert_close(&back, &npy("mlp_encode_euler10.npy"), "encode");
}

#[test]
fn every_batch_size_gets_its_own_cached_plan() {
    let mut v = OnnxStep::load(path("mlp.onnx")).unwrap();
    let x0 = npy("mlp_x0.npy");
    let want = npy("mlp_euler10.npy");
    for b in [1, 2, 5] {
        let got = run(
            &mut v,
            &x0.narrow(0, 0, b).unwrap(),
            "euler",
            10,
            Schedule::Uniform,
            DType::F32,
        );
        assert_close(&got, &want.narrow(0, 0, b).unwrap(), &format!("batch {b}"));
    }
    assert_eq!(v.plans_built(), 3);
    run(&mut v, &x0, "rk4", 5, Schedule::Uniform, DType::F32);
    assert_eq!(v.plans_built(), 3, "a batch seen before reuses its plan");
}

#[test]
fn transformer_with_a_condition_matches_pytorch() {
    let ctx = npy("traj_ctx.npy");
    let mut v = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx)
        .unwrap();
    assert_eq!(v.x_dims().dims(), &[64, 2]);
    let names: Vec<&str> = v
        .condition_inputs()
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(names, ["ctx"]);
    let x0 = npy("traj_x0.npy");
    let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_euler10.npy"), "euler, one context per row");
    let got = run(&mut v, &x0, "rk4", 4, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_rk4_4.npy"), "rk4, one context per row");
    // Two rows with their two contexts.
    let mut v2 = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx.narrow(0, 0, 2).unwrap())
        .unwrap();
    let got = run(
        &mut v2,
        &x0.narrow(0, 0, 2).unwrap(),
        "euler",
        10,
        Schedule::Uniform,
        DType::F32,
    );
    let want = npy("traj_euler10.npy").narrow(0, 0, 2).unwrap();
    assert_close(&got, &want, "batch 2");
}

#[test]
fn one_condition_row_is_broadcast_to_every_sample() {
    let ctx0 = npy("traj_ctx.npy").narrow(0, 0, 1).unwrap();
    let mut v = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx0)
        .unwrap();
    let x0 = npy("traj_x0.npy");
    let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_euler10_ctx0.npy"), "broadcast context");
}

#[test]
fn guidance_runs_one_doubled_batch_against_the_null_condition() {
    let ctx = npy("traj_ctx.npy");
    let null = npy("traj_null.npy");
    let mut v = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx)
        .unwrap()
        .with_guidance(2.5, &[("ctx", &null)])
        .unwrap();
    let x0 = npy("traj_x0.npy");
    let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_guided_euler10.npy"), "guided, w = 2.5");
    assert_eq!(v.plans_built(), 1, "one plan, for the doubled batch");
    // w = 1 is the plain conditional field.
    let mut v1 = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx)
        .unwrap()
        .with_guidance(1.0, &[("ctx", &null)])
        .unwrap();
    let got = run(&mut v1, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_euler10.npy"), "guided, w = 1");
}

#[test]
fn a_fixed_batch_export_runs_at_its_batch_only() {
    let ctx = npy("traj_ctx.npy").narrow(0, 0, 2).unwrap();
    let mut v = OnnxStep::load(path("traj_fixed2.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx)
        .unwrap();
    assert_eq!(v.fixed_batch(), Some(2));
    let x0 = npy("traj_x0.npy");
    let got = run(
        &mut v,
        &x0.narrow(0, 0, 2).unwrap(),
        "euler",
        10,
        Schedule::Uniform,
        DType::F32,
    );
    let want = npy("traj_euler10.npy").narrow(0, 0, 2).unwrap();
    assert_close(&got, &want, "fixed batch 2");
    let fm = FlowMatching::new([64, 2]).unwrap();
    let err = fm
        .sample(3, &mut v, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap_err();
    assert!(matches!(
        err,
        Error::OnnxFixedBatch {
            fixed: 2,
            asked: 3,
            ..
        }
    ));
    assert!(err.to_string().contains("fixed batch of 2"), "{err}");
}

#[test]
fn a_symbolic_sample_dimension_needs_explicit_x_dims() {
    let err = OnnxStep::load(path("pointwise.onnx")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tokens") && msg.contains("x_dims"),
        "names the dimension and the fix: {msg}"
    );
    let mut v =
        OnnxStep::load_with_x_dims(path("pointwise.onnx"), Some(XDims::new([5, 2]).unwrap()))
            .unwrap();
    let got = run(
        &mut v,
        &npy("pointwise_x0.npy"),
        "euler",
        10,
        Schedule::Uniform,
        DType::F32,
    );
    assert_close(&got, &npy("pointwise_euler10.npy"), "x_dims [5, 2]");
    // Explicit x_dims that contradict a fixed declared dimension are refused.
    let err =
        OnnxStep::load_with_x_dims(path("mlp.onnx"), Some(XDims::new(4).unwrap())).unwrap_err();
    assert!(err.to_string().contains("x_dims"), "{err}");
}

#[test]
fn unsupported_operators_are_named_with_their_node() {
    let err = OnnxStep::load(path("bernoulli.onnx")).unwrap_err();
    match &err {
        Error::OnnxUnsupportedOp { op, node, .. } => {
            assert_eq!(op, "Bernoulli");
            assert_eq!(node, "dropout_mask");
        }
        other => panic!("expected OnnxUnsupportedOp, got {other}"),
    }
    assert!(err.to_string().contains("Bernoulli"));
}

#[test]
fn unreadable_truncated_and_foreign_files_are_errors() {
    let dir = std::env::temp_dir().join(format!("fm-onnx-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = OnnxStep::load(dir.join("missing.onnx")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let bytes = std::fs::read(path("traj.onnx")).unwrap();
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = OnnxStep::load(&cut).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    assert!(err.to_string().contains("cut.onnx"), "{err}");
    let text = dir.join("notes.onnx");
    std::fs::write(&text, "this is not a model\n").unwrap();
    let err = OnnxStep::load(&text).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let err = OnnxStep::load(&empty).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn condition_errors_name_the_input_and_the_shapes() {
    let fm = FlowMatching::new([64, 2]).unwrap();
    let opts = SampleOptions::seeded(0);
    // No value for ctx.
    let mut v = OnnxStep::load(path("traj.onnx")).unwrap();
    let err = fm.sample(2, &mut v, &Device::Cpu, &opts).unwrap_err();
    assert!(
        matches!(&err, Error::OnnxMissingInput { name, .. } if name == "ctx"),
        "{err}"
    );
    // A name the model does not have: the message lists the ones it has.
    let ctx = npy("traj_ctx.npy");
    let err = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("scene", &ctx)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("scene") && msg.contains("ctx [batch, 4, 8]"),
        "{msg}"
    );
    // A wrong trailing shape.
    let bad = Tensor::zeros((4, 4, 9), DType::F32, &Device::Cpu).unwrap();
    let err = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &bad)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("[batch, 4, 8]") && msg.contains("[4, 4, 9]"),
        "{msg}"
    );
    // Rows that are neither 1 nor the batch.
    let mut v = OnnxStep::load(path("traj.onnx"))
        .unwrap()
        .with_condition("ctx", &ctx.narrow(0, 0, 3).unwrap())
        .unwrap();
    let err = fm.sample(2, &mut v, &Device::Cpu, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("2 rows") && msg.contains("[3, 4, 8]"), "{msg}");
}

#[test]
fn a_non_finite_velocity_stops_at_the_first_step() {
    let mut v = OnnxStep::load(path("mlp.onnx")).unwrap();
    let x0 = Tensor::new(&[[f32::NAN, 0.0, 0.0]], &Device::Cpu).unwrap();
    let fm = FlowMatching::new(3).unwrap();
    for m in ["euler", "rk4"] {
        let opts = SampleOptions {
            x_init: Some(x0.clone()),
            method: Some(m.parse::<Method>().unwrap()),
            ..Default::default()
        };
        let err = fm.sample(1, &mut v, &Device::Cpu, &opts).unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { step: 1, .. }),
            "{m}: {err}"
        );
    }
}
