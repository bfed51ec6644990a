//! Sampling (velocity-mlp and waypoint transformer) and training on every kernel path this CPU
//! supports (portable, AVX2, AVX-512), each against candle's generic path and autograd. One
//! test in its own binary, because the path is a process-wide setting.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_matching::guidance::Guided;
use flow_matching::kernel::{kernel_path, set_kernel_path, KernelPath};
use flow_matching::model::{loss_and_grads, TransformerConfig, WaypointTransformer};
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
    for (num_classes, batch) in [(0, 70), (3, 9)] {
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

#[test]
fn sampling_and_training_match_the_generic_path_on_every_kernel_path() {
    let paths = KernelPath::supported();
    for &path in &paths {
        set_kernel_path(path).unwrap();
        assert_eq!(kernel_path(), path);
        sampling(path);
        transformer(path);
        training(path);
    }
    // A path the CPU lacks is refused with the supported ones named.
    if let Some(missing) = KernelPath::ALL.iter().find(|p| !p.is_supported()) {
        let err = set_kernel_path(*missing).unwrap_err().to_string();
        assert!(err.contains("portable"), "{err}");
    }
}
