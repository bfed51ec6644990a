//! Training: loss goes down, runs are reproducible and resumable, checkpoints follow the spec,
//! and the optimiser pieces match their formulas.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};
use flow_matching::model::read_file;
use flow_matching::train::{
    clip_grad_norm, drop_labels, grad_norm, loss_and_grads, lr_at, AdamW, AdamWParams, Ema,
    LrSchedule, TrainConfig, Trainer,
};
use flow_matching::{
    Diffusion, FlowMatching, SampleOptions, TimestepSampler, VelocityMlp, VelocityMlpConfig, XDims,
};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

const CPU: Device = Device::Cpu;

fn small_model(num_classes: usize) -> VelocityMlpConfig {
    let mut c = VelocityMlpConfig::new(XDims::new(2).unwrap());
    c.hidden = 32;
    c.depth = 2;
    c.num_freqs = 4;
    c.num_classes = num_classes;
    c.cond_dim = 4;
    c
}

fn small_config(steps: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 64,
        lr: 3e-3,
        seed,
        ..TrainConfig::default()
    }
}

/// Two Gaussians at (-2, 0) and (2, 0), std 0.2; the label is the component.
fn two_gaussians(rng: &mut StdRng, b: usize) -> (Tensor, Vec<u32>) {
    let mut xs = Vec::with_capacity(2 * b);
    let mut labels = Vec::with_capacity(b);
    for _ in 0..b {
        let k: u32 = rng.random_range(0..2);
        let cx = if k == 0 { -2.0 } else { 2.0 };
        let n0: f32 = StandardNormal.sample(rng);
        let n1: f32 = StandardNormal.sample(rng);
        xs.push(cx + 0.2 * n0);
        xs.push(0.2 * n1);
        labels.push(k);
    }
    (Tensor::from_vec(xs, (b, 2), &CPU).unwrap(), labels)
}

fn uncond_data(rng: &mut StdRng, b: usize) -> flow_matching::Result<(Tensor, Option<Vec<u32>>)> {
    Ok((two_gaussians(rng, b).0, None))
}

fn cond_data(rng: &mut StdRng, b: usize) -> flow_matching::Result<(Tensor, Option<Vec<u32>>)> {
    let (x, l) = two_gaussians(rng, b);
    Ok((x, Some(l)))
}

