//! The fast CPU path (fused kernels) against the generic candle path and the golden files.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_matching::guidance::Guided;
use flow_matching::io::read_npy;
use flow_matching::kernel::{threads_for_batch, MIN_ROWS_PER_THREAD};
use flow_matching::model::loss_and_grads;
use flow_matching::{
    AdaptiveOptions, Diffusion, FlowMatching, Method, Result, SampleOptions, Schedule, StepFn,
    VelocityMlp, VelocityMlpConfig, XDims,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Hides the model's fast path, so `FlowMatching::sample` takes the generic tensor path.
struct Generic<'a>(&'a mut dyn StepFn);

impl StepFn for Generic<'_> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.0.step(x, t)
    }
    fn step_at(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.0.step_at(x, t)
    }
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= abs + rel * w.abs(),
            "{what}[{i}]: got {g}, expected {w}"
        );
    }
}

fn golden_case(name: &str) {
    let dir = Path::new("tests/data/golden").join(name);
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let dev = Device::Cpu;
    let mut model = VelocityMlp::load(dir.join("model.safetensors"), &dev).unwrap();
    let x_init = read_npy(dir.join("x_init.npy"), &dev).unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let x_dims: Vec<usize> = case["x_dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let fm = FlowMatching::new(x_dims).unwrap();
    let opts = SampleOptions {
        return_all_steps: true,
        steps: Some(steps),
        x_init: Some(x_init.clone()),
        ..Default::default()
    };
    let b = x_init.dim(0).unwrap();
    let labels: Option<Vec<u32>> = case.get("labels").map(|l| {
        l.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    });
    let (fast, generic) = match &labels {
        Some(l) => {
            let mut c = model.with_labels(l).unwrap();
            assert!(c.fast_velocity().is_some(), "{name}: no fast path");
            let fast = fm.sample(b, &mut c, &dev, &opts).unwrap();
            let generic = fm.sample(b, &mut Generic(&mut c), &dev, &opts).unwrap();
            (fast, generic)
        }
        None => {
            assert!(model.fast_velocity().is_some(), "{name}: no fast path");
            let fast = fm.sample(b, &mut model, &dev, &opts).unwrap();
            let generic = fm.sample(b, &mut Generic(&mut model), &dev, &opts).unwrap();
            (fast, generic)
        }
    };
    let traj = read_npy(dir.join("expected_traj.npy"), &dev).unwrap();
    let final_ = read_npy(dir.join("expected_final.npy"), &dev).unwrap();
    let times = read_npy(dir.join("expected_times.npy"), &dev).unwrap();
    for (which, s) in [("fast", &fast), ("generic", &generic)] {
        assert_eq!(s.x.dims(), final_.dims(), "{name} {which}");
        assert_eq!(s.nfe, steps);
        assert_eq!(s.accepted_steps, steps);
        let t = s.trajectory.as_ref().unwrap();
        assert_eq!(t.dims(), traj.dims(), "{name} {which}");
        assert_close(
            &format!("{name} {which} final"),
            &vec(&s.x),
            &vec(&final_),
            1e-5,
            1e-4,
        );
        assert_close(
            &format!("{name} {which} traj"),
            &vec(t),
            &vec(&traj),
            1e-5,
            1e-4,
        );
        let tm = s.times.as_ref().unwrap();
        assert_close(
            &format!("{name} {which} times"),
            &vec(tm),
            &vec(&times),
            1e-7,
            0.0,
        );
    }
    // The two paths agree more tightly than either agrees with PyTorch.
    assert_close(
        &format!("{name} fast vs generic"),
        &vec(&fast.trajectory.unwrap()),
        &vec(&generic.trajectory.unwrap()),
        2e-6,
        2e-5,
    );
}

#[test]
fn fast_sampling_matches_golden_mlp_2d() {
    golden_case("mlp-2d");
}

#[test]
fn fast_sampling_matches_golden_mlp_traj() {
    golden_case("mlp-traj");
}

#[test]
fn fast_sampling_matches_golden_conditional() {
    golden_case("mlp-cond");
}

fn small_config(num_classes: usize, x_dims: usize) -> VelocityMlpConfig {
    VelocityMlpConfig {
        hidden: 32,
        depth: 3,
        num_classes,
        num_freqs: 4,
        cond_dim: 5,
        ..VelocityMlpConfig::new(XDims::new(x_dims).unwrap())
    }
}

#[test]
fn fast_sampling_matches_generic_above_the_thread_threshold() {
    // Enough rows for several threads and a wide input (the first layer through gemm).
    let dev = Device::Cpu;
    let mut model = VelocityMlp::init(small_config(0, 12), &VarMap::new(), &dev, 3)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(12).unwrap();
    let b = 2 * MIN_ROWS_PER_THREAD + 7;
    let opts = SampleOptions::seeded(11);
    let fast = fm.sample(b, &mut model, &dev, &opts).unwrap();
    let generic = fm.sample(b, &mut Generic(&mut model), &dev, &opts).unwrap();
    assert!(fast.trajectory.is_none());
    assert_close("wide", &vec(&fast.x), &vec(&generic.x), 1e-5, 1e-4);
}

#[test]
fn conditional_fast_path_with_null_labels_matches_generic() {
    let dev = Device::Cpu;
    let model = VelocityMlp::init(small_config(3, 2), &VarMap::new(), &dev, 5)
        .unwrap()
        .detach();
    let labels: Vec<u32> = (0..300).map(|i| (i % 4) as u32).collect();
    let fm = FlowMatching::new(2).unwrap();
    let opts = SampleOptions::seeded(2);
    let mut c = model.with_labels(&labels).unwrap();
    let fast = fm.sample(300, &mut c, &dev, &opts).unwrap();
    let generic = fm.sample(300, &mut Generic(&mut c), &dev, &opts).unwrap();
    assert_close("cond", &vec(&fast.x), &vec(&generic.x), 1e-5, 1e-4);
}

#[test]
fn fast_path_reports_non_finite_states_like_the_generic_path() {
    let dev = Device::Cpu;
    let mut model = VelocityMlp::init(small_config(0, 2), &VarMap::new(), &dev, 1)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    let mut opts = SampleOptions::seeded(0);
    opts.x_init = Some(Tensor::new(&[[f32::NAN, 0.5], [1.0, 2.0]], &dev).unwrap());
    let fast = fm
        .sample(2, &mut model, &dev, &opts)
        .unwrap_err()
        .to_string();
    let generic = fm
        .sample(2, &mut Generic(&mut model), &dev, &opts)
        .unwrap_err()
        .to_string();
    assert_eq!(fast, generic);
    assert!(fast.contains("after step 1 (t = 0.100000)"), "{fast}");
}

#[test]
fn other_dtypes_and_methods_still_take_the_generic_path() {
    let dev = Device::Cpu;
    let mut model = VelocityMlp::init(small_config(0, 2), &VarMap::new(), &dev, 1)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    let f32_run = fm
        .sample(4, &mut model, &dev, &SampleOptions::seeded(4))
        .unwrap();
    let f64_opts = SampleOptions {
        dtype: DType::F64,
        ..SampleOptions::seeded(4)
    };
    let f64_run = fm.sample(4, &mut model, &dev, &f64_opts).unwrap();
    assert_eq!(f64_run.x.dtype(), DType::F64);
    let as32 = vec(&f64_run.x.to_dtype(DType::F32).unwrap());
    assert_close("f64", &vec(&f32_run.x), &as32, 1e-5, 1e-4);
    let rk4 = fm.clone().with_method("rk4").unwrap();
    let r = rk4
        .sample(4, &mut model, &dev, &SampleOptions::seeded(4))
        .unwrap();
    assert_eq!(r.nfe, 40);
}

#[test]
fn thread_policy_is_one_thread_for_small_batches() {
    assert_eq!(threads_for_batch(1, 2), 1);
    assert_eq!(threads_for_batch(16, 2), 1);
    assert_eq!(threads_for_batch(2 * MIN_ROWS_PER_THREAD - 1, 2), 1);
    // Measured: 64 rows already run faster on two threads than on one.
    assert_eq!(threads_for_batch(64, 2), 2);
    assert_eq!(threads_for_batch(4096, 2), 2);
}

/// Loss and gradients by candle autograd on a VarMap-built model.
fn autograd(
    varmap: &VarMap,
    model: &VelocityMlp,
    x: &Tensor,
    t: &Tensor,
    labels: Option<&Tensor>,
    target: &Tensor,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let v = model.forward(x, t, labels).unwrap();
    let loss = (v - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut out = Vec::new();
    for (k, var) in data.iter() {
        out.push((k.clone(), vec(grads.get(var.as_tensor()).unwrap())));
    }
    (loss.to_scalar::<f32>().unwrap(), out)
}

fn check_training(num_classes: usize, batch: usize, seed: u64) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = VelocityMlp::init(small_config(num_classes, 2), &varmap, &dev, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let x = flow_matching::flow_matching::randn(&mut rng, &[batch, 2], DType::F32, &dev).unwrap();
    let target =
        flow_matching::flow_matching::randn(&mut rng, &[batch, 2], DType::F32, &dev).unwrap();
    let tv: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
    let t = Tensor::from_vec(tv, batch, &dev).unwrap();
    let labels = (num_classes > 0).then(|| {
        let l: Vec<u32> = (0..batch).map(|i| (i % (num_classes + 1)) as u32).collect();
        Tensor::from_vec(l, batch, &dev).unwrap()
    });
    let (loss, grads) = loss_and_grads(&model, &x, &t, labels.as_ref(), &target).unwrap();
    let (want_loss, want) = autograd(&varmap, &model, &x, &t, labels.as_ref(), &target);
    assert!(
        (loss - want_loss).abs() <= 1e-6 + 1e-5 * want_loss.abs(),
        "{loss} vs {want_loss}"
    );
    assert_eq!(grads.len(), want.len());
    for (k, g) in &grads {
        let w = &want.iter().find(|(n, _)| n == k).unwrap().1;
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close(&format!("grad {k}"), &vec(g), w, 1e-6 + 1e-4 * scale, 1e-4);
    }
}

#[test]
fn training_step_matches_autograd_unconditional() {
    check_training(0, 37, 7);
}

#[test]
fn training_step_matches_autograd_conditional_across_threads() {
    check_training(3, 2 * MIN_ROWS_PER_THREAD + 5, 8);
}

#[test]
fn training_loss_matches_golden_mlp_2d() {
    let dir = Path::new("tests/data/golden/mlp-2d");
    let dev = Device::Cpu;
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let model = VelocityMlp::load(dir.join("model.safetensors"), &dev).unwrap();
    let noisy = read_npy(dir.join("expected_noisy_x.npy"), &dev).unwrap();
    let t = read_npy(dir.join("train_t.npy"), &dev).unwrap();
    let target = read_npy(dir.join("expected_target.npy"), &dev).unwrap();
    let (loss, grads) = loss_and_grads(&model, &noisy, &t, None, &target).unwrap();
    let want = case["expected_loss"].as_f64().unwrap() as f32;
    assert!(
        (loss - want).abs() <= 1e-5 + 1e-4 * want,
        "{loss} vs {want}"
    );
    assert_eq!(grads[0].0, "net.0.weight");
}

#[test]
fn non_finite_rows_in_a_second_thread_block_are_reported_at_their_step() {
    let dev = Device::Cpu;
    let mut model = VelocityMlp::init(small_config(0, 2), &VarMap::new(), &dev, 1)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    let b = 4 * MIN_ROWS_PER_THREAD;
    let mut x: Vec<f32> = (0..b * 2).map(|i| (i as f32 * 0.01).sin()).collect();
    x[2 * (b - 3)] = f32::INFINITY;
    let mut opts = SampleOptions::seeded(0);
    opts.x_init = Some(Tensor::from_vec(x, (b, 2), &dev).unwrap());
    let fast = fm
        .sample(b, &mut model, &dev, &opts)
        .unwrap_err()
        .to_string();
    let generic = fm
        .sample(b, &mut Generic(&mut model), &dev, &opts)
        .unwrap_err()
        .to_string();
    assert_eq!(fast, generic);
    assert!(fast.contains("after step 1 "), "{fast}");
}

/// `v(x, t) = a(t) sin(x) + b(t)`, `a` and `b` computed from `t` rounded to f32: its tensor
/// form and its slice form produce the same bits, so any difference between the two sampling
/// paths is the solvers' own.
struct Twin;

fn twin_coefs(t: f32) -> (f32, f32) {
    (-(1.0 + 3.0 * t * t), 0.5 - t)
}

struct TwinFast;

impl flow_matching::FastVelocity for TwinFast {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        let (a, b) = twin_coefs(t);
        for (o, xi) in out.iter_mut().zip(x) {
            *o = xi.sin() * a + b;
        }
        Ok(())
    }
}

impl StepFn for Twin {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        self.step_at(x, t)
    }
    fn step_at(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let (a, b) = twin_coefs(t as f32);
        Ok(x.sin()?.affine(a as f64, b as f64)?)
    }
    fn fast_velocity(&mut self) -> Option<Box<dyn flow_matching::FastVelocity + '_>> {
        Some(Box::new(TwinFast))
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    vec(t).iter().map(|v| v.to_bits()).collect()
}

