//! The waypoint transformer against its PyTorch reference (tests/data/golden/transformer-*,
//! made by python/waypoint_transformer.py), its fused CPU path against its tensor path,
//! training through the shared trainer, and a Rust-written file read back by PyTorch.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flow_matching::io::{read_npy, write_npy};
use flow_matching::model::{
    Condition, TransformerConditioned, TransformerConfig, WaypointTransformer,
};
use flow_matching::train::{TrainConfig, Trainer};
use flow_matching::{Diffusion, FlowMatching, SampleOptions, StepFn, XDims};

const CPU: Device = Device::Cpu;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(name)
}

fn npy(dir: &Path, name: &str) -> Tensor {
    read_npy(dir.join(name), &CPU).unwrap()
}

fn assert_close(what: &str, got: &Tensor, expected: &Tensor, abs: f32, rel: f32) {
    assert_eq!(got.dims(), expected.dims(), "{what}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (a, b)) in g.iter().zip(&e).enumerate() {
        assert!(
            (a - b).abs() <= abs + rel * b.abs(),
            "{what}: element {i} is {a}, expected {b} (tolerance {abs} + {rel} * |expected|)"
        );
    }
}

/// The tensor path only (no fused CPU path): a step function without `fast_velocity`.
struct TensorPath<'a>(&'a WaypointTransformer, Option<Condition>);

impl StepFn for TensorPath<'_> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> flow_matching::Result<Tensor> {
        self.0.forward_cond(x, t, self.1.as_ref())
    }
}

#[test]
fn pytorch_golden_velocities_match() {
    let dir = golden("transformer-cond");
    let model = WaypointTransformer::load(dir.join("model.safetensors"), &CPU).unwrap();
    assert_eq!(model.config().cond_dims.as_ref().unwrap().dims(), &[5]);
    let (x, t, c, keep) = (
        npy(&dir, "x.npy"),
        npy(&dir, "t.npy"),
        npy(&dir, "cond.npy"),
        npy(&dir, "keep.npy"),
    );
    let cond = Condition::Features {
        values: c,
        keep: Some(keep),
    };
    let v = model.forward_cond(&x, &t, Some(&cond)).unwrap();
    assert_close("v", &v, &npy(&dir, "expected_v.npy"), 1e-5, 1e-4);
    let v_null = model.forward_cond(&x, &t, None).unwrap();
    assert_close(
        "v_null",
        &v_null,
        &npy(&dir, "expected_v_null.npy"),
        1e-5,
        1e-4,
    );
}

fn golden_sample(fast: bool) -> flow_matching::Sample {
    let dir = golden("transformer-cond");
    let model = WaypointTransformer::load(dir.join("model.safetensors"), &CPU).unwrap();
    let c = npy(&dir, "cond.npy");
    let opts = SampleOptions {
        return_all_steps: true,
        steps: Some(4),
        x_init: Some(npy(&dir, "x_init.npy")),
        ..Default::default()
    };
    let fm = FlowMatching::new([16, 2]).unwrap();
    if fast {
        let mut f = model.with_condition(&c).unwrap();
        fm.sample(6, &mut f, &CPU, &opts).unwrap()
    } else {
        let mut f = TensorPath(&model, Some(Condition::features(c)));
        fm.sample(6, &mut f, &CPU, &opts).unwrap()
    }
}

#[test]
fn pytorch_golden_euler_trajectory_matches_on_both_paths() {
    let dir = golden("transformer-cond");
    for fast in [false, true] {
        let s = golden_sample(fast);
        let what = if fast { "fused path" } else { "tensor path" };
        assert_close(what, &s.x, &npy(&dir, "expected_final.npy"), 1e-5, 1e-4);
        assert_close(
            what,
            s.trajectory.as_ref().unwrap(),
            &npy(&dir, "expected_traj.npy"),
            1e-5,
            1e-4,
        );
    }
}

fn small_config(cond: bool) -> TransformerConfig {
    TransformerConfig {
        width: 32,
        depth: 2,
        heads: 4,
        mlp_hidden: 64,
        num_freqs: 4,
        cond_dims: cond.then(|| XDims::new(3).unwrap()),
        ..TransformerConfig::new(XDims::new([8, 2]).unwrap())
    }
}

/// A toy conditional sequence task: row i is a ramp `c0 * k / 8` in channel 0 and a constant
/// `c1` in channel 1, plus a bimodal sign drawn at random, with noise.
fn seq_data(rng: &mut rand::rngs::StdRng, b: usize) -> flow_matching::Result<(Tensor, Condition)> {
    use rand::Rng;
    let mut x = Vec::with_capacity(b * 16);
    let mut c = Vec::with_capacity(b * 3);
    for _ in 0..b {
        let (c0, c1): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0));
        let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
        for k in 0..8 {
            x.push(sign * c0 * k as f32 / 8.0 + 0.05 * rng.random_range(-1.0f32..1.0));
            x.push(c1);
        }
        c.extend([c0, c1, 0.5]);
    }
    Ok((
        Tensor::from_vec(x, (b, 8, 2), &CPU)?,
        Condition::features(Tensor::from_vec(c, (b, 3), &CPU)?),
    ))
}

