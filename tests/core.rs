//! The seed's sampler: shapes, overrides, seeding, Euler's order, training helpers, errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flow_matching::flow_matching::TIMESTEP_SAMPLER_NAMES;
use flow_matching::{
    Diffusion, Error, FlowMatching, SampleOptions, TimestepSampler, VelocityMlp, XDims,
};
use rand::SeedableRng;

fn neg(x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
    x.neg()
}

fn golden(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(path)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fm-core-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn x_dims_from_integer_or_sequence() {
    assert_eq!(XDims::new(128).unwrap().dims(), &[128]);
    assert_eq!(XDims::new([64, 64, 3]).unwrap().dims(), &[64, 64, 3]);
    assert_eq!(XDims::new(vec![64, 2]).unwrap().numel(), 128);
    let e = XDims::new(Vec::<usize>::new()).unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid x_dims []: a sample needs at least one dimension"
    );
    let e = FlowMatching::new([4, 0]).unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid x_dims [4, 0]: every dimension must be at least 1"
    );
}

#[test]
fn every_return_has_the_documented_shape() {
    for dims in [vec![2], vec![16, 2], vec![3, 4, 5]] {
        let fm = FlowMatching::new(dims.clone()).unwrap();
        let out = fm
            .sample(3, &mut neg, &Device::Cpu, &SampleOptions::seeded(1))
            .unwrap();
        let mut want = vec![3];
        want.extend(&dims);
        assert_eq!(out.x.dims(), want.as_slice());
        assert!(out.trajectory.is_none() && out.times.is_none());

        let opts = SampleOptions {
            return_all_steps: true,
            ..SampleOptions::seeded(1)
        };
        let all = fm.sample(3, &mut neg, &Device::Cpu, &opts).unwrap();
        let mut traj = vec![3, 11];
        traj.extend(&dims);
        assert_eq!(all.trajectory.as_ref().unwrap().dims(), traj.as_slice());
        let times = all.times.as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(times.len(), 11);
        assert_eq!((times[0], times[10]), (0.0, 1.0));
        // The last state is the final sample, and the first is the noise.
        let last = all
            .trajectory
            .as_ref()
            .unwrap()
            .narrow(1, 10, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert_eq!(
            last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            all.x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let first = all
            .trajectory
            .as_ref()
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let noise = fm.noise(3, Some(1), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            noise.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn the_step_function_sees_x_and_a_broadcastable_t() {
    let fm = FlowMatching::new([3, 4, 5]).unwrap();
    let mut seen = Vec::new();
    let mut f = |x: &Tensor, t: &Tensor| {
        seen.push((
            x.dims().to_vec(),
            t.dims().to_vec(),
            t.flatten_all()?.to_vec1::<f32>()?[0],
        ));
        x.zeros_like()
    };
    fm.sample(2, &mut f, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap();
    assert_eq!(seen.len(), 10);
    for (i, (x, t, tv)) in seen.iter().enumerate() {
        assert_eq!(x, &vec![2, 3, 4, 5]);
        assert_eq!(t, &vec![2, 1, 1, 1]);
        assert!((tv - i as f32 / 10.0).abs() < 1e-6);
    }
}

#[test]
fn overrides_affect_one_call_only() {
    let fm = FlowMatching::new(2).unwrap().with_steps(20).unwrap();
    let mut calls = 0usize;
    let mut f = |x: &Tensor, _t: &Tensor| {
        calls += 1;
        x.neg()
    };
    let opts = SampleOptions {
        steps: Some(3),
        method: Some("rk4".parse().unwrap()),
        ..SampleOptions::seeded(0)
    };
    let o = fm.sample(2, &mut f, &Device::Cpu, &opts).unwrap();
    assert_eq!((o.nfe, o.accepted_steps), (12, 3));
    let o = fm
        .sample(2, &mut f, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap();
    assert_eq!((o.nfe, o.accepted_steps), (20, 20));
    assert_eq!(calls, 32);
    assert_eq!(fm.num_inference_steps, 20);
    assert_eq!(fm.method.to_string(), "euler");
}

#[test]
fn the_same_seed_gives_the_same_samples() {
    let model = VelocityMlp::load(golden("mlp-2d/model.safetensors"), &Device::Cpu).unwrap();
    let fm = FlowMatching::new(2).unwrap();
    let run = |seed| {
        let mut m = model.clone();
        fm.sample(64, &mut m, &Device::Cpu, &SampleOptions::seeded(seed))
            .unwrap()
            .x
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn every_dtype_is_accepted() {
    let fm = FlowMatching::new(4).unwrap();
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let opts = SampleOptions {
            dtype,
            return_all_steps: true,
            ..SampleOptions::seeded(3)
        };
        let out = fm.sample(2, &mut neg, &Device::Cpu, &opts).unwrap();
        assert_eq!(out.x.dtype(), dtype);
        assert_eq!(out.times.unwrap().dtype(), dtype);
    }
    let opts = SampleOptions {
        dtype: DType::U32,
        ..Default::default()
    };
    let e = fm
        .sample(2, &mut neg, &Device::Cpu, &opts)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "invalid dtype U32: f32, f64, f16 or bf16");
}

#[test]
fn euler_converges_at_order_one() {
    // dx/dt = -x from x0 = 1: x(1) = exp(-1).
    let fm = FlowMatching::new(1).unwrap();
    let x0 = Tensor::new(&[[1.0f64]], &Device::Cpu).unwrap();
    let err = |steps: usize| {
        let opts = SampleOptions {
            steps: Some(steps),
            x_init: Some(x0.clone()),
            dtype: DType::F64,
            ..Default::default()
        };
        let x = fm.sample(1, &mut neg, &Device::Cpu, &opts).unwrap().x;
        (x.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0] - (-1f64).exp()).abs()
    };
    let (e1, e2) = (err(64), err(128));
    let slope = (e1 / e2).log2();
    assert!((0.9..=1.1).contains(&slope), "slope {slope}");
}

/// Kolmogorov-Smirnov distance between 100k draws and the exact CDF.
fn ks(sampler: TimestepSampler) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let n = 100_000;
    let mut v: Vec<f64> = (0..n).map(|_| sampler.draw(&mut rng)).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = sampler.cdf(x);
            (c - i as f64 / n as f64)
                .abs()
                .max((c - (i + 1) as f64 / n as f64).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn timestep_samplers_follow_their_distributions() {
    for s in [
        TimestepSampler::Uniform,
        TimestepSampler::Beta,
        TimestepSampler::LogitNormal {
            mean: 0.0,
            std: 1.0,
        },
        TimestepSampler::LogitNormal {
            mean: -0.5,
            std: 0.7,
        },
    ] {
        let d = ks(s);
        assert!(d < 0.01, "{s:?}: KS distance {d}");
    }
    // The beta sampler's CDF is not the uniform one: the test can tell them apart.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mean: f64 = (0..10_000)
        .map(|_| TimestepSampler::Beta.draw(&mut rng))
        .sum::<f64>()
        / 1e4;
    // E[0.999 - 0.999 B] with E[B] = 1.5 / 2.5 = 0.6.
    assert!((mean - 0.999 * 0.4).abs() < 0.01, "mean {mean}");
    assert!(ks(TimestepSampler::Uniform) < 0.01);
    let e = "gamma".parse::<TimestepSampler>().unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "unknown timestep sampler \"gamma\"; expected one of: {}",
            TIMESTEP_SAMPLER_NAMES.join(", ")
        )
    );
}

#[test]
fn training_data_is_seeded_and_well_formed() {
    let mut fm = FlowMatching::new([3, 2]).unwrap();
    fm.cond_drop_rate = 0.5;
    let x = Tensor::ones((1000, 3, 2), DType::F32, &Device::Cpu).unwrap();
    let draw = |seed| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        fm.construct_training_data(&x, &mut rng).unwrap()
    };
    let (a, b) = (draw(5), draw(5));
    assert_eq!(a.t.dims(), &[1000, 1, 1]);
    assert_eq!(a.noisy_x.dims(), &[1000, 3, 2]);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&a.noisy_x), flat(&b.noisy_x));
    assert_ne!(flat(&a.noise), flat(&draw(6).noise));
    // noisy_x = t x + (1 - t) noise, row by row.
    let (t, n, nx) = (flat(&a.t), flat(&a.noise), flat(&a.noisy_x));
    for i in 0..1000 {
        for j in 0..6 {
            let want = t[i] + (1.0 - t[i]) * n[6 * i + j];
            assert!((nx[6 * i + j] - want).abs() < 1e-5);
        }
    }
    assert!(t.iter().all(|&v| (0.0..=0.999).contains(&v)));
    let dropped: f32 = flat(&a.drop_mask).iter().sum();
    assert!((dropped - 500.0).abs() < 80.0, "dropped {dropped}");
    // The loss is the MSE against x - noise: a perfect prediction has zero loss.
    let perfect = a.target().unwrap();
    assert_eq!(
        fm.compute_loss(&a, &perfect)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let zero = perfect.zeros_like().unwrap();
    let l = fm
        .compute_loss(&a, &zero)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = flat(&perfect).iter().map(|v| v * v).sum::<f32>() / 6000.0;
    assert!((l - want).abs() < 1e-4);
    let e = fm.compute_loss(
        &a,
        &Tensor::zeros((1000, 6), DType::F32, &Device::Cpu).unwrap(),
    );
    assert_eq!(
        e.unwrap_err().to_string(),
        "prediction: expected shape [1000, 3, 2] (the shape of x), got [1000, 6]"
    );
}

#[test]
fn error_wrong_shape_from_the_step_function() {
    let fm = FlowMatching::new([16, 2]).unwrap();
    let mut f = |x: &Tensor, _t: &Tensor| x.flatten_from(1);
    let e = fm
        .sample(2, &mut f, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "step function returned shape [2, 32], expected [2, 16, 2] (the shape of x)"
    );
}

#[test]
fn error_wrong_dtype_from_the_step_function() {
    let fm = FlowMatching::new(2).unwrap();
    let mut f = |x: &Tensor, _t: &Tensor| x.to_dtype(DType::F64);
    let e = fm
        .sample(2, &mut f, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "step function returned dtype F64, expected F32 (the dtype of x)"
    );
}

#[test]
fn error_wrong_device_message() {
    // Only one device exists on a CPU-only machine; the check itself runs on CUDA builds below.
    let e = Error::StepDevice {
        expected: "Cpu".into(),
        got: "Cuda { gpu_id: 0 }".into(),
    };
    assert_eq!(
        e.to_string(),
        "step function returned a tensor on Cuda { gpu_id: 0 }, expected Cpu (the device of x)"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn error_wrong_device_from_the_step_function() {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no CUDA GPU 0 ({e})");
            return;
        }
    };
    let fm = FlowMatching::new(2).unwrap();
    let mut f = |x: &Tensor, _t: &Tensor| x.to_device(&gpu);
    let e = fm
        .sample(2, &mut f, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap_err();
    assert!(matches!(e, Error::StepDevice { .. }), "{e}");
}

#[test]
fn error_non_finite_state_names_step_and_time() {
    let fm = FlowMatching::new(2).unwrap();
    // Blows up once t reaches 0.3: the update of step 4 (from t = 0.3 to 0.4) is NaN.
    let mut f = |x: &Tensor, t: &Tensor| {
        let tv = t.flatten_all()?.to_vec1::<f32>()?[0];
        if tv > 0.25 {
            x.affine(f64::NAN, 0.0)
        } else {
            x.zeros_like()
        }
    };
    let e = fm
        .sample(2, &mut f, &Device::Cpu, &SampleOptions::seeded(0))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "non-finite value (NaN or infinity) in the state after step 4 (t = 0.400000)"
    );
}

#[test]
fn error_batch_size_zero_and_zero_steps() {
    let fm = FlowMatching::new(2).unwrap();
    let e = fm
        .sample(0, &mut neg, &Device::Cpu, &SampleOptions::default())
        .unwrap_err();
    assert_eq!(e.to_string(), "batch size must be at least 1, got 0");
    let opts = SampleOptions {
        steps: Some(0),
        ..Default::default()
    };
    let e = fm.sample(1, &mut neg, &Device::Cpu, &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "number of inference steps must be at least 1, got 0"
    );
    assert_eq!(
        FlowMatching::new(2)
            .unwrap()
            .with_steps(0)
            .unwrap_err()
            .to_string(),
        "number of inference steps must be at least 1, got 0"
    );
}

#[test]
fn error_unknown_method_lists_the_known_ones() {
    let e = FlowMatching::new(2)
        .unwrap()
        .with_method("leapfrog")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown integration method \"leapfrog\"; expected one of: euler, midpoint, heun, rk4, dopri5"
    );
}

#[test]
fn error_initial_noise_of_the_wrong_shape() {
    let fm = FlowMatching::new(2).unwrap();
    let opts = SampleOptions {
        x_init: Some(Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap()),
        ..Default::default()
    };
    let e = fm.sample(3, &mut neg, &Device::Cpu, &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "initial noise: expected shape [3, 2] ([batch, *x_dims]), got [3, 3]"
    );
}

#[test]
fn error_missing_model_file() {
    let e = VelocityMlp::load("/nonexistent/model.safetensors", &Device::Cpu).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/model.safetensors: No such file or directory (os error 2)"
    );
}

#[test]
fn error_truncated_model_file() {
    let bytes = std::fs::read(golden("mlp-2d/model.safetensors")).unwrap();
    let p = tmp("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = VelocityMlp::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "model file {}: not a valid safetensors file",
            p.display()
        )),
        "{e}"
    );
}