fn methods() -> Vec<(String, Method)> {
    let loose = AdaptiveOptions {
        rtol: 1e-3,
        atol: 1e-4,
        ..AdaptiveOptions::default()
    };
    let capped = AdaptiveOptions {
        max_steps: 3,
        return_on_max_steps: true,
        ..AdaptiveOptions::default()
    };
    let mut v: Vec<(String, Method)> = ["euler", "midpoint", "heun", "rk4", "dopri5"]
        .iter()
        .map(|m| (m.to_string(), m.parse().unwrap()))
        .collect();
    v.push(("dopri5 loose".into(), Method::Dopri5(loose)));
    v.push(("dopri5 capped".into(), Method::Dopri5(capped)));
    v
}

fn same_sample(what: &str, fast: &flow_matching::Sample, generic: &flow_matching::Sample) {
    assert_eq!(bits(&fast.x), bits(&generic.x), "{what}: final states");
    assert_eq!(fast.nfe, generic.nfe, "{what}: nfe");
    assert_eq!(
        fast.accepted_steps, generic.accepted_steps,
        "{what}: accepted"
    );
    assert_eq!(
        fast.rejected_steps, generic.rejected_steps,
        "{what}: rejected"
    );
    assert_eq!(fast.reached_end, generic.reached_end, "{what}: reached_end");
    match (&fast.trajectory, &generic.trajectory) {
        (Some(a), Some(b)) => {
            assert_eq!(a.dims(), b.dims(), "{what}: trajectory shape");
            assert_eq!(bits(a), bits(b), "{what}: trajectory");
        }
        (None, None) => {}
        _ => panic!("{what}: one path recorded a trajectory, the other did not"),
    }
    match (&fast.times, &generic.times) {
        (Some(a), Some(b)) => assert_eq!(bits(a), bits(b), "{what}: times"),
        (None, None) => {}
        _ => panic!("{what}: one path returned times, the other did not"),
    }
}

