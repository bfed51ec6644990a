//! Conformance with the PyTorch reference cases in tests/data/golden/, through the library and
//! through the CLI.

#[path = "support/golden.rs"]
mod golden_support;

use candle_core::{Device, Tensor};
use flow_matching::{Diffusion, FlowMatching, SampleOptions, StepFn, TrainingBatch, VelocityMlp};
use golden_support::{assert_close, cases, golden_dir, Case};

fn neg_x_plus_t(x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    x.neg()?.broadcast_add(t)
}

fn run_library(case: &Case) -> flow_matching::Sample {
    let x_init = case.npy("x_init.npy");
    let fm = FlowMatching::new(case.x_dims()).unwrap();
    let opts = SampleOptions {
        return_all_steps: true,
        steps: Some(case.usize("steps")),
        method: Some(case.json["method"].as_str().unwrap().parse().unwrap()),
        x_init: Some(x_init),
        ..Default::default()
    };
    let batch = case.usize("batch");
    let model_name = case.json["model"].as_str().unwrap();
    if model_name == "analytic:neg_x_plus_t" {
        let mut f = neg_x_plus_t;
        return fm.sample(batch, &mut f, &Device::Cpu, &opts).unwrap();
    }
    assert_eq!(model_name, "velocity-mlp");
    let model = VelocityMlp::load(case.dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(model.config().num_classes, case.usize("num_classes"));
    let mut f: Box<dyn StepFn + '_> = match case.labels() {
        Some(l) => Box::new(model.with_labels(&l).unwrap()),
        None => Box::new(model.clone()),
    };
    fm.sample(batch, f.as_mut(), &Device::Cpu, &opts).unwrap()
}

#[test]
fn every_case_matches_through_the_library() {
    for dir in cases() {
        let case = Case::load(&dir);
        let out = run_library(&case);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert_close(
            &format!("{name} final"),
            &out.x,
            &case.npy("expected_final.npy"),
            case.tol(),
        );
        assert_close(
            &format!("{name} trajectory"),
            out.trajectory.as_ref().unwrap(),
            &case.npy("expected_traj.npy"),
            case.tol(),
        );
        assert_close(
            &format!("{name} times"),
            out.times.as_ref().unwrap(),
            &case.npy("expected_times.npy"),
            case.tol(),
        );
        assert_eq!(out.nfe, case.usize("steps"));
    }
}

#[test]
fn training_pair_and_loss_match_mlp_2d() {
    let case = Case::load(&golden_dir().join("mlp-2d"));
    let x = case.npy("train_x.npy");
    let t = case.npy("train_t.npy");
    let noise = case.npy("train_noise.npy");
    let mask = Tensor::zeros(x.dim(0).unwrap(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let batch = TrainingBatch::from_parts(&x, &t, &noise, mask).unwrap();
    assert_close(
        "noisy_x",
        &batch.noisy_x,
        &case.npy("expected_noisy_x.npy"),
        case.tol(),
    );
    assert_close(
        "target",
        &batch.target().unwrap(),
        &case.npy("expected_target.npy"),
        case.tol(),
    );

    let model = VelocityMlp::load(case.dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let pred = model.forward(&batch.noisy_x, &batch.t, None).unwrap();
    let fm = FlowMatching::new(2).unwrap();
    let loss = fm
        .compute_loss(&batch, &pred)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let expected = case.json["expected_loss"].as_f64().unwrap() as f32;
    let (abs, rel) = case.tol();
    assert!(
        (loss - expected).abs() <= abs + rel * expected.abs(),
        "loss {loss}, expected {expected}"
    );
}