/// Rewrites the golden mlp-2d file with one tensor replaced or metadata changed.
fn tampered(
    name: &str,
    key: &str,
    shape: Option<Vec<usize>>,
    meta: Option<(&str, &str)>,
) -> PathBuf {
    let (config, tensors) =
        flow_matching::model::read_file(&golden("mlp-2d/model.safetensors"), &Device::Cpu).unwrap();
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(shape) = shape {
        for (k, t) in list.iter_mut() {
            if k == key {
                *t = Tensor::zeros(shape.clone(), DType::F32, &Device::Cpu).unwrap();
            }
        }
    } else {
        list.retain(|(k, _)| k != key);
    }
    let mut metadata = config.metadata();
    if let Some((k, v)) = meta {
        metadata.insert(k.to_string(), v.to_string());
    }
    let p = tmp(name);
    safetensors::serialize_to_file(
        list.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        &p,
    )
    .unwrap();
    p
}

#[test]
fn error_inconsistent_model_file_names_key_and_shapes() {
    let p = tampered(
        "bad-shape.safetensors",
        "net.2.weight",
        Some(vec![64, 63]),
        None,
    );
    let e = VelocityMlp::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "model file {}: tensor \"net.2.weight\" has shape [64, 63], expected [64, 64]",
            p.display()
        )
    );
    let p = tampered("missing.safetensors", "net.4.bias", None, None);
    let e = VelocityMlp::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "model file {}: missing tensor \"net.4.bias\" (expected shape [2])",
            p.display()
        )
    );
    let p = tampered("meta.safetensors", "", Some(vec![]), Some(("hidden", "65")));
    let e = VelocityMlp::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "model file {}: tensor \"net.0.weight\" has shape [64, 34], expected [65, 34]",
            p.display()
        )
    );
    let p = tampered(
        "format.safetensors",
        "",
        Some(vec![]),
        Some(("format", "other")),
    );
    let e = VelocityMlp::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "model file {}: metadata format is Some(\"other\"), expected \"velocity-mlp\"",
            p.display()
        )
    );
}

