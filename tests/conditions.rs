//! Continuous conditions on the velocity-mlp: the file format's new keys, the fused paths
//! against the tensor paths, the trainer learning a conditional distribution, guidance, and
//! the errors for conditions that do not fit the model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flow_matching::guidance::GuidedCondition;
use flow_matching::model::{loss_and_grads_cond, CondNorm, Condition};
use flow_matching::train::{TrainConfig, Trainer};
use flow_matching::{
    Diffusion, FlowMatching, SampleOptions, StepFn, VelocityMlp, VelocityMlpConfig, XDims,
};
use rand::{Rng, SeedableRng};

const CPU: Device = Device::Cpu;

fn cond_config(hidden: usize) -> VelocityMlpConfig {
    VelocityMlpConfig {
        hidden,
        depth: 2,
        cond_dim: 8,
        cond_dims: Some(XDims::new([2, 2]).unwrap()),
        cond_norm: Some(CondNorm {
            mean: vec![0.5, -1.0, 0.0, 2.0],
            std: vec![2.0, 1.0, 0.5, 3.0],
        }),
        ..VelocityMlpConfig::new(XDims::new([3, 2]).unwrap())
    }
}

/// A model whose weights are all non-zero (the null condition starts at zero).
fn perturbed(model: &VelocityMlp, seed: u64) -> VelocityMlp {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let map = model
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            if VelocityMlpConfig::is_fixed(&k) {
                return (k, t);
            }
            let n = t.elem_count();
            let noise: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3f32..0.3)).collect();
            let noise = Tensor::from_vec(noise, t.dims(), &CPU).unwrap();
            (k, (t.detach() + noise).unwrap())
        })
        .collect();
    VelocityMlp::from_tensors(model.config().clone(), &map, Path::new("perturbed")).unwrap()
}

fn rand_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(v, shape, &CPU).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn file_round_trip_keeps_the_condition_and_its_normalisation() {
    let model = perturbed(
        &VelocityMlp::init(cond_config(16), &candle_nn::VarMap::new(), &CPU, 0).unwrap(),
        1,
    );
    let dir = std::env::temp_dir().join(format!("fm-cond-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    model.save(&path).unwrap();
    let back = VelocityMlp::load(&path, &CPU).unwrap();
    assert_eq!(back.config(), model.config());
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["cond_dims"], "2,2");
    assert_eq!(meta["version"], "1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (x, c) = (
        rand_tensor(&mut rng, &[4, 3, 2]),
        rand_tensor(&mut rng, &[4, 2, 2]),
    );
    let t = Tensor::new(&[0.1f32, 0.4, 0.7, 0.9], &CPU).unwrap();
    let a = model.forward(&x, &t, Some(&c)).unwrap();
    let b = back.forward(&x, &t, Some(&c)).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    // The condition matters, and the null condition differs from it.
    let null = model.forward(&x, &t, None).unwrap();
    assert!(max_diff(&a, &null) > 1e-3);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn condition_is_standardised_then_projected() {
    // k = ((c - mean) / std) W^T + b, by hand for one row.
    let model = perturbed(
        &VelocityMlp::init(cond_config(16), &candle_nn::VarMap::new(), &CPU, 0).unwrap(),
        3,
    );
    let c = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]]], &CPU).unwrap();
    let k = model
        .cond_features(Some(&Condition::features(c)), 1)
        .unwrap()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let map: std::collections::HashMap<_, _> = model.tensors().into_iter().collect();
    let w = map["cond_proj.weight"].to_vec2::<f32>().unwrap();
    let b = map["cond_proj.bias"].to_vec1::<f32>().unwrap();
    let n = [
        (1.0 - 0.5) / 2.0,
        (2.0 + 1.0) / 1.0,
        (3.0 - 0.0) / 0.5,
        (4.0 - 2.0) / 3.0,
    ];
    for j in 0..8 {
        let want: f32 = b[j] + (0..4).map(|i| w[j][i] * n[i]).sum::<f32>();
        assert!(
            (k[0][j] - want).abs() < 1e-5,
            "feature {j}: {} vs {want}",
            k[0][j]
        );
    }
}

/// The generic tensor path (no fused CPU kernel).
struct TensorPath<'a>(&'a VelocityMlp, Condition);

