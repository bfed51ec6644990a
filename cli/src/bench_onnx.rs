//! The `onnx_traj_b6` figures of `bench`: an exported waypoint transformer (width 128, 2 blocks,
//! 4 heads, cross-attention to 16 context tokens), 6 trajectories for one scene, 10 Euler
//! steps; ours (tract) against PyTorch eager on the same module and onnxruntime from Python on
//! the same file, alternated in one run (bench/onnx_reference.py builds and times theirs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use flow_matching::io::read_npy;
use flow_matching::onnx::OnnxStep;
use flow_matching::{Diffusion, Error, FlowMatching, Result, SampleOptions};

use crate::harness::{torch_available, Figure};

/// Trajectories per scene.
pub const BATCH: usize = 6;
/// Euler steps.
pub const STEPS: usize = 10;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/onnx_reference.py")
}

fn python(py: &str, args: &[&str]) -> Result<String> {
    let s = script();
    let out = Command::new(py)
        .arg(&s)
        .args(args)
        .output()
        .map_err(|e| Error::io(&s, e))?;
    if !out.status.success() {
        return Err(Error::invalid(
            "ONNX reference run",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string(),
            "a successful run of bench/onnx_reference.py (needs torch, numpy, onnxruntime)",
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the ONNX figures: `rounds` alternations of ours and Python's, `reps` timed samples each
/// (after a warm-up that builds the plan). Empty when PyTorch is not importable (the workload
/// is exported by PyTorch).
pub fn figures(
    py: &str,
    rounds: usize,
    reps_scale: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Figure>> {
    if !torch_available(py) {
        progress("onnx_traj_b6 skipped: PyTorch is not importable");
        return Ok(Vec::new());
    }
    let dir = std::env::temp_dir().join(format!("flow-matching-bench-onnx-{}", std::process::id()));
    let d = dir.to_string_lossy().into_owned();
    python(py, &["--export", &d])?;
    let dev = Device::Cpu;
    let ctx = read_npy(dir.join("ctx.npy"), &dev)?;
    let x0 = read_npy(dir.join("x0.npy"), &dev)?;
    let mut step = OnnxStep::load(dir.join("traj_bench.onnx"))?.with_condition("ctx", &ctx)?;
    let fm = FlowMatching::new(step.x_dims())?;
    let opts = SampleOptions {
        steps: Some(STEPS),
        x_init: Some(x0),
        ..Default::default()
    };
    let reps = ((20.0 * reps_scale) as usize).max(1);
    let reps_s = reps.to_string();
    let t0 = Instant::now();
    let first = fm.sample(BATCH, &mut step, &dev, &opts)?;
    progress(&format!(
        "onnx: loaded, planned and sampled once in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    let (mut ours, mut torch, mut ort) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            fm.sample(BATCH, &mut step, &dev, &opts)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ours.push(median(times));
        progress(&format!("onnx round {}: ours done", r + 1));
        for line in python(py, &["--dir", &d, "--reps", &reps_s])?.lines() {
            if let Ok(j) = serde_json::from_str::<serde_json::Value>(line) {
                match (j["figure"].as_str(), j["value"].as_f64()) {
                    (Some("onnx_traj_b6"), Some(v)) => torch.push(v),
                    (Some("onnx_traj_b6_ort"), Some(v)) => ort.push(v),
                    _ => {}
                }
            }
        }
        progress(&format!(
            "onnx round {}: PyTorch and onnxruntime done",
            r + 1
        ));
    }
    // Our samples must be PyTorch's before the times mean anything.
    let theirs = read_npy(dir.join("torch_out.npy"), &dev)?;
    let diff = (first.x - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let _ = std::fs::remove_dir_all(&dir);
    if diff.is_nan() || diff >= 1e-3 {
        return Err(Error::invalid(
            "onnx_traj_b6 samples",
            format!("max |ours - PyTorch| = {diff}"),
            "agreement within 1e-3",
        ));
    }
    let ours = median(ours);
    let fig = |name: &str, theirs: Vec<f64>| Figure {
        figure: name.to_string(),
        ours,
        pytorch: (!theirs.is_empty()).then(|| median(theirs)),
        unit: "ms",
    };
    Ok(vec![
        fig("onnx_traj_b6", torch),
        fig("onnx_traj_b6_ort", ort),
    ])
}
