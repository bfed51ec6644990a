//! Conformance with the PyTorch reference cases in tests/data/golden/, through the library and
//! through the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use flow_matching::io::read_npy;
use flow_matching::{Diffusion, FlowMatching, SampleOptions, StepFn, TrainingBatch, VelocityMlp};
use serde_json::Value;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").exists())
        // The waypoint transformer's cases have their own test file (tests/transformer.rs).
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("transformer-")
        })
        .collect();
    v.sort();
    assert_eq!(v.len(), 4, "expected the four golden cases");
    v
}

struct Case {
    dir: PathBuf,
    json: Value,
}

impl Case {
    fn load(dir: &Path) -> Case {
        let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
        Case {
            dir: dir.to_path_buf(),
            json: serde_json::from_str(&text).unwrap(),
        }
    }
    fn npy(&self, name: &str) -> Tensor {
        read_npy(self.dir.join(name), &Device::Cpu).unwrap()
    }
    fn usize(&self, key: &str) -> usize {
        self.json[key].as_u64().unwrap() as usize
    }
    fn tol(&self) -> (f32, f32) {
        let t = &self.json["tolerance"];
        (
            t["abs"].as_f64().unwrap() as f32,
            t["rel"].as_f64().unwrap() as f32,
        )
    }
    fn labels(&self) -> Option<Vec<u32>> {
        self.json["labels"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as u32).collect())
    }
    fn x_dims(&self) -> Vec<usize> {
        self.json["x_dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }
}

/// numpy.allclose's rule, element by element, with the worst offender in the message.
fn assert_close(what: &str, got: &Tensor, expected: &Tensor, (abs, rel): (f32, f32)) {
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
fn every_model_case_matches_through_the_cli() {
    let tmp = std::env::temp_dir().join(format!("fm-golden-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for dir in cases() {
        let case = Case::load(&dir);
        if case.json["model"] != "velocity-mlp" {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let (fin, traj, times) = (
            tmp.join(format!("{name}-final.npy")),
            tmp.join(format!("{name}-traj.npy")),
            tmp.join(format!("{name}-times.npy")),
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flow-matching"));
        cmd.arg("sample")
            .arg("--model")
            .arg(dir.join("model.safetensors"))
            .arg("--x-init")
            .arg(dir.join("x_init.npy"))
            .args([
                "--steps",
                &case.usize("steps").to_string(),
                "--method",
                "euler",
            ])
            .arg("--out")
            .arg(&fin)
            .arg("--trajectory")
            .arg(&traj)
            .arg("--times")
            .arg(&times);
        if let Some(l) = case.labels() {
            let l: Vec<String> = l.iter().map(|v| v.to_string()).collect();
            cmd.args(["--labels", &l.join(",")]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = Device::Cpu;
        assert_close(
            &name,
            &read_npy(&fin, &dev).unwrap(),
            &case.npy("expected_final.npy"),
            case.tol(),
        );
        assert_close(
            &name,
            &read_npy(&traj, &dev).unwrap(),
            &case.npy("expected_traj.npy"),
            case.tol(),
        );
        assert_close(
            &name,
            &read_npy(&times, &dev).unwrap(),
            &case.npy("expected_times.npy"),
            case.tol(),
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
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