#[test]
fn every_method_schedule_and_direction_is_bit_equal_on_both_paths() {
    let dev = Device::Cpu;
    let fm = FlowMatching::new(3).unwrap();
    let schedules = [
        Schedule::Uniform,
        Schedule::Shift(3.0),
        Schedule::Cosine,
        Schedule::Custom(vec![0.0, 0.1, 0.45, 0.7, 1.0]),
    ];
    let mut adaptive_rejected = 0;
    for (name, method) in methods() {
        for schedule in &schedules {
            for record in [false, true] {
                let opts = SampleOptions {
                    method: Some(method.clone()),
                    schedule: Some(schedule.clone()),
                    steps: Some(4),
                    return_all_steps: record,
                    ..SampleOptions::seeded(7)
                };
                let what = format!("{name} {schedule:?} record {record}");
                let fast = fm.sample(5, &mut Twin, &dev, &opts).unwrap();
                let generic = fm.sample(5, &mut Generic(&mut Twin), &dev, &opts).unwrap();
                same_sample(&what, &fast, &generic);
                adaptive_rejected += fast.rejected_steps;
                // Encoding runs the grid backwards from the sample.
                let fast_back = fm.encode(&fast.x, &mut Twin, &opts).unwrap();
                let generic_back = fm.encode(&fast.x, &mut Generic(&mut Twin), &opts).unwrap();
                same_sample(&format!("{what} encode"), &fast_back, &generic_back);
            }
        }
    }
    // The comparison covered the rejection branch as well.
    assert!(adaptive_rejected > 0);
}