/// A model with every weight non-zero (AdaLN-zero starts every block as the identity), scaled
/// like a trained model's so the comparison is well-conditioned.
fn perturbed(config: TransformerConfig, seed: u64) -> WaypointTransformer {
    use rand::Rng;
    let model = WaypointTransformer::init(config, &candle_nn::VarMap::new(), &CPU, seed)
        .unwrap()
        .detach();
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(seed);
    let map = model
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            if TransformerConfig::is_fixed(&k) {
                return (k, t);
            }
            let fan_in = if t.rank() == 2 { t.dims()[1] } else { 16 };
            let s = 0.4 / (fan_in as f32).sqrt();
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| rng.random_range(-s..s))
                .collect();
            let noise = Tensor::from_vec(v, t.dims(), &CPU).unwrap();
            (k, (t + noise).unwrap())
        })
        .collect();
    WaypointTransformer::from_tensors(model.config().clone(), &map, Path::new("perturbed")).unwrap()
}

#[test]
fn fused_path_matches_tensor_path_with_and_without_condition() {
    let model = perturbed(small_config(true), 3);
    let mut rng = rand::SeedableRng::seed_from_u64(1);
    let (_, cond) = seq_data(&mut rng, 6).unwrap();
    let Condition::Features { values, .. } = &cond else {
        unreachable!()
    };
    // One velocity, several times, through the slice interface.
    let x = FlowMatching::new([8, 2])
        .unwrap()
        .noise(6, Some(4), DType::F32, &CPU)
        .unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (c, name) in [
        (Some(cond.clone()), "conditional"),
        (None, "null condition"),
    ] {
        let mut step = TransformerConditioned {
            model: &model,
            cond: c.clone(),
        };
        let mut fast = step
            .fast_velocity()
            .expect("a CPU f32 model has a fused path");
        for t in [0.0f32, 0.3, 0.95] {
            let mut out = vec![0.0; xs.len()];
            fast.velocity(&xs, t, &mut out).unwrap();
            let got = Tensor::from_vec(out, x.dims(), &CPU).unwrap();
            let tt = Tensor::full(t, 6, &CPU).unwrap();
            let want = model.forward_cond(&x, &tt, c.as_ref()).unwrap();
            assert_close(&format!("{name} at t = {t}"), &got, &want, 2e-5, 1e-4);
        }
    }
    let fm = FlowMatching::new([8, 2]).unwrap();
    let opts = SampleOptions::seeded(5);
    let fast = fm
        .sample(6, &mut model.with_condition(values).unwrap(), &CPU, &opts)
        .unwrap();
    let slow = fm
        .sample(6, &mut TensorPath(&model, Some(cond.clone())), &CPU, &opts)
        .unwrap();
    assert_close("10 Euler steps", &fast.x, &slow.x, 1e-4, 1e-4);
}

fn train_config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 32,
        lr: 3e-3,
        checkpoint_every: 0,
        ..TrainConfig::default()
    }
}

