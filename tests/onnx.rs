//! ONNX step functions against the results PyTorch gets with the same networks
//! (tests/data/onnx/make_fixtures.py), across solvers, schedules, batches, conditions, guidance.
#![cfg(feature = "onnx")]

use candle_core::{DType, Device, Tensor};
use flow_matching::io::read_npy;
use flow_matching::onnx::{OnnxStep, OrtOptions, Runtime};
use flow_matching::{Diffusion, Error, FlowMatching, Method, SampleOptions, Schedule, XDims};

#[path = "support/onnx_proto.rs"]
mod onnx_proto;

const DIR: &str = "tests/data/onnx";

fn npy(name: &str) -> Tensor {
    read_npy(format!("{DIR}/{name}"), &Device::Cpu).expect(name)
}

fn path(name: &str) -> String {
    format!("{DIR}/{name}")
}

fn load(rt: &Runtime, name: &str) -> flow_matching::Result<OnnxStep> {
    OnnxStep::load_with_runtime(path(name), None, rt)
}

/// tract, and ONNX Runtime when the build has the feature `ort` and `ORT_DYLIB_PATH` names the
/// library (e.g. the onnxruntime wheel's capi/libonnxruntime.so.<version>).
fn runtimes() -> Vec<Runtime> {
    let mut v = vec![Runtime::Tract];
    match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        Some(lib) if cfg!(feature = "ort") => {
            v.push(Runtime::Ort(OrtOptions {
                library: Some(lib.clone().into()),
                ..Default::default()
            }));
            // Two spinning threads: Python's session settings in the bench.
            v.push(Runtime::Ort(OrtOptions {
                library: Some(lib.into()),
                threads: 2,
                spin: true,
            }));
        }
        _ if cfg!(feature = "ort") => {
            eprintln!("ort runtime skipped: set ORT_DYLIB_PATH to an ONNX Runtime library")
        }
        _ => {}
    }
    v
}

/// The same golden cases on every runtime the build and the environment have.
macro_rules! on_every_runtime {
    ($($name:ident),* $(,)?) => {
        mod every_runtime {
            $(
                #[test]
                fn $name() {
                    for rt in super::runtimes() {
                        eprintln!("runtime {rt}");
                        super::$name(&rt);
                    }
                }
            )*
        }
    };
}

on_every_runtime!(
    mlp_matches_pytorch_across_solvers,
    mlp_matches_pytorch_on_other_schedules_and_encode,
    every_batch_size_gets_its_own_cached_plan,
    transformer_with_a_condition_matches_pytorch,
    one_condition_row_is_broadcast_to_every_sample,
    guidance_runs_one_doubled_batch_against_the_null_condition,
    a_fixed_batch_export_runs_at_its_batch_only,
    a_symbolic_sample_dimension_needs_explicit_x_dims,
    unreadable_truncated_and_foreign_files_are_errors,
    condition_errors_name_the_input_and_the_shapes,
    a_non_finite_velocity_stops_at_the_first_step,
    a_new_context_of_the_same_shape_keeps_the_plans_and_matches_pytorch,
    noise_at_one_runs_the_network_at_one_minus_t_negated,
);

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