impl StepFn for TensorPath<'_> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> flow_matching::Result<Tensor> {
        self.0.forward_cond(x, t, Some(&self.1))
    }
}

#[test]
fn fused_sampling_matches_the_tensor_path() {
    let model = perturbed(
        &VelocityMlp::init(cond_config(32), &candle_nn::VarMap::new(), &CPU, 0).unwrap(),
        4,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let c = rand_tensor(&mut rng, &[7, 2, 2]);
    let fm = FlowMatching::new([3, 2]).unwrap();
    let opts = SampleOptions::seeded(3);
    let fast = fm
        .sample(7, &mut model.with_condition(&c).unwrap(), &CPU, &opts)
        .unwrap();
    let slow = fm
        .sample(
            7,
            &mut TensorPath(&model, Condition::features(c)),
            &CPU,
            &opts,
        )
        .unwrap();
    assert!(
        max_diff(&fast.x, &slow.x) < 1e-4,
        "{}",
        max_diff(&fast.x, &slow.x)
    );
}

#[test]
fn fused_gradients_match_autograd_with_dropped_rows() {
    let model = perturbed(
        &VelocityMlp::init(cond_config(16), &candle_nn::VarMap::new(), &CPU, 0).unwrap(),
        6,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (x, target) = (
        rand_tensor(&mut rng, &[5, 3, 2]),
        rand_tensor(&mut rng, &[5, 3, 2]),
    );
    let t = Tensor::new(&[0.1f32, 0.3, 0.5, 0.7, 0.9], &CPU).unwrap();
    let cond = Condition::Features {
        values: rand_tensor(&mut rng, &[5, 2, 2]),
        keep: Some(Tensor::new(&[1f32, 0.0, 1.0, 0.0, 1.0], &CPU).unwrap()),
    };
    // Autograd needs Vars: rebuild the model on Vars.
    let varmap = candle_nn::VarMap::new();
    let vmodel = {
        let base = VelocityMlp::init(model.config().clone(), &varmap, &CPU, 0).unwrap();
        let data = varmap.data().lock().unwrap();
        let src: std::collections::HashMap<_, _> = model.tensors().into_iter().collect();
        for (k, v) in data.iter() {
            v.set(&src[k]).unwrap();
        }
        base
    };
    let (l1, g1) = loss_and_grads_cond(&model, &x, &t, Some(&cond), &target).unwrap();
    let (l2, g2) =
        flow_matching::train::loss_and_grads(&vmodel, &x, &t, Some(&cond), &target).unwrap();
    assert!((l1 - l2).abs() < 1e-5 * l2.abs().max(1.0), "{l1} vs {l2}");
    let g2: std::collections::HashMap<_, _> = g2.into_iter().collect();
    assert_eq!(g1.len(), g2.len());
    for (k, g) in &g1 {
        let d = max_diff(g, &g2[k]);
        let scale = g2[k]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4 * scale.max(1.0), "{k}: {d} (scale {scale})");
    }
    assert!(g1.iter().any(|(k, _)| k == "cond_null"));
}

/// Data: x = [c, -c, c] plus small noise, c ~ U(-1.5, 1.5): the condition picks the mean.
fn linear_data(
    rng: &mut rand::rngs::StdRng,
    b: usize,
) -> flow_matching::Result<(Tensor, Condition)> {
    let mut x = Vec::with_capacity(3 * b);
    let mut c = Vec::with_capacity(b);
    for _ in 0..b {
        let ci: f32 = rng.random_range(-1.5..1.5);
        for s in [1.0, -1.0, 1.0] {
            x.push(s * ci + 0.05 * rng.random_range(-1.0f32..1.0));
        }
        c.push(ci);
    }
    Ok((
        Tensor::from_vec(x, (b, 3), &CPU)?,
        Condition::features(Tensor::from_vec(c, (b, 1), &CPU)?),
    ))
}

#[test]
fn trainer_learns_a_continuous_condition_and_guidance_uses_it() {
    let cfg = VelocityMlpConfig {
        hidden: 64,
        depth: 2,
        cond_dim: 8,
        cond_dims: Some(XDims::new(1).unwrap()),
        ..VelocityMlpConfig::new(XDims::new(3).unwrap())
    };
    let config = TrainConfig {
        steps: 600,
        batch_size: 128,
        lr: 3e-3,
        checkpoint_every: 0,
        ema_decay: 0.99,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, config, &CPU).unwrap();
    let out = trainer.train(linear_data).unwrap();
    let model = out.model;
    let c = Tensor::new(&[[-1.0f32], [0.0], [1.0]], &CPU).unwrap();
    // Condition-major: row n * 50 + k is c[n].
    let cond = flow_matching::condition::repeat_per_cond(&c, 50).unwrap();
    let fm = FlowMatching::new(3).unwrap().with_steps(20).unwrap();
    let s = fm
        .sample(
            150,
            &mut model.with_condition(&cond).unwrap(),
            &CPU,
            &SampleOptions::seeded(0),
        )
        .unwrap();
    let rows = s.x.to_vec2::<f32>().unwrap();
    for (n, want) in [-1.0f32, 0.0, 1.0].iter().enumerate() {
        let mean: f32 = rows[n * 50..(n + 1) * 50]
            .iter()
            .map(|r| r[0] - r[1] + r[2])
            .sum::<f32>()
            / 150.0;
        assert!(
            (mean - want).abs() < 0.1,
            "condition {want}: sample mean {mean}"
        );
    }
    // Guidance weight 1 is the conditional field, weight 0 the null one.
    let x = rand_tensor(&mut rand::rngs::StdRng::seed_from_u64(1), &[3, 3]);
    let t = Tensor::new(&[0.5f32, 0.5, 0.5], &CPU).unwrap();
    let v1 = GuidedCondition::new(&model, &c, 1.0)
        .unwrap()
        .step(&x, &t)
        .unwrap();
    let v0 = GuidedCondition::new(&model, &c, 0.0)
        .unwrap()
        .step(&x, &t)
        .unwrap();
    let v2 = GuidedCondition::new(&model, &c, 2.0)
        .unwrap()
        .step(&x, &t)
        .unwrap();
    assert!(max_diff(&v1, &model.forward(&x, &t, Some(&c)).unwrap()) < 1e-6);
    assert!(max_diff(&v0, &model.forward(&x, &t, None).unwrap()) < 1e-6);
    let want = ((&v1 * 2.0).unwrap() - &v0).unwrap();
    assert!(max_diff(&v2, &want) < 1e-4);
}

#[test]
fn conditions_that_do_not_fit_are_refused() {
    let model = VelocityMlp::init(cond_config(8), &candle_nn::VarMap::new(), &CPU, 0).unwrap();
    let x = Tensor::zeros((2, 3, 2), DType::F32, &CPU).unwrap();
    let t = Tensor::zeros(2, DType::F32, &CPU).unwrap();
    let wrong = Tensor::zeros((2, 4), DType::F32, &CPU).unwrap();
    let e = model.with_condition(&wrong).unwrap_err().to_string();
    assert!(e.contains("[N, 2,2]") && e.contains("[2, 4]"), "{e}");
    let labels = Condition::labels(&[0, 1], &CPU).unwrap();
    let e = model
        .forward_cond(&x, &t, Some(&labels))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("class labels") && e.contains("continuous"),
        "{e}"
    );
    let classes = VelocityMlpConfig {
        num_classes: 3,
        ..VelocityMlpConfig::new(XDims::new([3, 2]).unwrap())
    };
    let labelled = VelocityMlp::init(classes, &candle_nn::VarMap::new(), &CPU, 0).unwrap();
    let e = labelled.with_condition(&wrong).unwrap_err().to_string();
    assert!(e.contains("class labels"), "{e}");
    let both = VelocityMlpConfig {
        num_classes: 3,
        ..cond_config(8)
    };
    assert!(both
        .validate()
        .unwrap_err()
        .to_string()
        .contains("not both"));
    // The trainer refuses a batch whose condition has the wrong shape.
    let mut trainer = Trainer::new(
        cond_config(8),
        TrainConfig {
            steps: 1,
            batch_size: 4,
            ..TrainConfig::default()
        },
        &CPU,
    )
    .unwrap();
    let e = trainer
        .step(&mut |_: &mut rand::rngs::StdRng, b: usize| {
            Ok((
                Tensor::zeros((b, 3, 2), DType::F32, &CPU)?,
                Condition::features(Tensor::zeros((b, 3), DType::F32, &CPU)?),
            ))
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("[4, 2,2]") && e.contains("[4, 3]"), "{e}");
}