#[test]
fn trains_with_the_shared_trainer_and_resumes_exactly() {
    let mut trainer = Trainer::new(small_config(true), train_config(40), &CPU).unwrap();
    let out = trainer.train(seq_data).unwrap();
    let first: f32 = out.history[..5].iter().map(|h| h.1).sum::<f32>() / 5.0;
    let last: f32 = out.history[35..].iter().map(|h| h.1).sum::<f32>() / 5.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");

    // Resume: 20 steps, checkpoint, 20 more equals 40 straight.
    let dir = std::env::temp_dir().join(format!("fm-transformer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("half.safetensors");
    let mut half = Trainer::new(small_config(true), train_config(20), &CPU).unwrap();
    half.train(seq_data).unwrap();
    half.save_checkpoint(&ck).unwrap();
    let mut resumed = Trainer::<WaypointTransformer>::resume_model(&ck, &CPU)
        .unwrap()
        .with_steps(40)
        .unwrap();
    let rest = resumed.train(seq_data).unwrap();
    let a = out.model.tensors();
    let b = rest.model.tensors();
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k} differs after resume");
    }
    // The checkpoint is a plain model file too: it loads as the EMA model.
    let loaded = WaypointTransformer::load(&ck, &CPU).unwrap();
    assert_eq!(loaded.config(), half.model().config());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fused_training_steps_follow_autograd_and_lower_the_loss() {
    // The trainer's default loss on the CPU is the fused step; the same run through candle's
    // autograd takes the same steps (to float rounding, which AdamW carries forward), with
    // condition dropout (the default 10%) at batch 32.
    let cfg = small_config(true);
    let mut fused = Trainer::new(cfg.clone(), train_config(30), &CPU).unwrap();
    let a = fused.train(seq_data).unwrap();
    let mut reference = Trainer::new(cfg, train_config(30), &CPU)
        .unwrap()
        .with_loss_fn(Box::new(
            flow_matching::train::autograd_loss_and_grads::<WaypointTransformer>,
        ));
    let b = reference.train(seq_data).unwrap();
    for ((s, x), (_, y)) in a.history.iter().zip(&b.history).take(10) {
        assert!(
            (x - y).abs() <= 1e-4 * y.abs(),
            "step {s}: fused {x}, autograd {y}"
        );
    }
    let first: f32 = a.history[..5].iter().map(|h| h.1).sum::<f32>() / 5.0;
    let last: f32 = a.history[25..].iter().map(|h| h.1).sum::<f32>() / 5.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
}

#[test]
fn refuses_wrong_conditions_and_shapes() {
    let model =
        WaypointTransformer::init(small_config(true), &candle_nn::VarMap::new(), &CPU, 0).unwrap();
    let bad = Tensor::zeros((6, 4), DType::F32, &CPU).unwrap();
    let e = model.with_condition(&bad).unwrap_err().to_string();
    assert!(e.contains("[N, 3]") && e.contains("[6, 4]"), "{e}");
    let x = Tensor::zeros((2, 8, 2), DType::F32, &CPU).unwrap();
    let t = Tensor::zeros(2, DType::F32, &CPU).unwrap();
    let labels = Condition::labels(&[0, 1], &CPU).unwrap();
    let e = model
        .forward_cond(&x, &t, Some(&labels))
        .unwrap_err()
        .to_string();
    assert!(e.contains("class labels"), "{e}");
    let plain =
        WaypointTransformer::init(small_config(false), &candle_nn::VarMap::new(), &CPU, 0).unwrap();
    let e = plain.with_condition(&bad).unwrap_err().to_string();
    assert!(e.contains("trained without one"), "{e}");
    let cfg = TransformerConfig::new(XDims::new(128).unwrap());
    let e = WaypointTransformer::init(cfg, &candle_nn::VarMap::new(), &CPU, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[L, C]"), "{e}");
}

/// A model trained and saved here samples the same in PyTorch (skipped without Python).
#[test]
fn rust_written_file_loads_in_pytorch() {
    let python = std::env::var("FM_PYTHON").unwrap_or_else(|_| "/work/venv/bin/python".into());
    if !Path::new(&python).exists() {
        eprintln!("skipped: no Python at {python} (set FM_PYTHON)");
        return;
    }
    let mut trainer = Trainer::new(small_config(true), train_config(10), &CPU).unwrap();
    let out = trainer.train(seq_data).unwrap();
    let dir = std::env::temp_dir().join(format!("fm-transformer-py-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model_path = dir.join("model.safetensors");
    // The checkpoint (EMA under the format's keys, training state under other keys).
    trainer.save_checkpoint(&model_path).unwrap();
    let mut rng = rand::SeedableRng::seed_from_u64(9);
    let (_, cond) = seq_data(&mut rng, 6).unwrap();
    let Condition::Features { values, .. } = &cond else {
        unreachable!()
    };
    let fm = FlowMatching::new([8, 2]).unwrap();
    let x0 = fm.noise(6, Some(2), DType::F32, &CPU).unwrap();
    let opts = SampleOptions {
        x_init: Some(x0.clone()),
        steps: Some(10),
        ..Default::default()
    };
    let s = fm
        .sample(
            6,
            &mut out.model.with_condition(values).unwrap(),
            &CPU,
            &opts,
        )
        .unwrap();
    write_npy(dir.join("x0.npy"), &x0).unwrap();
    write_npy(dir.join("c.npy"), values).unwrap();
    write_npy(dir.join("final.npy"), &s.x).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/waypoint_transformer.py");
    let res = std::process::Command::new(&python)
        .arg(script)
        .arg("check")
        .arg(&model_path)
        .args(["--x-init", dir.join("x0.npy").to_str().unwrap()])
        .args(["--cond", dir.join("c.npy").to_str().unwrap()])
        .args(["--expected", dir.join("final.npy").to_str().unwrap()])
        .args(["--steps", "10"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&res.stdout).to_string() + &String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "PyTorch disagrees: {text}");
    assert!(text.contains(": ok"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}
