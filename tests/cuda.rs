//! The library on a CUDA GPU (built only with `--features cuda`): sampling matches the
//! PyTorch golden cases and the CPU, guidance and training run there and agree with the CPU.
//! Every test skips, with a line on stderr, when no GPU answers at run time.
#![cfg(feature = "cuda")]

#[path = "support/golden.rs"]
mod golden_support;

use candle_core::{DType, Device, Tensor, Var};
use flow_matching::train::{TrainConfig, Trainer};
use flow_matching::{
    Diffusion, FlowMatching, SampleOptions, StepFn, TimestepSampler, VelocityMlp,
    VelocityMlpConfig, XDims,
};
use golden_support::{assert_close, cases, golden_dir, Case};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// GPU 0, or `None` (after saying so) where this machine has none.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA GPU 0 ({e})");
            None
        }
    }
}

/// What the GPU tests accept: device bugs show as O(1) errors; cuBLAS sums in another order
/// than the CPU's kernels, a few float32 ulps a layer, so the golden cases' own tolerance
/// (1e-5 + 1e-4 |expected|) is reported, not required.
const TOL: (f32, f32) = (1e-4, 1e-3);

/// Whether `got` is within the golden cases' own tolerance of `expected`.
fn within_case_tol(got: &Tensor, expected: &Tensor, (abs, rel): (f32, f32)) -> bool {
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    g.iter()
        .zip(&e)
        .all(|(a, b)| (a - b).abs() <= abs + rel * b.abs())
}

/// The largest |a - b| over two tensors of one shape (any devices).
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The golden case's Euler sample on `dev`, every state returned.
fn golden_sample(case: &Case, dev: &Device) -> flow_matching::Sample {
    let fm = FlowMatching::new(case.x_dims()).unwrap();
    let opts = SampleOptions {
        return_all_steps: true,
        steps: Some(case.usize("steps")),
        method: Some(case.json["method"].as_str().unwrap().parse().unwrap()),
        x_init: Some(case.npy("x_init.npy").to_device(dev).unwrap()),
        ..Default::default()
    };
    let batch = case.usize("batch");
    if case.json["model"].as_str().unwrap() == "analytic:neg_x_plus_t" {
        let mut f = |x: &Tensor, t: &Tensor| x.neg()?.broadcast_add(t);
        return fm.sample(batch, &mut f, dev, &opts).unwrap();
    }
    let model = VelocityMlp::load(case.dir.join("model.safetensors"), dev).unwrap();
    let mut f: Box<dyn StepFn + '_> = match case.labels() {
        Some(l) => Box::new(model.with_labels(&l).unwrap()),
        None => Box::new(model.clone()),
    };
    fm.sample(batch, f.as_mut(), dev, &opts).unwrap()
}

#[test]
fn golden_cases_match_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    for dir in cases() {
        let case = Case::load(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let out = golden_sample(&case, &dev);
        assert!(out.x.device().is_cuda(), "{name}: the sample left the GPU");
        let expected = case.npy("expected_final.npy");
        let traj = case.npy("expected_traj.npy");
        eprintln!(
            "{name}: GPU final vs PyTorch max |diff| {:.3e}, CPU path vs GPU {:.3e}; \
             trajectory within the case's tolerance: {}",
            max_diff(&out.x, &expected),
            max_diff(&out.x, &golden_sample(&case, &Device::Cpu).x),
            within_case_tol(out.trajectory.as_ref().unwrap(), &traj, case.tol())
        );
        assert_close(&format!("{name} final"), &out.x, &expected, TOL);
        assert_close(
            &format!("{name} trajectory"),
            out.trajectory.as_ref().unwrap(),
            &traj,
            TOL,
        );
        assert_eq!(out.nfe, case.usize("steps"));
    }
}

/// `model` with its trainable weights as `Var`s (a loaded model's are plain tensors, which
/// autograd does not differentiate).
fn trainable(model: &VelocityMlp) -> VelocityMlp {
    let tensors: std::collections::HashMap<String, Tensor> = model
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let t = if VelocityMlpConfig::is_fixed(&k) {
                t
            } else {
                Var::from_tensor(&t).unwrap().as_tensor().clone()
            };
            (k, t)
        })
        .collect();
    VelocityMlp::from_tensors(model.config().clone(), &tensors, "<trainable>".as_ref()).unwrap()
}

#[test]
fn golden_loss_matches_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let case = Case::load(&golden_dir().join("mlp-2d"));
    let model = trainable(&VelocityMlp::load(case.dir.join("model.safetensors"), &dev).unwrap());
    let noisy = case.npy("expected_noisy_x.npy").to_device(&dev).unwrap();
    let target = case.npy("expected_target.npy").to_device(&dev).unwrap();
    let t = case.npy("train_t.npy").to_device(&dev).unwrap();
    let (loss, grads) =
        flow_matching::train::loss_and_grads(&model, &noisy, &t, None, &target).unwrap();
    let expected = case.json["expected_loss"].as_f64().unwrap() as f32;
    assert!(
        (loss - expected).abs() <= TOL.0 + TOL.1 * expected.abs(),
        "GPU loss {loss}, PyTorch {expected}"
    );
    // The same gradients as the CPU's fused backward.
    let cpu = VelocityMlp::load(case.dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let (cpu_loss, cpu_grads) = flow_matching::model::loss_and_grads(
        &cpu,
        &case.npy("expected_noisy_x.npy"),
        &case.npy("train_t.npy"),
        None,
        &case.npy("expected_target.npy"),
    )
    .unwrap();
    eprintln!("loss: GPU {loss}, CPU {cpu_loss}, PyTorch {expected}");
    for (k, g) in &cpu_grads {
        let (_, gg) = grads
            .iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("no GPU gradient for {k}"));
        assert_close(&format!("gradient {k}"), gg, g, TOL);
    }
}