fn mlp_matches_pytorch_across_solvers(rt: &Runtime) {
    let mut v = load(rt, "mlp.onnx").unwrap();
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

fn mlp_matches_pytorch_on_other_schedules_and_encode(rt: &Runtime) {
    let mut v = load(rt, "mlp.onnx").unwrap();
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

fn every_batch_size_gets_its_own_cached_plan(rt: &Runtime) {
    let mut v = load(rt, "mlp.onnx").unwrap();
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

fn transformer_with_a_condition_matches_pytorch(rt: &Runtime) {
    let ctx = npy("traj_ctx.npy");
    let mut v = load(rt, "traj.onnx")
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
    let mut v2 = load(rt, "traj.onnx")
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

/// tract splits the waypoint transformer's rows over two threads (about 0.6 million
/// multiply-adds a row, 4 rows) and keeps the 2-D MLP on one; the results are PyTorch's either
/// way, guided (8 rows: the conditional and null halves) or not.
#[test]
fn tract_splits_rows_over_threads_only_where_the_work_pays_and_matches_pytorch() {
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    for threads in [1, 2] {
        pool(threads).install(|| {
            let ctx = npy("traj_ctx.npy");
            let x0 = npy("traj_x0.npy");
            let mut v = load(&Runtime::Tract, "traj.onnx")
                .unwrap()
                .with_condition("ctx", &ctx)
                .unwrap();
            let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
            assert_close(&got, &npy("traj_euler10.npy"), "euler");
            assert_eq!(v.plan_threads(4), Some(threads), "pool of {threads}");
            let mut g = load(&Runtime::Tract, "traj.onnx")
                .unwrap()
                .with_condition("ctx", &ctx)
                .unwrap()
                .with_guidance(2.5, &[("ctx", &npy("traj_null.npy"))])
                .unwrap();
            let got = run(&mut g, &x0, "euler", 10, Schedule::Uniform, DType::F32);
            assert_close(&got, &npy("traj_guided_euler10.npy"), "guided");
            assert_eq!(
                g.plan_threads(4),
                Some(threads),
                "guided, pool of {threads}"
            );
            let mut m = load(&Runtime::Tract, "mlp.onnx").unwrap();
            let x = npy("mlp_x0.npy");
            let got = run(&mut m, &x, "euler", 10, Schedule::Uniform, DType::F32);
            assert_close(&got, &npy("mlp_euler10.npy"), "mlp");
            assert_eq!(
                m.plan_threads(x.dim(0).unwrap()),
                Some(1),
                "mlp: too little work"
            );
        });
    }
}

fn one_condition_row_is_broadcast_to_every_sample(rt: &Runtime) {
    let ctx0 = npy("traj_ctx.npy").narrow(0, 0, 1).unwrap();
    let mut v = load(rt, "traj.onnx")
        .unwrap()
        .with_condition("ctx", &ctx0)
        .unwrap();
    let x0 = npy("traj_x0.npy");
    let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_euler10_ctx0.npy"), "broadcast context");
}

fn guidance_runs_one_doubled_batch_against_the_null_condition(rt: &Runtime) {
    let ctx = npy("traj_ctx.npy");
    let null = npy("traj_null.npy");
    let mut v = load(rt, "traj.onnx")
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
    let mut v1 = load(rt, "traj.onnx")
        .unwrap()
        .with_condition("ctx", &ctx)
        .unwrap()
        .with_guidance(1.0, &[("ctx", &null)])
        .unwrap();
    let got = run(&mut v1, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_euler10.npy"), "guided, w = 1");
}

fn a_fixed_batch_export_runs_at_its_batch_only(rt: &Runtime) {
    let ctx = npy("traj_ctx.npy").narrow(0, 0, 2).unwrap();
    let mut v = load(rt, "traj_fixed2.onnx")
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

fn a_symbolic_sample_dimension_needs_explicit_x_dims(rt: &Runtime) {
    let err = load(rt, "pointwise.onnx").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tokens") && msg.contains("x_dims"),
        "names the dimension and the fix: {msg}"
    );
    let mut v = OnnxStep::load_with_runtime(
        path("pointwise.onnx"),
        Some(XDims::new([5, 2]).unwrap()),
        rt,
    )
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
    let err = OnnxStep::load_with_runtime(path("mlp.onnx"), Some(XDims::new(4).unwrap()), rt)
        .unwrap_err();
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

fn unreadable_truncated_and_foreign_files_are_errors(rt: &Runtime) {
    let dir = std::env::temp_dir().join(format!("fm-onnx-test-{rt}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = OnnxStep::load_with_runtime(dir.join("missing.onnx"), None, rt).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let bytes = std::fs::read(path("traj.onnx")).unwrap();
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = OnnxStep::load_with_runtime(&cut, None, rt).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    assert!(err.to_string().contains("cut.onnx"), "{err}");
    let text = dir.join("notes.onnx");
    std::fs::write(&text, "this is not a model\n").unwrap();
    let err = OnnxStep::load_with_runtime(&text, None, rt).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let err = OnnxStep::load_with_runtime(&empty, None, rt).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn condition_errors_name_the_input_and_the_shapes(rt: &Runtime) {
    let fm = FlowMatching::new([64, 2]).unwrap();
    let opts = SampleOptions::seeded(0);
    // No value for ctx.
    let mut v = load(rt, "traj.onnx").unwrap();
    let err = fm.sample(2, &mut v, &Device::Cpu, &opts).unwrap_err();
    assert!(
        matches!(&err, Error::OnnxMissingInput { name, .. } if name == "ctx"),
        "{err}"
    );
    // A name the model does not have: the message lists the ones it has.
    let ctx = npy("traj_ctx.npy");
    let err = load(rt, "traj.onnx")
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
    let err = load(rt, "traj.onnx")
        .unwrap()
        .with_condition("ctx", &bad)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("[batch, 4, 8]") && msg.contains("[4, 4, 9]"),
        "{msg}"
    );
    // Rows that are neither 1 nor the batch.
    let mut v = load(rt, "traj.onnx")
        .unwrap()
        .with_condition("ctx", &ctx.narrow(0, 0, 3).unwrap())
        .unwrap();
    let err = fm.sample(2, &mut v, &Device::Cpu, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("2 rows") && msg.contains("[3, 4, 8]"), "{msg}");
}

fn a_non_finite_velocity_stops_at_the_first_step(rt: &Runtime) {
    let mut v = load(rt, "mlp.onnx").unwrap();
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

#[cfg(not(feature = "ort"))]
#[test]
fn the_ort_runtime_needs_the_ort_feature() {
    let err = load(&Runtime::Ort(OrtOptions::default()), "mlp.onnx").unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::InvalidArgument { .. })
            && msg.contains("ort")
            && msg.contains("feature"),
        "{msg}"
    );
}

#[cfg(feature = "ort")]
#[test]
fn a_missing_or_foreign_ort_library_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("fm-ort-lib-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("libonnxruntime.so.1.99.0");
    let rt = Runtime::Ort(OrtOptions {
        library: Some(missing.clone()),
        ..Default::default()
    });
    let err = load(&rt, "mlp.onnx").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::OnnxRuntimeLibrary { .. }), "{msg}");
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains("--ort-lib"),
        "names the path and the fix: {msg}"
    );
    // A file that is not a shared library: refused by the loader (or, when another test of
    // this process loaded the real library first, refused as a second library).
    let text = dir.join("libonnxruntime.so.1.20.0");
    std::fs::write(&text, "not a library\n").unwrap();
    let rt = Runtime::Ort(OrtOptions {
        library: Some(text.clone()),
        ..Default::default()
    });
    let err = load(&rt, "mlp.onnx").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::OnnxRuntimeLibrary { .. }), "{msg}");
    assert!(msg.contains(&text.display().to_string()), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A control loop's contexts: each new value of the same shape replaces the one before without
/// a new plan after the first replacement (which turns the conditions into plan inputs), and
/// every call still samples what PyTorch samples with that context, guided or not.
fn a_new_context_of_the_same_shape_keeps_the_plans_and_matches_pytorch(rt: &Runtime) {
    let ctx = npy("traj_ctx.npy");
    let null = npy("traj_null.npy");
    let other = (&ctx * -0.5).unwrap();
    let zero = (&ctx * 0.0).unwrap();
    let x0 = npy("traj_x0.npy");
    let want = npy("traj_euler10.npy");
    let tract = matches!(rt, Runtime::Tract);
    let mut v = load(rt, "traj.onnx").unwrap();
    assert!(!v.live_conditions());
    for (round, value) in [&zero, &other, &ctx, &zero, &ctx].into_iter().enumerate() {
        v.set_condition("ctx", value).unwrap();
        let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
        if std::ptr::eq(value, &ctx) {
            assert_close(&got, &want, &format!("context {round}"));
        }
        if tract {
            // The first value's plan, then one live plan for every later value.
            assert_eq!(
                v.plans_optimised(),
                (round + 1).min(2),
                "after context {round}"
            );
        }
    }
    assert!(v.live_conditions());
    // Guided: the null half is fed too; a new condition keeps the doubled batch's plan.
    let mut g = load(rt, "traj.onnx")
        .unwrap()
        .with_live_conditions(true)
        .with_condition("ctx", &other)
        .unwrap()
        .with_guidance(2.5, &[("ctx", &null)])
        .unwrap();
    run(&mut g, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    g.set_condition("ctx", &ctx).unwrap();
    let got = run(&mut g, &x0, "euler", 10, Schedule::Uniform, DType::F32);
    assert_close(&got, &npy("traj_guided_euler10.npy"), "guided, new context");
    if tract {
        assert_eq!(g.plans_optimised(), 1, "guided: one plan for both contexts");
    }
    // A context of another shape (2 rows) needs its own plan, and is still right.
    v.set_condition("ctx", &ctx.narrow(0, 0, 2).unwrap())
        .unwrap();
    let got = run(
        &mut v,
        &x0.narrow(0, 0, 2).unwrap(),
        "euler",
        10,
        Schedule::Uniform,
        DType::F32,
    );
    assert_close(&got, &want.narrow(0, 0, 2).unwrap(), "2 rows");
    if tract {
        assert_eq!(v.plans_optimised(), 3, "a new shape, a new plan");
    }
}

/// The same with the rows split over two threads: each thread's plan gets its rows of every
/// new context.
#[test]
fn live_contexts_reach_every_threads_rows() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(|| {
            let ctx = npy("traj_ctx.npy");
            let x0 = npy("traj_x0.npy");
            let mut v = load(&Runtime::Tract, "traj.onnx")
                .unwrap()
                .with_live_conditions(true)
                .with_condition("ctx", &(&ctx * 0.0).unwrap())
                .unwrap();
            run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
            assert_eq!(v.plan_threads(4), Some(2));
            v.set_condition("ctx", &ctx).unwrap();
            let got = run(&mut v, &x0, "euler", 10, Schedule::Uniform, DType::F32);
            assert_close(&got, &npy("traj_euler10.npy"), "two threads, new context");
            assert_eq!(v.plans_optimised(), 1);
        });
}

/// A network trained with noise at t = 1 (openpi, LeRobot) is evaluated at 1 - t and its
/// velocity negated; sampled, that is Euler from t = 1 down to 0 on the network itself.
fn noise_at_one_runs_the_network_at_one_minus_t_negated(rt: &Runtime) {
    use flow_matching::convention::TimeConvention;
    let x0 = npy("mlp_x0.npy");
    let b = x0.dim(0).unwrap();
    let mut plain = load(rt, "mlp.onnx").unwrap();
    assert_eq!(plain.time_convention(), TimeConvention::NoiseAt0);
    let mut flipped = load(rt, "mlp.onnx")
        .unwrap()
        .with_time_convention(TimeConvention::NoiseAt1);
    let x: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let (mut a, mut w) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    flipped.velocity(&x, &[0.25], &mut a).unwrap();
    plain.velocity(&x, &[0.75], &mut w).unwrap();
    let neg: Vec<f32> = w.iter().map(|v| -v).collect();
    assert_eq!(a, neg, "v'(x, 0.25) = -v(x, 0.75)");
    // Euler, 10 steps, written out in openpi's convention: x <- x - dt v(x, 1 - i dt).
    let got = run(
        &mut flipped,
        &x0,
        "euler",
        10,
        Schedule::Uniform,
        DType::F32,
    );
    let mut want = x.clone();
    let dt = 0.1f32;
    for i in 0..10 {
        let s = i as f32 / 10.0;
        plain.velocity(&want, &[1.0 - s], &mut w).unwrap();
        for (xi, vi) in want.iter_mut().zip(&w) {
            *xi -= dt * vi;
        }
    }
    let want = Tensor::from_vec(want, x0.dims(), &Device::Cpu).unwrap();
    assert_close(&got, &want, "noise at 1, Euler 10");
    assert_eq!(got.dim(0).unwrap(), b);
}

/// The file's metadata `time_convention` sets the convention; an unknown one is refused with
/// the known ones listed.
#[test]
fn the_time_convention_comes_from_the_files_metadata() {
    use flow_matching::convention::TimeConvention;
    let dir = std::env::temp_dir().join(format!("fm-onnx-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, value: &str| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            onnx_proto::identity_with_metadata("time_convention", value),
        )
        .unwrap();
        p
    };
    let mut v = OnnxStep::load(write("n1.onnx", "noise_at_1")).unwrap();
    assert_eq!(v.time_convention(), TimeConvention::NoiseAt1);
    let mut out = [0f32; 4];
    v.velocity(&[1.0, 2.0, 3.0, 4.0], &[0.5], &mut out).unwrap();
    assert_eq!(
        out,
        [-1.0, -2.0, -3.0, -4.0],
        "v = -x for the identity network"
    );
    let v0 = OnnxStep::load(write("n0.onnx", "noise_at_0")).unwrap();
    assert_eq!(v0.time_convention(), TimeConvention::NoiseAt0);
    let err = OnnxStep::load(write("bad.onnx", "noise_at_2"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.onnx")
            && err.contains("\"noise_at_2\"")
            && err.contains("noise_at_0, noise_at_1"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
