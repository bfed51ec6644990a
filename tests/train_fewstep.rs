//! Coupling, training on given pairs, fine-tuning from a model, early stopping, the sizing
//! rule and reflow.

use candle_core::{DType, Device, Tensor};
use flow_matching::coupling::{pairing, Coupling, OtSolver};
use flow_matching::model::{Condition, TransformerConfig};
use flow_matching::reflow::{generate_pairs, reflow, ReflowOptions};
use flow_matching::train::{
    EarlyStopReport, EarlyStopping, Sizing, TrainConfig, TrainableModel, Trainer, Validation,
};
use flow_matching::{Method, VelocityMlp, VelocityMlpConfig, XDims};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

const CPU: Device = Device::Cpu;

fn small_model(num_classes: usize) -> VelocityMlpConfig {
    let mut c = VelocityMlpConfig::new(XDims::new(2).unwrap());
    (c.hidden, c.depth, c.num_freqs, c.cond_dim) = (32, 2, 4, 4);
    c.num_classes = num_classes;
    c
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 64,
        lr: 3e-3,
        ..TrainConfig::default()
    }
}

/// Two Gaussians at (±2, 0), std 0.2; the label is the component.
fn two_gaussians(rng: &mut StdRng, b: usize) -> (Tensor, Vec<u32>) {
    let mut xs = Vec::with_capacity(2 * b);
    let mut labels = Vec::with_capacity(b);
    for _ in 0..b {
        let k: u32 = rng.random_range(0..2);
        let n0: f32 = StandardNormal.sample(rng);
        let n1: f32 = StandardNormal.sample(rng);
        xs.push(if k == 0 { -2.0 } else { 2.0 } + 0.2 * n0);
        xs.push(0.2 * n1);
        labels.push(k);
    }
    (Tensor::from_vec(xs, (b, 2), &CPU).unwrap(), labels)
}

fn mean_sq_dist(x: &Tensor, z: &Tensor, perm: &[usize]) -> f64 {
    let idx = Tensor::from_vec(
        perm.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        perm.len(),
        &CPU,
    )
    .unwrap();
    let z = z.index_select(&idx, 0).unwrap();
    (x - z)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
        / perm.len() as f64
}

#[test]
fn ot_pairing_shortens_the_pairs_and_sinkhorn_comes_close() {
    let mut rng = StdRng::seed_from_u64(1);
    let (x, _) = two_gaussians(&mut rng, 256);
    let z = flow_matching::flow_matching::randn(&mut rng, &[256, 2], DType::F32, &CPU).unwrap();
    let id: Vec<usize> = (0..256).collect();
    let ind = mean_sq_dist(&x, &z, &id);
    let exact = mean_sq_dist(
        &x,
        &z,
        &pairing(Coupling::Ot(OtSolver::Exact), &x, &z, None).unwrap(),
    );
    let sink = mean_sq_dist(
        &x,
        &z,
        &pairing(Coupling::Ot(OtSolver::Sinkhorn), &x, &z, None).unwrap(),
    );
    // E|x - z|² = 4 + 0.04 + 2 for independent pairs; OT roughly halves it here.
    assert!((ind - 6.04).abs() < 0.8, "independent {ind}");
    assert!(exact < 0.6 * ind, "exact {exact} vs independent {ind}");
    assert!(
        sink >= exact - 1e-6 && sink < exact * 1.05,
        "sinkhorn {sink} vs exact {exact}"
    );
}