#[test]
fn every_method_matches_the_cpu_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let case = Case::load(&golden_dir().join("mlp-2d"));
    let cpu = VelocityMlp::load(case.dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let model = cpu.to_device(&dev).unwrap();
    let x_init = case.npy("x_init.npy");
    for method in flow_matching::solver::METHOD_NAMES {
        let fm = FlowMatching::new(2).unwrap().with_method(method).unwrap();
        let opts = |d: &Device| SampleOptions {
            steps: Some(8),
            x_init: Some(x_init.to_device(d).unwrap()),
            ..Default::default()
        };
        let a = fm
            .sample(8, &mut cpu.clone(), &Device::Cpu, &opts(&Device::Cpu))
            .unwrap();
        let b = fm.sample(8, &mut model.clone(), &dev, &opts(&dev)).unwrap();
        eprintln!(
            "{method}: nfe CPU {} GPU {}, max |diff| {:.3e}",
            a.nfe,
            b.nfe,
            max_diff(&a.x, &b.x)
        );
        if method != "dopri5" {
            // (An adaptive run may accept or reject a borderline step differently.)
            assert_eq!(a.nfe, b.nfe, "{method}: evaluations");
        }
        assert_close(method, &b.x, &a.x, TOL);
    }
}

#[test]
fn guidance_matches_the_cpu_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let case = Case::load(&golden_dir().join("mlp-cond"));
    let cpu = VelocityMlp::load(case.dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let model = cpu.to_device(&dev).unwrap();
    let b = case.usize("batch");
    let labels: Vec<u32> = (0..b as u32)
        .map(|i| i % model.config().num_classes as u32)
        .collect();
    let fm = FlowMatching::new(case.x_dims())
        .unwrap()
        .with_guidance(2.0)
        .unwrap();
    let x_init = case.npy("x_init.npy");
    let opts = |d: &Device| SampleOptions {
        steps: Some(10),
        x_init: Some(x_init.to_device(d).unwrap()),
        ..Default::default()
    };
    let a = fm
        .sample(
            b,
            &mut fm.guided(&cpu, &labels).unwrap(),
            &Device::Cpu,
            &opts(&Device::Cpu),
        )
        .unwrap();
    let g = fm
        .sample(
            b,
            &mut fm.guided(&model, &labels).unwrap(),
            &dev,
            &opts(&dev),
        )
        .unwrap();
    eprintln!(
        "guidance 2: max |diff| CPU vs GPU {:.3e}",
        max_diff(&a.x, &g.x)
    );
    assert_close("guided sample", &g.x, &a.x, TOL);
}

/// Two Gaussians at (-2, 0) and (2, 0), std 0.2, drawn on the CPU.
fn two_gaussians(rng: &mut StdRng, b: usize) -> flow_matching::Result<(Tensor, Option<Vec<u32>>)> {
    let mut xs = Vec::with_capacity(2 * b);
    for _ in 0..b {
        let cx = if rng.random_range(0..2u32) == 0 {
            -2.0f32
        } else {
            2.0
        };
        let n0: f32 = StandardNormal.sample(rng);
        let n1: f32 = StandardNormal.sample(rng);
        xs.push(cx + 0.2 * n0);
        xs.push(0.2 * n1);
    }
    Ok((Tensor::from_vec(xs, (b, 2), &Device::Cpu)?, None))
}

fn trainer(dev: &Device) -> Trainer<VelocityMlp> {
    let mut model = VelocityMlpConfig::new(XDims::new(2).unwrap());
    (model.hidden, model.depth, model.num_freqs) = (64, 2, 8);
    let config = TrainConfig {
        steps: 60,
        batch_size: 256,
        lr: 1e-2,
        seed: 3,
        timestep_sampler: TimestepSampler::Uniform,
        ..TrainConfig::default()
    };
    Trainer::new(model, config, dev).unwrap()
}

#[test]
fn training_on_the_gpu_learns_and_tracks_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (mut on_gpu, mut on_cpu) = (trainer(&dev), trainer(&Device::Cpu));
    let (mut data_g, mut data_c) = (two_gaussians, two_gaussians);
    let mut losses = Vec::new();
    for _ in 0..60 {
        let g = on_gpu.step(&mut data_g).unwrap();
        let c = on_cpu.step(&mut data_c).unwrap();
        losses.push((g, c));
    }
    let first = losses[0];
    // Same weights, batch, times and noise: the first losses agree to float32 rounding.
    assert!(
        (first.0 - first.1).abs() <= TOL.0 + TOL.1 * first.1.abs(),
        "first loss: GPU {} CPU {}",
        first.0,
        first.1
    );
    let mean = |v: &[(f32, f32)], gpu: bool| {
        v.iter().map(|p| if gpu { p.0 } else { p.1 }).sum::<f32>() / v.len() as f32
    };
    let (head, tail) = (&losses[..10], &losses[50..]);
    eprintln!(
        "training: first {:?}; mean of steps 1-10 GPU {:.4} CPU {:.4}, of steps 51-60 GPU {:.4} CPU {:.4}",
        first,
        mean(head, true),
        mean(head, false),
        mean(tail, true),
        mean(tail, false)
    );
    assert!(
        mean(tail, true) < 0.9 * mean(head, true),
        "the GPU run did not learn"
    );
    // AdamW amplifies rounding differences only slowly: the runs stay close.
    let (a, b) = (mean(tail, true), mean(tail, false));
    assert!((a - b).abs() <= 0.1 * b, "GPU {a} vs CPU {b} late losses");
    assert!(on_gpu.model().device().is_cuda());
    let w = on_gpu.model().tensors();
    assert!(w.iter().all(|(_, t)| t.dtype() == DType::F32));
}
