//! The `onnx_traj_b6` figures of `bench`: an exported waypoint transformer (width 128, 2 blocks,
//! 4 heads, cross-attention to 16 context tokens), 6 trajectories for one scene, 10 Euler
//! steps; ours (tract) against PyTorch eager on the same module and onnxruntime from Python on
//! the same file, alternated in one run (bench/onnx_reference.py builds and times theirs).
//! In a build with the feature `ort`, also ours through ONNX Runtime (`onnx_traj_b6_ort_rs`)
//! against onnxruntime from Python, with the library the Python wheel ships (or
//! `ORT_DYLIB_PATH`). Every side runs on the same number of threads: the pool's (PyTorch's and
//! both ONNX Runtime sessions' intra-op threads; tract's rows split over them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use flow_matching::io::read_npy;
use flow_matching::onnx::OnnxStep;
use flow_matching::{Diffusion, Error, FlowMatching, Result, SampleOptions};

use crate::harness::{median, script_stdout, torch_available, Figure};

/// The figures this module makes.
pub const NAMES: [&str; 3] = ["onnx_traj_b6", "onnx_traj_b6_ort", "onnx_traj_b6_ort_rs"];

/// Trajectories per scene.
pub const BATCH: usize = 6;
/// Euler steps.
pub const STEPS: usize = 10;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/onnx_reference.py")
}

fn python(py: &str, args: &[&str]) -> Result<String> {
    let s = script();
    script_stdout(
        Command::new(py).arg(&s).args(args),
        &s,
        "ONNX reference run",
        "torch, numpy, onnxruntime",
    )
}

/// Runs the ONNX figures: `rounds` alternations of ours and Python's, `reps` timed samples each
/// (after a warm-up that builds the plan). Empty when PyTorch is not importable (the workload
/// is exported by PyTorch).
pub fn figures(
    py: &str,
    rounds: usize,
    reps_scale: f64,
    wants: &dyn Fn(&str) -> bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Figure>> {
    if !NAMES.iter().any(|n| wants(n)) {
        return Ok(Vec::new());
    }
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
    let model = dir.join("traj_bench.onnx");
    let mut step = OnnxStep::load(&model)?.with_condition("ctx", &ctx)?;
    let mut ort_step = ort_step(py, &model, &ctx, progress)?;
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
    let ort_first = match ort_step.as_mut() {
        Some(s) => Some(fm.sample(BATCH, s, &dev, &opts)?),
        None => None,
    };
    let (mut ours, mut torch, mut ort) = (Vec::new(), Vec::new(), Vec::new());
    let mut ours_ort = Vec::new();
    let time = |s: &mut OnnxStep| -> Result<f64> {
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            fm.sample(BATCH, s, &dev, &opts)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(times))
    };
    for r in 0..rounds.max(1) {
        ours.push(time(&mut step)?);
        if let Some(s) = ort_step.as_mut() {
            ours_ort.push(time(s)?);
        }
        progress(&format!("onnx round {}: ours done", r + 1));
        let threads = flow_matching::kernel::available_threads().to_string();
        let args = ["--dir", &d, "--reps", &reps_s, "--threads", &threads];
        for line in python(py, &args)?.lines() {
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
    let _ = std::fs::remove_dir_all(&dir);
    for (what, x) in std::iter::once(("tract", first.x)).chain(ort_first.map(|s| ("ort", s.x))) {
        let diff = (x - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if diff.is_nan() || diff >= 1e-3 {
            return Err(Error::invalid(
                "onnx_traj_b6 samples",
                format!("max |ours ({what}) - PyTorch| = {diff}"),
                "agreement within 1e-3",
            ));
        }
    }
    let fig = |name: &str, ours: &[f64], theirs: &[f64]| Figure {
        figure: name.to_string(),
        ours: median(ours.to_vec()),
        pytorch: (!theirs.is_empty()).then(|| median(theirs.to_vec())),
        unit: "ms",
    };
    let mut figs = vec![
        fig("onnx_traj_b6", &ours, &torch),
        fig("onnx_traj_b6_ort", &ours, &ort),
    ];
    if !ours_ort.is_empty() {
        figs.push(fig("onnx_traj_b6_ort_rs", &ours_ort, &ort));
    }
    figs.retain(|f| wants(&f.figure));
    Ok(figs)
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the one the Python's onnxruntime wheel ships
/// (the library Python's figures run on).
#[cfg(feature = "ort")]
fn ort_library(py: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let out = Command::new(py)
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))",
        ])
        .output()
        .ok()?;
    let capi = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::read_dir(capi)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.so.")
                    || n == "onnxruntime.dll"
                    || n.starts_with("libonnxruntime.") && n.ends_with(".dylib")
            })
        })
}

/// Ours through ONNX Runtime (as many intra-op threads as the Python session), when the build
/// has it and a library is found.
#[cfg(feature = "ort")]
fn ort_step(
    py: &str,
    model: &Path,
    ctx: &candle_core::Tensor,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<OnnxStep>> {
    let Some(library) = ort_library(py) else {
        progress("onnx_traj_b6_ort_rs skipped: no ONNX Runtime library (ORT_DYLIB_PATH or the Python wheel's)");
        return Ok(None);
    };
    progress(&format!("onnx: ONNX Runtime from {}", library.display()));
    let runtime = flow_matching::onnx::Runtime::Ort(flow_matching::onnx::OrtOptions {
        library: Some(library),
        threads: flow_matching::kernel::available_threads(),
        // Python's sessions spin (ONNX Runtime's default); the same settings on both sides.
        spin: true,
    });
    Ok(Some(
        OnnxStep::load_with_runtime(model, None, &runtime)?.with_condition("ctx", ctx)?,
    ))
}

#[cfg(not(feature = "ort"))]
fn ort_step(
    _py: &str,
    _model: &Path,
    _ctx: &candle_core::Tensor,
    _progress: &mut dyn FnMut(&str),
) -> Result<Option<OnnxStep>> {
    Ok(None)
}