#[test]
fn coupling_round_trips_through_checkpoints() {
    let path = std::env::temp_dir().join(format!("fm-ot-{}.safetensors", std::process::id()));
    let cfg = TrainConfig {
        coupling: "ot".parse().unwrap(),
        ..config(3)
    };
    let mut t = Trainer::new(small_model(2), cfg.clone(), &CPU)
        .unwrap()
        .with_checkpoint(&path);
    t.train(|rng: &mut StdRng, b| {
        let (x, l) = two_gaussians(rng, b);
        Ok((x, Some(l)))
    })
    .unwrap();
    let back = Trainer::resume(&path, &CPU).unwrap();
    assert_eq!(back.config(), &cfg);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn ot_training_matches_independent_draws_and_learns() {
    // Coupling draws nothing: the first step's batch sees the same times as independent.
    let data = |rng: &mut StdRng, b: usize| Ok((two_gaussians(rng, b).0, None));
    let run = |coupling: Coupling| {
        let cfg = TrainConfig {
            coupling,
            ..config(300)
        };
        let mut t = Trainer::new(small_model(0), cfg, &CPU).unwrap();
        t.train(data).unwrap().history
    };
    let ind = run(Coupling::Independent);
    let ot = run("ot".parse().unwrap());
    let tail = |h: &[(usize, f32)]| h[250..].iter().map(|p| p.1 as f64).sum::<f64>() / 50.0;
    // OT pairs have a far smaller conditional variance, so the loss ends lower.
    assert!(
        tail(&ot) < 0.7 * tail(&ind),
        "ot {} vs independent {}",
        tail(&ot),
        tail(&ind)
    );
}

#[test]
fn pairs_are_used_as_given() {
    // Every pair is (z, z + (1, -2)): the velocity is the constant (1, -2) everywhere.
    let shift = Tensor::new(&[[1f32, -2.0]], &CPU).unwrap();
    let pairs = |rng: &mut StdRng, b: usize| {
        let z = flow_matching::flow_matching::randn(rng, &[b, 2], DType::F32, &CPU)?;
        let x = z.broadcast_add(&shift)?;
        Ok((x, z, None))
    };
    let mut t = Trainer::new(small_model(0), config(400), &CPU).unwrap();
    let out = t.train_pairs(pairs).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let x = flow_matching::flow_matching::randn(&mut rng, &[100, 2], DType::F32, &CPU).unwrap();
    let tt = Tensor::from_vec((0..100).map(|i| i as f32 / 100.0).collect(), 100, &CPU).unwrap();
    let v = out.raw.forward(&x, &tt, None).unwrap();
    let err = v
        .broadcast_sub(&shift)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap();
    let err = err.to_scalar::<f32>().unwrap();
    assert!(err < 0.1, "mean |v - (1, -2)| = {err}");
}

#[test]
fn from_model_starts_at_the_models_weights_and_leaves_it_alone() {
    let first = Trainer::new(small_model(2), config(1), &CPU)
        .unwrap()
        .ema_model()
        .unwrap();
    let before: Vec<Vec<f32>> = flat(&first);
    let mut t = Trainer::from_model(&first, config(5), &CPU).unwrap();
    assert_eq!(flat(&t.ema_model().unwrap()), before);
    assert_eq!(flat(&t.raw_model()), before);
    t.train(|rng: &mut StdRng, b| {
        let (x, l) = two_gaussians(rng, b);
        Ok((x, Some(l)))
    })
    .unwrap();
    assert_eq!(flat(&first), before, "training changed the initial model");
    assert_ne!(flat(&t.raw_model()), before);
}

fn flat(m: &VelocityMlp) -> Vec<Vec<f32>> {
    m.tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Checks that early stopping kept the model that scored best (it scores the same again);
/// returns that lowest validation loss.
fn kept_best<M: TrainableModel>(report: &EarlyStopReport, val: &Validation, model: &M) -> f64 {
    let min = report
        .validation
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(report.best.1, min);
    assert!((val.loss(model).unwrap() - min).abs() < 1e-9);
    min
}

#[test]
fn early_stopping_keeps_the_best_weights() {
    let mut rng = StdRng::seed_from_u64(7);
    let (held, _) = two_gaussians(&mut rng, 200);
    let val = Validation::new(&held, None, 2, 0).unwrap();
    let stop = EarlyStopping {
        every: 20,
        patience: 2,
        min_rel_improvement: 0.0,
    };
    let mut t = Trainer::new(small_model(0), config(400), &CPU).unwrap();
    let (out, report) = t
        .train_early_stopping(
            |rng: &mut StdRng, b| Ok((two_gaussians(rng, b).0, None)),
            &val,
            &stop,
        )
        .unwrap();
    kept_best(&report, &val, &out.model);
    // The loss falls at first, so the best is not the first evaluation.
    assert!(report.best.0 > 20, "{report:?}");
    if report.stopped_early {
        assert!(out.history.len() < 400);
    }
    let bad = EarlyStopping { every: 0, ..stop };
    let e = t
        .train_early_stopping(
            |rng: &mut StdRng, b| Ok((two_gaussians(rng, b).0, None)),
            &val,
            &bad,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("early stopping") && e.contains("at least 1"),
        "{e}"
    );
}

/// Sequences [4, 2] whose level is set by a 1-number condition c: x[l] = (c, c * l / 4).
fn cond_sequences(rng: &mut StdRng, b: usize) -> (Tensor, Condition) {
    let (mut x, mut c) = (Vec::with_capacity(8 * b), Vec::with_capacity(b));
    for _ in 0..b {
        let v: f32 = rng.random_range(-1.0..1.0);
        for l in 0..4 {
            let n: f32 = StandardNormal.sample(rng);
            x.extend([v + 0.05 * n, v * l as f32 / 4.0]);
        }
        c.push(v);
    }
    (
        Tensor::from_vec(x, (b, 4, 2), &CPU).unwrap(),
        Condition::features(Tensor::from_vec(c, (b, 1), &CPU).unwrap()),
    )
}

#[test]
fn early_stopping_trains_a_conditional_transformer_and_keeps_its_best_weights() {
    let mut rng = StdRng::seed_from_u64(3);
    let (held, held_c) = cond_sequences(&mut rng, 64);
    let val = Validation::with_condition(&held, Some(held_c.clone()), 2, 0).unwrap();
    assert_eq!(val.len(), 128);
    let cfg = TransformerConfig {
        width: 16,
        heads: 2,
        depth: 1,
        mlp_hidden: 32,
        cond_dims: Some(XDims::new(1).unwrap()),
        ..TransformerConfig::new(XDims::new([4, 2]).unwrap())
    };
    let stop = EarlyStopping {
        every: 10,
        patience: 3,
        min_rel_improvement: 0.0,
    };
    let mut t = Trainer::new(cfg, config(60), &CPU).unwrap();
    let untrained = val.loss(&t.ema_model().unwrap()).unwrap();
    let (out, report) = t
        .train_early_stopping(
            |rng: &mut StdRng, b| Ok(cond_sequences(rng, b)),
            &val,
            &stop,
        )
        .unwrap();
    // The returned model is the one that scored best, under the held-out condition.
    let min = kept_best(&report, &val, &out.model);
    assert!(
        min < untrained,
        "held-out loss {min} not below the untrained {untrained}"
    );
    // The condition's rows must match the samples'.
    let e = Validation::with_condition(&held, Some(held_c.narrow(0, 10).unwrap()), 2, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("10 rows") && e.contains("(64)"), "{e}");
}

#[test]
fn sizing_follows_the_documented_rule() {
    let s = Sizing::for_data(None, 2);
    assert_eq!(
        (s.hidden, s.depth, s.batch_size, s.steps),
        (128, 3, 256, 20_000)
    );
    let s = Sizing::for_data(Some(100), 2);
    assert_eq!((s.batch_size, s.steps), (100, 2_000));
    let s = Sizing::for_data(None, 784);
    assert_eq!((s.hidden, s.depth, s.batch_size), (512, 4, 128));
    assert_eq!(s.to_string(), "hidden 512, depth 4, batch 128, 8000 steps");
}

#[test]
fn reflow_keeps_the_config_and_the_labels() {
    let first = Trainer::new(small_model(2), config(1), &CPU)
        .unwrap()
        .ema_model()
        .unwrap();
    let pairs = generate_pairs(&first, 7, &Method::Rk4, 4, 0, 1.0).unwrap();
    assert_eq!(pairs.labels, Some(vec![0, 1, 0, 1, 0, 1, 0]));
    assert_eq!(pairs.nfe, 16);
    let opts = ReflowOptions {
        pairs: 64,
        solver_steps: 4,
        rounds: 2,
        train: TrainConfig {
            steps: 5,
            batch_size: 16,
            ..ReflowOptions::default().train
        },
        ..ReflowOptions::default()
    };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    let (m, rounds) = reflow(&first, &opts, move |p| log.lock().unwrap().push(p.done)).unwrap();
    assert_eq!(m.config(), first.config());
    assert_eq!(rounds.len(), 2);
    // Each round reports its five steps.
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]);
    let bad = ReflowOptions { rounds: 0, ..opts };
    let e = reflow(&first, &bad, |_| {}).unwrap_err().to_string();
    assert!(e.contains("--rounds"), "{e}");
}