#[test]
fn euler_on_the_step_loop_is_bit_equal_to_the_whole_run_kernel() {
    // Recording takes the generic driver; without recording the model's whole-run Euler
    // runs. Both must give the same final state.
    let dev = Device::Cpu;
    let mut model = VelocityMlp::init(small_config(0, 2), &VarMap::new(), &dev, 9)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    for b in [1, 3, 2 * MIN_ROWS_PER_THREAD + 5] {
        let plain = fm
            .sample(b, &mut model, &dev, &SampleOptions::seeded(3))
            .unwrap();
        let rec = SampleOptions {
            return_all_steps: true,
            ..SampleOptions::seeded(3)
        };
        let recorded = fm.sample(b, &mut model, &dev, &rec).unwrap();
        assert_eq!(bits(&plain.x), bits(&recorded.x), "batch {b}");
    }
}

#[test]
fn non_finite_states_error_alike_for_every_method() {
    let dev = Device::Cpu;
    let fm = FlowMatching::new(3).unwrap();
    for (name, method) in methods() {
        let opts = SampleOptions {
            method: Some(method),
            x_init: Some(Tensor::new(&[[f32::NAN, 0.5, 1.0], [1.0, 2.0, 3.0]], &dev).unwrap()),
            ..Default::default()
        };
        let fast = fm.sample(2, &mut Twin, &dev, &opts);
        let generic = fm.sample(2, &mut Generic(&mut Twin), &dev, &opts);
        match (fast, generic) {
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{name}"),
            // The capped adaptive run stops at its cap after rejecting every step.
            (Ok(a), Ok(b)) => {
                assert!(!a.reached_end && !b.reached_end, "{name}");
                assert_eq!(a.rejected_steps, b.rejected_steps, "{name}");
            }
            (a, b) => panic!("{name}: fast {a:?}, generic {b:?}"),
        }
    }
}

