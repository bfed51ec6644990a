//! Sampling (velocity-mlp and waypoint transformer) and training (both models) on every kernel
//! path this CPU supports (portable, AVX2, AVX-512), each against candle's generic path and
//! autograd. One test in its own binary, because the path is a process-wide setting.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use flow_matching::guidance::Guided;
use flow_matching::kernel::{kernel_path, set_kernel_path, KernelPath};
use flow_matching::model::{
    loss_and_grads, transformer_grad, CondNorm, Condition, TransformerConfig, WaypointTransformer,
};
use flow_matching::train::{autograd_loss_and_grads, TrainableModel};
use flow_matching::{
    Diffusion, FlowMatching, Result, SampleOptions, StepFn, VelocityMlp, VelocityMlpConfig, XDims,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Hides the fast path, so `FlowMatching::sample` takes the generic tensor path.
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

/// Hidden 48: one 32-wide and one 16-wide panel on AVX-512, three 16-wide ones on AVX2.
fn config(num_classes: usize) -> VelocityMlpConfig {
    VelocityMlpConfig {
        hidden: 48,
        depth: 3,
        num_classes,
        num_freqs: 4,
        cond_dim: 5,
        ..VelocityMlpConfig::new(XDims::new(2).unwrap())
    }
}

/// `model` written to a file and read back: a loaded model packs its hidden weights once and
/// runs single rows through the packed matvec.
fn loaded(model: &VelocityMlp, name: &str) -> VelocityMlp {
    let p = std::env::temp_dir().join(format!(
        "kernel-paths-{}-{name}.safetensors",
        std::process::id()
    ));
    model.save(&p).unwrap();
    let m = VelocityMlp::load(&p, &Device::Cpu).unwrap();
    std::fs::remove_file(&p).unwrap();
    m
}

fn sampling(path: KernelPath) {
    let dev = Device::Cpu;
    let init = VelocityMlp::init(config(0), &VarMap::new(), &dev, 2).unwrap();
    let init_cond = VelocityMlp::init(config(3), &VarMap::new(), &dev, 3).unwrap();
    for (mut model, cond) in [
        (init.detach(), init_cond.detach()),
        (loaded(&init, "plain"), loaded(&init_cond, "cond")),
    ] {
        sampling_with(path, &mut model, &cond);
    }
}

fn sampling_with(path: KernelPath, model: &mut VelocityMlp, cond: &VelocityMlp) {
    let dev = Device::Cpu;
    let fm = FlowMatching::new(2).unwrap();
    for b in [1, 5, 70] {
        for method in ["euler", "rk4"] {
            let opts = SampleOptions {
                method: Some(method.parse().unwrap()),
                ..SampleOptions::seeded(b as u64)
            };
            let what = format!("{path:?} {method} batch {b}");
            let fast = fm.sample(b, model, &dev, &opts).unwrap();
            let generic = fm.sample(b, &mut Generic(model), &dev, &opts).unwrap();
            assert_close(&what, &vec(&fast.x), &vec(&generic.x), 5e-6, 5e-5);
            let labels: Vec<u32> = (0..b as u32).map(|i| i % 4).collect();
            let mut g = Guided::new(cond, &labels, 2.0).unwrap();
            let fast = fm.sample(b, &mut g, &dev, &opts).unwrap();
            let generic = fm.sample(b, &mut Generic(&mut g), &dev, &opts).unwrap();
            assert_close(
                &format!("guided {what}"),
                &vec(&fast.x),
                &vec(&generic.x),
                5e-6,
                5e-5,
            );
        }
    }
}

/// The waypoint transformer's fused path against its tensor path: tokens and heads that fill
/// the 16-wide tiles exactly (`[64, 2]`, 4 heads of 16) and ones that are padded (`[10, 3]`, 3
/// heads of 12), one row and several (the rows split over threads).
fn transformer(path: KernelPath) {
    let dev = Device::Cpu;
    for (x_dims, width, heads) in [(vec![64, 2], 64, 4), (vec![10, 3], 36, 3)] {
        let cfg = TransformerConfig {
            width,
            heads,
            depth: 2,
            mlp_hidden: 48,
            cond_dims: Some(XDims::new(5).unwrap()),
            ..TransformerConfig::new(XDims::new(x_dims.clone()).unwrap())
        };
        let model = WaypointTransformer::init(cfg, &VarMap::new(), &dev, 7).unwrap();
        let fm = FlowMatching::new(x_dims.clone()).unwrap();
        for b in [1, 6] {
            let mut rng = StdRng::seed_from_u64(b as u64);
            let cond =
                flow_matching::flow_matching::randn(&mut rng, &[b, 5], DType::F32, &dev).unwrap();
            let opts = SampleOptions::seeded(b as u64);
            let mut step = model.with_condition(&cond).unwrap();
            let fast = fm.sample(b, &mut step, &dev, &opts).unwrap();
            let generic = fm.sample(b, &mut Generic(&mut step), &dev, &opts).unwrap();
            let what = format!("{path:?} transformer {x_dims:?} batch {b}");
            assert_close(&what, &vec(&fast.x), &vec(&generic.x), 1e-5, 1e-4);
        }
    }
}

fn training(path: KernelPath) {
    let dev = Device::Cpu;
    // 600 rows: each thread's share runs as a full block of 256 rows and a partial one, whose
    // gradients add up.
    for (num_classes, batch) in [(0, 70), (3, 9), (3, 600)] {
        let varmap = VarMap::new();
        let model = VelocityMlp::init(config(num_classes), &varmap, &dev, 4).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let randn = |rng: &mut StdRng| {
            flow_matching::flow_matching::randn(rng, &[batch, 2], DType::F32, &dev).unwrap()
        };
        let (x, target) = (randn(&mut rng), randn(&mut rng));
        let tv: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
        let t = Tensor::from_vec(tv, batch, &dev).unwrap();
        let labels = (num_classes > 0).then(|| {
            let l: Vec<u32> = (0..batch as u32).map(|i| i % 4).collect();
            Tensor::from_vec(l, batch, &dev).unwrap()
        });
        let (loss, grads) = loss_and_grads(&model, &x, &t, labels.as_ref(), &target).unwrap();
        let v = model.forward(&x, &t, labels.as_ref()).unwrap();
        let want_loss = (v - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let want = want_loss.backward().unwrap();
        let want_loss = want_loss.to_scalar::<f32>().unwrap();
        assert!(
            (loss - want_loss).abs() <= 1e-6 + 1e-5 * want_loss,
            "{path:?}: {loss} vs {want_loss}"
        );
        let data = varmap.data().lock().unwrap();
        for (k, g) in &grads {
            let w = vec(want.get(data[k].as_tensor()).unwrap());
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let what = format!("{path:?} classes {num_classes} grad {k}");
            assert_close(&what, &vec(g), &w, 1e-6 + 1e-4 * scale, 1e-4);
        }
    }
}

/// A model whose every trainable weight is a `Var` perturbed away from the initialisation
/// (AdaLN-zero starts every block as the identity, which would leave most gradients zero).
fn perturbed_transformer(cfg: TransformerConfig, seed: u64) -> WaypointTransformer {
    let dev = Device::Cpu;
    let init = WaypointTransformer::init(cfg, &VarMap::new(), &dev, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut map = HashMap::new();
    for (k, t) in init.tensors() {
        if TransformerConfig::is_fixed(&k) {
            map.insert(k, t);
            continue;
        }
        let fan_in = if t.rank() == 2 { t.dims()[1] } else { 16 };
        let s = 0.5 / (fan_in as f32).sqrt();
        let v: Vec<f32> = (0..t.elem_count())
            .map(|_| rng.random_range(-s..s))
            .collect();
        let noisy = (t.detach() + Tensor::from_vec(v, t.dims(), &dev).unwrap()).unwrap();
        map.insert(k, Var::from_tensor(&noisy).unwrap().as_tensor().clone());
    }
    let cfg = init.config().clone();
    WaypointTransformer::from_tensors(cfg, &map, "perturbed".as_ref()).unwrap()
}

/// The waypoint transformer's fused loss and gradients against candle's autograd: a
/// conditional model with odd sizes (L = 10, 3 heads of 12, a non-trivial condition
/// normalisation) under a keep mask that drops some rows and under the null condition, and an
/// unconditional one whose tiles are exact (`[64, 2]`, heads of 16), each at a batch that runs
/// on one thread, one split unevenly over two, and one whose threads take their rows in several
/// blocks of about 512 tokens (the last one short).
fn transformer_training(path: KernelPath) {
    let dev = Device::Cpu;
    let cond_cfg = TransformerConfig {
        width: 36,
        depth: 2,
        heads: 3,
        mlp_hidden: 40,
        num_freqs: 3,
        cond_dims: Some(XDims::new(5).unwrap()),
        cond_norm: Some(CondNorm {
            mean: vec![0.5, -1.0, 0.0, 2.0, 0.1],
            std: vec![2.0, 0.5, 1.0, 3.0, 1.5],
        }),
        ..TransformerConfig::new(XDims::new([10, 3]).unwrap())
    };
    let plain_cfg = TransformerConfig {
        width: 32,
        depth: 2,
        heads: 2,
        mlp_hidden: 48,
        num_freqs: 4,
        ..TransformerConfig::new(XDims::new([64, 2]).unwrap())
    };
    for (cfg, batches) in [(cond_cfg, [7, 70, 150]), (plain_cfg, [3, 9, 20])] {
        let model = perturbed_transformer(cfg.clone(), 11);
        let (l, c) = (cfg.len(), cfg.channels());
        for b in batches {
            let mut rng = StdRng::seed_from_u64(b as u64);
            let randn = |rng: &mut StdRng, dims: &[usize]| {
                flow_matching::flow_matching::randn(rng, dims, DType::F32, &dev).unwrap()
            };
            let (x, target) = (randn(&mut rng, &[b, l, c]), randn(&mut rng, &[b, l, c]));
            let tv: Vec<f32> = (0..b).map(|_| rng.random::<f32>()).collect();
            let t = Tensor::from_vec(tv, b, &dev).unwrap();
            let mut conds = vec![None];
            if cfg.cond_dims.is_some() {
                let values = randn(&mut rng, &[b, 5]);
                let keep: Vec<f32> = (0..b).map(|i| (i % 3 != 1) as u8 as f32).collect();
                conds = vec![
                    Some(Condition::Features {
                        values: values.clone(),
                        keep: Some(Tensor::from_vec(keep, b, &dev).unwrap()),
                    }),
                    Some(Condition::features(values)),
                    None,
                ];
            }
            for cond in &conds {
                let what = format!(
                    "{path:?} transformer {:?} batch {b} cond {}",
                    cfg.x_dims.dims(),
                    match cond {
                        Some(Condition::Features { keep: Some(_), .. }) => "dropped rows",
                        Some(_) => "all kept",
                        None => "none",
                    }
                );
                let cond = cond.as_ref();
                let (loss, grads) =
                    transformer_grad::loss_and_grads(&model, &x, &t, cond, &target).unwrap();
                let (want_loss, want) =
                    autograd_loss_and_grads(&model, &x, &t, cond, &target).unwrap();
                assert!(
                    (loss - want_loss).abs() <= 1e-6 + 1e-5 * want_loss,
                    "{what}: loss {loss} vs {want_loss}"
                );
                // Every trainable tensor, in file order; one the forward does not reach (the
                // condition's layers under the null condition) has no autograd gradient and a
                // zero fused one.
                let keys: Vec<String> = model
                    .tensors()
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| !TransformerConfig::is_fixed(k))
                    .collect();
                assert_eq!(
                    grads.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
                    keys,
                    "{what}"
                );
                for (k, g) in &grads {
                    let got = vec(g);
                    let w = match want.iter().find(|(n, _)| n == k) {
                        Some((_, w)) => vec(w),
                        None => vec![0.0; got.len()],
                    };
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let reached = want.iter().any(|(n, _)| n == k);
                    assert!(!reached || scale > 0.0, "{what}: {k} has a zero gradient");
                    // Within 2e-5 of the tensor's largest gradient (the largest error seen on every
                    // path is about 1e-6 of it).
                    let abs = 2e-5 * scale.max(1e-2);
                    assert_close(&format!("{what} grad {k}"), &got, &w, abs, 1e-4);
                }
                // The trainer's entry point takes the fused step on the CPU.
                let (trait_loss, trait_grads) =
                    model.loss_and_grads(&x, &t, cond, &target).unwrap();
                assert_eq!(trait_loss, loss, "{what}");
                assert_eq!(vec(&trait_grads[0].1), vec(&grads[0].1), "{what}");
            }
        }
    }
}

#[test]
fn sampling_and_training_match_the_generic_path_on_every_kernel_path() {
    let paths = KernelPath::supported();
    for &path in &paths {
        set_kernel_path(path).unwrap();
        assert_eq!(kernel_path(), path);
        sampling(path);
        transformer(path);
        training(path);
        transformer_training(path);
    }
    // A path the CPU lacks is refused with the supported ones named.
    if let Some(missing) = KernelPath::ALL.iter().find(|p| !p.is_supported()) {
        let err = set_kernel_path(*missing).unwrap_err().to_string();
        assert!(err.contains("portable"), "{err}");
    }
}