#[test]
fn save_then_load_round_trips_and_keeps_metadata() {
    let model = VelocityMlp::load(golden("mlp-cond/model.safetensors"), &Device::Cpu).unwrap();
    let p = tmp("roundtrip.safetensors");
    model.save(&p).unwrap();
    let back = VelocityMlp::load(&p, &Device::Cpu).unwrap();
    assert_eq!(back.config(), model.config());
    for ((k1, a), (k2, b)) in model.tensors().iter().zip(back.tensors()) {
        assert_eq!(k1, &k2);
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    assert!(std::fs::read_dir(p.parent().unwrap()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

#[test]
fn labels_are_checked_against_the_model() {
    let cond = VelocityMlp::load(golden("mlp-cond/model.safetensors"), &Device::Cpu).unwrap();
    let e = cond.with_labels(&[0, 4]).unwrap_err().to_string();
    assert_eq!(e, "invalid label 4: a class in 0..3 or 3 for no condition");
    let plain = VelocityMlp::load(golden("mlp-2d/model.safetensors"), &Device::Cpu).unwrap();
    let e = plain.with_labels(&[0]).unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid labels [0]: no labels: this model is unconditional (num_classes = 0)"
    );
}

#[test]
fn sampling_a_trainable_model_builds_no_autograd_graph() {
    let varmap = candle_nn::VarMap::new();
    let mut config = flow_matching::VelocityMlpConfig::new(XDims::new(2).unwrap());
    config.hidden = 16;
    let mut model = VelocityMlp::init(config, &varmap, &Device::Cpu, 0).unwrap();
    // Through the model directly, the weights are tracked ...
    let x = Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let direct = model
        .forward(&x, &t, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let w = varmap.data().lock().unwrap()["net.0.weight"]
        .as_tensor()
        .clone();
    assert!(direct.get(&w).is_some());
    // ... but no sampler path keeps a graph: generic RK4 and the fast Euler path.
    let fm = FlowMatching::new(2).unwrap();
    for method in ["rk4", "euler"] {
        let opts = SampleOptions {
            method: Some(method.parse().unwrap()),
            ..SampleOptions::seeded(0)
        };
        let out = fm.sample(3, &mut model, &Device::Cpu, &opts).unwrap();
        let grads = out.x.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(&w).is_none(),
            "{method} kept a graph to the weights"
        );
    }
}