#[test]
fn model_fast_path_matches_generic_for_every_method_and_encode() {
    // The fused kernels round differently from candle's matmuls (FMA, summation order), so
    // the model's two paths agree to a tolerance, not to the bit: ~1e-6 relative per
    // evaluation, grown over the steps.
    let dev = Device::Cpu;
    let mut model = VelocityMlp::init(small_config(0, 2), &VarMap::new(), &dev, 4)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    for b in [1, 2 * MIN_ROWS_PER_THREAD + 3] {
        for (name, method) in methods() {
            let adaptive = method.is_adaptive();
            let opts = SampleOptions {
                method: Some(method),
                steps: Some(6),
                return_all_steps: !adaptive,
                ..SampleOptions::seeded(5)
            };
            let what = format!("{name} batch {b}");
            let fast = fm.sample(b, &mut model, &dev, &opts).unwrap();
            let generic = fm.sample(b, &mut Generic(&mut model), &dev, &opts).unwrap();
            // Where the velocities differ in the last bit, an adaptive run may accept or
            // reject a step differently and end on another step sequence: the two end states
            // then differ by the method's global error (~2e-4 here, a backward run ~1e-3),
            // not by rounding. With equal velocities the paths are bit-equal (see above).
            let tol = if adaptive { 3e-3 } else { 2e-6 };
            assert_close(&what, &vec(&fast.x), &vec(&generic.x), tol, 10.0 * tol);
            if !adaptive {
                assert_eq!(fast.nfe, generic.nfe, "{what}: nfe");
            }
            if let (Some(a), Some(g)) = (&fast.trajectory, &generic.trajectory) {
                assert_close(&what, &vec(a), &vec(g), tol, 10.0 * tol);
            }
            let back = fm.encode(&fast.x, &mut model, &opts).unwrap();
            let back_g = fm.encode(&fast.x, &mut Generic(&mut model), &opts).unwrap();
            assert_close(
                &format!("{what} encode"),
                &vec(&back.x),
                &vec(&back_g.x),
                tol,
                10.0 * tol,
            );
        }
    }
}

#[test]
fn guided_fast_path_matches_generic() {
    let dev = Device::Cpu;
    let model = VelocityMlp::init(small_config(3, 2), &VarMap::new(), &dev, 6)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    for b in [1, 2 * MIN_ROWS_PER_THREAD + 1] {
        let labels: Vec<u32> = (0..b).map(|i| (i % 4) as u32).collect();
        for weight in [2.0, 0.0, 1.0, -0.5] {
            for method in ["euler", "rk4"] {
                let mut g = Guided::new(&model, &labels, weight).unwrap();
                assert!(g.fast_velocity().is_some());
                let opts = SampleOptions {
                    method: Some(method.parse().unwrap()),
                    return_all_steps: true,
                    ..SampleOptions::seeded(8)
                };
                let fast = fm.sample(b, &mut g, &dev, &opts).unwrap();
                let generic = fm.sample(b, &mut Generic(&mut g), &dev, &opts).unwrap();
                let what = format!("guided w {weight} {method} batch {b}");
                assert_close(&what, &vec(&fast.x), &vec(&generic.x), 5e-6, 5e-5);
                assert_close(
                    &what,
                    &vec(fast.trajectory.as_ref().unwrap()),
                    &vec(generic.trajectory.as_ref().unwrap()),
                    5e-6,
                    5e-5,
                );
            }
        }
    }
    // A batch that does not match the labels is an error on the fast path too.
    let mut g = Guided::new(&model, &[0, 1], 2.0).unwrap();
    let err = fm
        .sample(3, &mut g, &dev, &SampleOptions::seeded(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("one per label"), "{err}");
}