fn flat(model: &VelocityMlp) -> Vec<(String, Vec<f32>)> {
    model
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fm-train-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn training_learns_two_gaussians() {
    let config = TrainConfig {
        batch_size: 128,
        lr: 1e-2,
        timestep_sampler: TimestepSampler::Uniform,
        ema_decay: 0.99,
        ..small_config(400, 1)
    };
    let mut trainer = Trainer::new(small_model(0), config, &CPU).unwrap();
    let out = trainer.train(uncond_data).unwrap();
    assert_eq!(out.history.len(), 400);
    assert_eq!(out.history[0].0, 1);
    assert_eq!(out.history[399].0, 400);
    let mean = |s: &[(usize, f32)]| s.iter().map(|p| p.1 as f64).sum::<f64>() / s.len() as f64;
    let first = mean(&out.history[..20]);
    let last = mean(&out.history[380..]);
    assert!(last < 0.75 * first, "loss went from {first} to {last}");

    // The EMA model's samples land near the two modes, about half at each.
    let fm = FlowMatching::new(2).unwrap().with_steps(50).unwrap();
    let mut model = out.model.clone();
    let s = fm
        .sample(400, &mut model, &CPU, &SampleOptions::seeded(7))
        .unwrap();
    let xs = s.x.to_vec2::<f32>().unwrap();
    let near = |c: f32| {
        xs.iter()
            .filter(|p| ((p[0] - c).powi(2) + p[1].powi(2)).sqrt() < 0.6)
            .count()
    };
    let (left, right) = (near(-2.0), near(2.0));
    assert!(
        left + right > 300,
        "only {left} + {right} of 400 near a mode"
    );
    assert!(
        left > 100 && right > 100,
        "modes unbalanced: {left} vs {right}"
    );
}

#[test]
fn same_seed_same_run_different_seed_different_run() {
    let run = |seed| {
        let mut t = Trainer::new(small_model(2), small_config(20, seed), &CPU).unwrap();
        t.train(cond_data).unwrap()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    assert_eq!(a.history, b.history);
    assert_eq!(flat(&a.model), flat(&b.model));
    assert_eq!(flat(&a.raw), flat(&b.raw));
    assert_ne!(a.history, c.history);
    assert_ne!(flat(&a.raw), flat(&c.raw));
}

#[test]
fn resume_equals_uninterrupted() {
    let config = TrainConfig {
        warmup_steps: 5,
        schedule: LrSchedule::Cosine { min_lr: 1e-4 },
        adamw: AdamWParams {
            weight_decay: 0.01,
            ..AdamWParams::default()
        },
        ..small_config(30, 3)
    };
    // Uninterrupted, with a checkpoint taken halfway.
    let path = tmp("resume.safetensors");
    let mut full = Trainer::new(small_model(2), config.clone(), &CPU).unwrap();
    let mut data = cond_data;
    for _ in 0..15 {
        full.step(&mut data).unwrap();
    }
    full.save_checkpoint(&path).unwrap();
    let full_out = full.train(cond_data).unwrap();

    let mut resumed = Trainer::resume(&path, &CPU).unwrap();
    assert_eq!(resumed.steps_done(), 15);
    assert_eq!(resumed.config(), &config);
    let resumed_out = resumed.train(cond_data).unwrap();
    assert_eq!(resumed_out.history, full_out.history);
    assert_eq!(flat(&resumed_out.raw), flat(&full_out.raw));
    assert_eq!(flat(&resumed_out.model), flat(&full_out.model));
    let moments = |t: &Trainer| {
        let o = t.optimizer();
        (
            o.step,
            o.m.iter()
                .chain(&o.v)
                .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(moments(&resumed), moments(&full));
}

#[test]
fn checkpoint_follows_the_spec() {
    let path = tmp("ckpt.safetensors");
    let config = TrainConfig {
        checkpoint_every: 4,
        ..small_config(10, 9)
    };
    let mut trainer = Trainer::new(small_model(2), config, &CPU)
        .unwrap()
        .with_checkpoint(&path);
    let out = trainer.train(cond_data).unwrap();

    // Any spec reader gets the EMA weights, extra keys ignored.
    let loaded = VelocityMlp::load(&path, &CPU).unwrap();
    assert_eq!(flat(&loaded), flat(&out.model));
    assert_ne!(flat(&loaded), flat(&out.raw));

    // Exactly the spec's keys with the spec's shapes, the spec's metadata, and the extras.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shapes: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    let expected = small_model(2).expected_shapes();
    for (k, shape) in &expected {
        assert_eq!(shapes.get(k), Some(shape), "key {k}");
        if k != "time_embed.freqs" {
            for prefix in ["raw.", "optim.m.", "optim.v."] {
                assert_eq!(
                    shapes.get(&format!("{prefix}{k}")),
                    Some(shape),
                    "{prefix}{k}"
                );
            }
        }
    }
    assert_eq!(shapes.get("train.losses"), Some(&vec![10]));
    assert_eq!(shapes.len(), expected.len() + 3 * (expected.len() - 1) + 1);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    for (k, v) in small_model(2).metadata() {
        assert_eq!(meta.get(&k), Some(&v), "metadata {k}");
    }
    assert_eq!(meta.get("train.step").map(String::as_str), Some("10"));

    // The raw weights under raw.* are the trainer's last weights.
    let (_, tensors) = read_file(&path, &CPU).unwrap();
    let raw0 = tensors["raw.net.0.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = out.raw.tensors()[2]
        .1
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(out.raw.tensors()[2].0, "net.0.weight");
    assert_eq!(raw0, want);
}

#[test]
fn checkpoints_are_written_every_n_steps() {
    let path = tmp("interval.safetensors");
    let _ = std::fs::remove_file(&path);
    let config = TrainConfig {
        checkpoint_every: 4,
        ..small_config(10, 2)
    };
    let mut trainer = Trainer::new(small_model(0), config, &CPU)
        .unwrap()
        .with_checkpoint(&path);
    // Before each step, the step count of the checkpoint on disk (if any).
    let mut on_disk = Vec::new();
    trainer
        .train(|rng: &mut StdRng, b| {
            on_disk.push(std::fs::read(&path).ok().map(|bytes| {
                let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
                h.metadata().as_ref().unwrap()["train.step"].clone()
            }));
            uncond_data(rng, b)
        })
        .unwrap();
    let s = |n: &str| Some(n.to_string());
    let mut want = vec![None; 4];
    want.extend([s("4"), s("4"), s("4"), s("4"), s("8"), s("8")]);
    assert_eq!(on_disk, want);
    assert_eq!(Trainer::resume(&path, &CPU).unwrap().steps_done(), 10);
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let path = tmp("bad.safetensors");
    let mut trainer = Trainer::new(small_model(0), small_config(3, 0), &CPU).unwrap();
    trainer.train(uncond_data).unwrap();
    trainer.save_checkpoint(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let cut = tmp("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Trainer::resume(&cut, &CPU).unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");
    let err = VelocityMlp::load(&cut, &CPU).unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");

    // A plain model file is not a checkpoint.
    let plain = tmp("plain.safetensors");
    trainer.raw_model().save(&plain).unwrap();
    let err = Trainer::resume(&plain, &CPU).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "model file {}: metadata has no \"train.step\" entry (not a training checkpoint?)",
            plain.display()
        )
    );

    // A checkpoint that lost one optimiser tensor names it.
    let (_, mut tensors) = read_file(&path, &CPU).unwrap();
    tensors.remove("optim.v.net.2.bias");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    let holed = tmp("holed.safetensors");
    let data: Vec<(String, Tensor)> = tensors.into_iter().collect();
    safetensors::serialize_to_file(
        data.iter().map(|(k, t)| (k.as_str(), t)),
        Some(meta),
        &holed,
    )
    .unwrap();
    let err = Trainer::resume(&holed, &CPU).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor \"optim.v.net.2.bias\" (expected shape [32]"),
        "{err}"
    );
}

#[test]
fn adamw_matches_a_hand_computed_step() {
    let w = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &CPU).unwrap()).unwrap();
    let params = AdamWParams {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(params, std::slice::from_ref(&w)).unwrap();
    let (lr, g1, g2) = (0.01f64, [0.5f64, 0.1], [-0.2f64, 0.3]);
    opt.step(
        std::slice::from_ref(&w),
        &[Tensor::new(&[0.5f32, 0.1], &CPU).unwrap()],
        lr,
    )
    .unwrap();
    opt.step(
        std::slice::from_ref(&w),
        &[Tensor::new(&[-0.2f32, 0.3], &CPU).unwrap()],
        lr,
    )
    .unwrap();
    for (i, w0) in [1f64, -2.0].into_iter().enumerate() {
        // Step 1: m = 0.1 g1, v = 0.01 g1^2, m_hat = g1, v_hat = g1^2.
        let mut w_ = w0 * (1.0 - lr * 0.1) - lr * g1[i] / (g1[i].abs() + 1e-8);
        let m = 0.9 * 0.1 * g1[i] + 0.1 * g2[i];
        let v = 0.99 * 0.01 * g1[i] * g1[i] + 0.01 * g2[i] * g2[i];
        let (m_hat, v_hat) = (m / (1.0 - 0.81), v / (1.0 - 0.9801));
        w_ = w_ * (1.0 - lr * 0.1) - lr * m_hat / (v_hat.sqrt() + 1e-8);
        let got = w.as_tensor().to_vec1::<f32>().unwrap()[i] as f64;
        assert!((got - w_).abs() < 1e-6, "weight {i}: {got} vs {w_}");
        let got_m = opt.m[0].to_vec1::<f32>().unwrap()[i] as f64;
        assert!((got_m - m).abs() < 1e-7, "m {i}: {got_m} vs {m}");
    }
    assert_eq!(opt.step, 2);
}

/// The in-place CPU step (f32, contiguous gradients) against the tensor-op step (the same
/// gradients as a transposed view, which the in-place step does not take): the same bits over
/// several steps with weight decay, and within 1e-5 of the same run in f64. A clone of the
/// optimiser keeps moments of its own.
#[test]
fn in_place_adamw_matches_the_tensor_step_and_clones_do_not_alias() {
    let params = AdamWParams {
        weight_decay: 0.05,
        ..AdamWParams::default()
    };
    let w0: Vec<f32> = (0..300).map(|i| (i as f32 * 0.7).sin()).collect();
    let var = |t: Tensor| Var::from_tensor(&t).unwrap();
    let w32 = var(Tensor::from_vec(w0.clone(), (20, 15), &CPU).unwrap());
    let w32_ops = var(Tensor::from_vec(w0, (20, 15), &CPU).unwrap());
    let w64 = var(w32.as_tensor().to_dtype(DType::F64).unwrap());
    let new = |w: &Var| AdamW::new(params, std::slice::from_ref(w)).unwrap();
    let (mut fused, mut ops, mut wide) = (new(&w32), new(&w32_ops), new(&w64));
    let mut snapshot = None;
    for step in 0..6 {
        let g: Vec<f32> = (0..300)
            .map(|i| ((i * (step + 3)) as f32 * 0.31).cos())
            .collect();
        let g = Tensor::from_vec(g, (20, 15), &CPU).unwrap();
        fused
            .step(std::slice::from_ref(&w32), std::slice::from_ref(&g), 0.01)
            .unwrap();
        // The same values as a transposed view: not contiguous, so the tensor ops run.
        let g_view = g.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!g_view.is_contiguous());
        ops.step(std::slice::from_ref(&w32_ops), &[g_view], 0.01)
            .unwrap();
        let g64 = g.to_dtype(DType::F64).unwrap();
        wide.step(std::slice::from_ref(&w64), &[g64], 0.01).unwrap();
        if step == 2 {
            let m = fused.m[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            snapshot = Some((fused.clone(), m));
        }
    }
    let flat = |w: &Var| {
        w.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let got = flat(&w32);
    assert_eq!(got, flat(&w32_ops), "in place and tensor ops differ");
    let want = w64
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-5, "weight {i}: {g} vs {w}");
    }
    let (clone, m_then) = snapshot.unwrap();
    let m_of = |o: &AdamW| o.m[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(m_of(&clone), m_then);
    assert_ne!(m_of(&fused), m_then);
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let g = vec![
        Tensor::new(&[3f32, 4.0], &CPU).unwrap(),
        Tensor::new(&[[12f32]], &CPU).unwrap(),
    ];
    let (norm, clipped) = clip_grad_norm(g.clone(), 2.0).unwrap();
    assert!((norm - 13.0).abs() < 1e-9);
    assert!((grad_norm(&clipped).unwrap() - 2.0).abs() < 1e-5);
    let a = clipped[0].to_vec1::<f32>().unwrap();
    assert!((a[0] - 6.0 / 13.0).abs() < 1e-6 && (a[1] - 8.0 / 13.0).abs() < 1e-6);
    // Below the limit the gradients pass through unchanged.
    let (_, same) = clip_grad_norm(g.clone(), 20.0).unwrap();
    assert_eq!(same[0].to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
    let nan = vec![Tensor::new(&[f32::NAN], &CPU).unwrap()];
    assert!(clip_grad_norm(nan, 1.0).is_err());
}

#[test]
fn learning_rate_warmup_and_cosine() {
    let cos = LrSchedule::Cosine { min_lr: 1e-4 };
    let lr = |s| lr_at(s, 110, 1e-3, 10, cos);
    assert!((lr(0) - 1e-4).abs() < 1e-15);
    assert!((lr(4) - 5e-4).abs() < 1e-15);
    assert!((lr(9) - 1e-3).abs() < 1e-15);
    assert!((lr(10) - 1e-3).abs() < 1e-15);
    // Halfway through the decay: the midpoint of peak and floor.
    assert!((lr(60) - 5.5e-4).abs() < 1e-15);
    // A quarter of the way: floor + (peak - floor) (1 + cos(pi/4)) / 2.
    let quarter = 1e-4 + 9e-4 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
    assert!((lr(35) - quarter).abs() < 1e-15);
    assert!(lr(109) > 1e-4 && lr(109) < 1.01e-4);
    assert_eq!(lr_at(50, 110, 1e-3, 10, LrSchedule::Constant), 1e-3);
    assert_eq!(lr_at(0, 110, 1e-3, 0, LrSchedule::Constant), 1e-3);
    assert_eq!("cosine:0.0001".parse::<LrSchedule>().unwrap(), cos);
    assert_eq!(cos.to_string().parse::<LrSchedule>().unwrap(), cos);
    assert!("linear".parse::<LrSchedule>().is_err());
}

#[test]
fn ema_update_formula() {
    let w = Tensor::new(&[1f32, 2.0], &CPU).unwrap();
    let mut ema = Ema::new(0.9, false, &[w]).unwrap();
    let w2 = Tensor::new(&[3f32, -2.0], &CPU).unwrap();
    ema.update(&[w2], 1).unwrap();
    let s = ema.shadow[0].to_vec1::<f32>().unwrap();
    assert!(
        (s[0] - 1.2).abs() < 1e-6 && (s[1] - 1.6).abs() < 1e-6,
        "{s:?}"
    );
    let warm = Ema {
        warmup: true,
        ..ema.clone()
    };
    assert!((warm.decay_at(1) - 2.0 / 11.0).abs() < 1e-15);
    assert_eq!(warm.decay_at(1000), 0.9);
    assert_eq!(ema.decay_at(1), 0.9);
    assert!(Ema::new(1.0, false, &[]).is_err());
}

/// A loss function that records the labels it is given, then runs the autograd one.
fn recording(seen: Rc<RefCell<Vec<u32>>>) -> flow_matching::train::LossFn {
    Box::new(move |m, x, t, l, target| {
        seen.borrow_mut().extend(match l.unwrap() {
            flow_matching::Condition::Labels(t) => t.to_vec1::<u32>().unwrap(),
            other => panic!("expected labels, got {other:?}"),
        });
        loss_and_grads(m, x, t, l, target)
    })
}

#[test]
fn classifier_free_guidance_label_dropping() {
    for (rate, want_null) in [(1.0, true), (0.0, false)] {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let config = TrainConfig {
            cond_drop_rate: rate,
            ..small_config(3, 0)
        };
        let mut t = Trainer::new(small_model(2), config, &CPU)
            .unwrap()
            .with_loss_fn(recording(seen.clone()));
        t.train(cond_data).unwrap();
        let seen = seen.borrow();
        assert_eq!(seen.len(), 3 * 64);
        if want_null {
            assert!(seen.iter().all(|&l| l == 2), "rate 1 kept a label");
        } else {
            assert!(seen.iter().all(|&l| l < 2), "rate 0 dropped a label");
            assert!(seen.contains(&0) && seen.contains(&1));
        }
    }
    let mask = Tensor::new(&[1f32, 0.0, 1.0], &CPU).unwrap();
    assert_eq!(drop_labels(&[0, 1, 1], &mask, 5).unwrap(), vec![5, 1, 5]);
}

#[test]
fn bad_configs_are_refused() {
    let cases: Vec<(TrainConfig, &str)> = vec![
        (
            TrainConfig {
                steps: 0,
                ..Default::default()
            },
            "invalid steps 0: at least 1",
        ),
        (
            TrainConfig {
                batch_size: 0,
                ..Default::default()
            },
            "invalid batch size 0: at least 1",
        ),
        (
            TrainConfig {
                lr: 0.0,
                ..Default::default()
            },
            "invalid learning rate 0: a finite number > 0",
        ),
        (
            TrainConfig {
                lr: -1e-3,
                ..Default::default()
            },
            "invalid learning rate -0.001: a finite number > 0",
        ),
        (
            TrainConfig {
                ema_decay: 1.0,
                ..Default::default()
            },
            "invalid EMA decay 1: a number in [0, 1)",
        ),
        (
            TrainConfig {
                ema_decay: -0.1,
                ..Default::default()
            },
            "invalid EMA decay -0.1: a number in [0, 1)",
        ),
        (
            TrainConfig {
                cond_drop_rate: 1.5,
                ..Default::default()
            },
            "invalid condition drop rate 1.5: a probability in [0, 1]",
        ),
        (
            TrainConfig {
                max_grad_norm: Some(0.0),
                ..Default::default()
            },
            "invalid max gradient norm 0: a finite number > 0 (or no clipping)",
        ),
        (
            TrainConfig {
                adamw: AdamWParams {
                    beta2: 1.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            "invalid beta2 1: a number in [0, 1)",
        ),
    ];
    for (config, msg) in cases {
        assert_eq!(config.validate().unwrap_err().to_string(), msg);
        assert_eq!(
            Trainer::new(small_model(0), config, &CPU)
                .unwrap_err()
                .to_string(),
            msg
        );
    }
}

#[test]
fn bad_data_gives_clear_errors() {
    let mut t = Trainer::new(small_model(0), small_config(2, 0), &CPU).unwrap();
    let err = t
        .step(&mut |_: &mut StdRng, _| Ok((Tensor::zeros((3, 2), DType::F32, &CPU)?, None)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "batch from the data function: expected shape [64, 2], got [3, 2]"
    );
    let err = t.step(&mut cond_data).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid labels 64 labels: none: the model is unconditional (num_classes = 0)"
    );
    let mut c = Trainer::new(small_model(2), small_config(2, 0), &CPU).unwrap();
    let err = c.step(&mut uncond_data).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid labels none: one label per sample: the model has num_classes = 2"
    );
    let err = c
        .step(&mut |rng: &mut StdRng, b| Ok((two_gaussians(rng, b).0, Some(vec![7; b]))))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("invalid label 7"), "{err}");
    assert_eq!(t.steps_done(), 0);
}

#[test]
fn a_finished_run_extends_like_a_longer_run_under_a_constant_schedule() {
    let path = tmp("extend.safetensors");
    let mut short = Trainer::new(small_model(0), small_config(10, 4), &CPU)
        .unwrap()
        .with_checkpoint(&path);
    short.train(uncond_data).unwrap();
    let extended = Trainer::resume(&path, &CPU)
        .unwrap()
        .with_steps(16)
        .unwrap()
        .train(uncond_data)
        .unwrap();
    let long = Trainer::new(small_model(0), small_config(16, 4), &CPU)
        .unwrap()
        .train(uncond_data)
        .unwrap();
    assert_eq!(extended.history, long.history);
    assert_eq!(flat(&extended.raw), flat(&long.raw));
    assert_eq!(flat(&extended.model), flat(&long.model));
}

#[test]
fn progress_reports_every_step_with_loss_lr_and_time_left() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let config = small_config(6, 3);
    let lrs: Vec<f64> = (0..6).map(|s| config.lr_at(s)).collect();
    let mut trainer = Trainer::new(small_model(0), config, &CPU)
        .unwrap()
        .with_progress(move |p: &flow_matching::progress::Progress| {
            sink.lock().unwrap().push(p.clone())
        });
    let out = trainer.train(uncond_data).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 6);
    for (i, p) in seen.iter().enumerate() {
        assert_eq!((p.stage, p.done, p.total), ("train", i + 1, 6));
        assert_eq!(p.loss, Some(out.history[i].1));
        assert_eq!(p.lr, Some(lrs[i]));
        assert!(p.remaining.is_some());
    }
    assert_eq!(seen[5].remaining, Some(std::time::Duration::ZERO));
}
