//! The `expert_b6_p1024` figures of `bench`: an action expert at the shape VLA policies run
//! (a Qwen3 decoder of width 256, 4 layers, 4/2 heads, head_dim 64, MLP 512, the seed's
//! in-projection; 6 futures of 64 tokens over a 1,024-token prefix cache; 10 Euler steps), a
//! fresh prefix cache every call as in a control loop. Ours (the native expert) against PyTorch
//! eager running transformers' own Qwen3 modules on the same weights (`expert_b6_p1024`) and
//! against onnxruntime from Python on the same network exported with the cache as inputs
//! (`expert_b6_p1024_ort`), alternated in one run, every side on the pool's thread count
//! (bench/expert_reference.py builds and times theirs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flow_matching::model::expert::{ActionExpert, ExpertConfig, PrefixCache};
use flow_matching::{Diffusion, Error, FlowMatching, Result, SampleOptions};

use crate::harness::{median, python_imports, script_stdout, Figure};

/// Futures per call (one scene).
pub const BATCH: usize = 6;
/// Prefix tokens in the cache.
pub const PREFIX: usize = 1024;
/// Euler steps per call.
pub const STEPS: usize = 10;
/// Timed calls per round (scaled by `--reps-scale`).
const REPS: usize = 9;

/// The figure's name.
pub fn name() -> String {
    format!("expert_b{BATCH}_p{PREFIX}")
}

/// The names of every figure this module makes: ours against PyTorch eager, against
/// onnxruntime, our GFLOP/s as a share of the measured FMA peak, and ours against the crate's
/// own ONNX path (tract) on the exported network, a new cache fed to it every call.
pub fn names() -> [String; 4] {
    [
        name(),
        format!("{}_ort", name()),
        format!("{}_peak", name()),
        format!("{}_tract", name()),
    ]
}

/// The benchmark expert's `config.json`.
const CONFIG: &str = r#"{"format": "flow-expert", "version": 1, "action_dims": [64, 2],
  "time_convention": "noise_at_0", "non_causal": true,
  "expert": {"family": "qwen3", "hidden_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "intermediate_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
  "action_in_proj": {"kind": "alpamayo_per_waypoint_v2", "hidden_size": 256,
    "num_enc_layers": 2, "max_freq": 100.0, "num_fourier_feats": 20},
  "action_out_proj": {"kind": "linear"}}"#;

/// Writes the benchmark expert (random weights, seed-independent: the arithmetic does not depend
/// on them) into `dir` and returns its config.
fn write_model(dir: &Path) -> Result<ExpertConfig> {
    let dev = Device::Cpu;
    let cfg = ExpertConfig::parse(CONFIG, &dir.join("config.json"))?;
    let mut map = HashMap::new();
    for (name, shape) in cfg.expected_shapes() {
        let w = Tensor::randn(0f32, 0.05, shape.as_slice(), &dev)?;
        // Norm weights near 1, as trained ones are.
        let w = if name.ends_with("norm.weight") {
            (w + 1.0)?
        } else {
            w
        };
        map.insert(name, w);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = dir.join("config.json");
    std::fs::write(&config, CONFIG).map_err(|e| Error::io(&config, e))?;
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    Ok(cfg)
}

/// A random prefix cache of the benchmark's shape (the VLM's work, done before the clock).
fn fresh_cache(cfg: &ExpertConfig) -> Result<PrefixCache> {
    let d = &cfg.decoder;
    let shape = (1, d.num_key_value_heads, PREFIX, d.head_dim);
    let mut k = Vec::new();
    let mut v = Vec::new();
    for _ in 0..d.num_hidden_layers {
        k.push(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?);
        v.push(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?);
    }
    PrefixCache::from_tensors(&k, &v, None, None)
}

/// The median (ms) of `reps` calls, each a new cache then `BATCH` futures of `STEPS` steps.
fn ours_ms(expert: &mut ActionExpert, cfg: &ExpertConfig, reps: usize) -> Result<f64> {
    let fm = FlowMatching::new(expert.x_dims())?.with_steps(STEPS)?;
    let mut times = Vec::with_capacity(reps);
    // One warm-up call: the first allocates the step's buffers.
    for call in 0..=reps {
        let cache = fresh_cache(cfg)?;
        let t0 = Instant::now();
        expert.set_condition(cache)?;
        fm.sample(
            BATCH,
            expert,
            &Device::Cpu,
            &SampleOptions::seeded(call as u64),
        )?;
        if call > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

/// What [`tract_ms`] measured: medians (ms) with a new cache every call and with the same one,
/// the plans tract optimised, and the largest difference from the native expert's velocity.
#[cfg(feature = "onnx")]
struct TractRun {
    /// Median ms with a new cache every call.
    fresh: f64,
    /// Median ms with the same cache twice.
    same: f64,
    /// Plans tract optimised over the run.
    plans: usize,
    /// The largest |v_tract - v_native| on one cache, x and t.
    max_diff: f32,
}

/// The median (ms) of `reps` calls of the exported network through tract, each with a new
/// cache fed as the ONNX inputs `past_key_values.{i}.key/value`; also the median with the same
/// cache every call, the plans tract optimised, and how far tract's velocity is from the native
/// expert's on the same weights (the export must be the same network).
#[cfg(feature = "onnx")]
fn tract_ms(
    onnx: &Path,
    cfg: &ExpertConfig,
    expert: &mut ActionExpert,
    reps: usize,
) -> Result<TractRun> {
    use flow_matching::onnx::OnnxStep;
    use flow_matching::StepFn;
    let d = &cfg.decoder;
    let mut step = OnnxStep::load(onnx)?;
    let pos: Vec<i64> = (PREFIX as i64..(PREFIX + 64) as i64).collect();
    step.set_condition("pos", &Tensor::new(pos.as_slice(), &Device::Cpu)?)?;
    let shape = (1, d.num_key_value_heads, PREFIX, d.head_dim);
    let names: Vec<String> = (0..d.num_hidden_layers)
        .flat_map(|i| ["key", "value"].map(|p| format!("past_key_values.{i}.{p}")))
        .collect();
    // One velocity both ways on one cache: tract's must be the native expert's.
    let cache: Vec<Tensor> = names
        .iter()
        .map(|_| Tensor::randn(0f32, 1.0, shape, &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    for (name, t) in names.iter().zip(&cache) {
        step.set_condition(name, t)?;
    }
    let (k, v): (Vec<Tensor>, Vec<Tensor>) = cache
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .unzip();
    expert.set_condition(PrefixCache::from_tensors(&k, &v, None, None)?)?;
    let [l, c] = cfg.action_dims;
    let x = Tensor::randn(0f32, 1.0, (BATCH, l, c), &Device::Cpu)?;
    let t = Tensor::full(0.3f32, BATCH, &Device::Cpu)?;
    let max_diff = (step.step(&x, &t)? - expert.step(&x, &t)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let fm = FlowMatching::new(step.x_dims())?.with_steps(STEPS)?;
    // Two warm-up calls: the first value's plan, then the plan that takes the cache as inputs.
    let (mut fresh, mut same) = (Vec::new(), Vec::new());
    for c in 0..reps + 2 {
        // The new cache is the VLM's work, made before the clock; handing it over is timed.
        let cache: Vec<Tensor> = names
            .iter()
            .map(|_| Tensor::randn(0f32, 1.0, shape, &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let t0 = Instant::now();
        for (name, t) in names.iter().zip(&cache) {
            step.set_condition(name, t)?;
        }
        fm.sample(
            BATCH,
            &mut step,
            &Device::Cpu,
            &SampleOptions::seeded(c as u64),
        )?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if c >= 2 {
            fresh.push(ms);
            let t0 = Instant::now();
            fm.sample(
                BATCH,
                &mut step,
                &Device::Cpu,
                &SampleOptions::seeded(c as u64),
            )?;
            same.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(TractRun {
        fresh: median(fresh),
        same: median(same),
        plans: step.plans_optimised(),
        max_diff,
    })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/expert_reference.py")
}

/// One Python round: `(figure, ms)` for PyTorch eager and, unless `ort` is false, onnxruntime;
/// with `tract_onnx`, the export's variant that tract 0.23 can load is written there too.
fn theirs(
    py: &str,
    model: &Path,
    onnx: &Path,
    tract_onnx: Option<&Path>,
    reps: usize,
    ort: bool,
) -> Result<Vec<(String, f64)>> {
    let s = script();
    let threads = flow_matching::kernel::available_threads().to_string();
    let mut cmd = Command::new(py);
    cmd.arg(&s)
        .arg("--model")
        .arg(model)
        .arg("--onnx")
        .arg(onnx);
    cmd.args([
        "--prefix",
        &PREFIX.to_string(),
        "--batch",
        &BATCH.to_string(),
    ]);
    cmd.args(["--steps", &STEPS.to_string(), "--reps", &reps.to_string()]);
    cmd.args(["--threads", &threads]);
    if !ort {
        cmd.arg("--no-ort");
    }
    if let Some(p) = tract_onnx {
        cmd.arg("--tract-onnx").arg(p);
    }
    let stdout = script_stdout(
        &mut cmd,
        &s,
        "action-expert reference run",
        "torch, transformers, safetensors, onnxruntime",
    )?;
    Ok(stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|j| Some((j["figure"].as_str()?.to_string(), j["value"].as_f64()?)))
        .collect())
}

/// Runs the expert figures: `rounds` alternations of ours and Python's; `wants` picks which
/// of [`names`] to report (the PyTorch run is skipped when neither needs it).
pub fn figures(
    py: &str,
    rounds: usize,
    reps_scale: f64,
    wants: &dyn Fn(&str) -> bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Figure>> {
    let [main, ort_name, peak_name, tract_name] = names();
    if ![&main, &ort_name, &peak_name, &tract_name]
        .iter()
        .any(|n| wants(n))
    {
        return Ok(Vec::new());
    }
    let dir =
        std::env::temp_dir().join(format!("flow-matching-bench-expert-{}", std::process::id()));
    let model = dir.join("expert");
    let cfg = write_model(&model)?;
    let mut expert = ActionExpert::load(&model, &Device::Cpu)?;
    let reps = ((REPS as f64 * reps_scale) as usize).max(1);
    let tract = cfg!(feature = "onnx") && wants(&tract_name);
    let python_side = wants(&main) || wants(&ort_name) || tract;
    let torch = python_side && python_imports(py, "torch, safetensors, transformers");
    // The third column: onnxruntime, and onnx for the export (which the tract figure runs).
    let ort = torch && (wants(&ort_name) || tract) && python_imports(py, "onnxruntime, onnx");
    if !torch && python_side {
        progress(&format!(
            "{main}: no PyTorch column ({py} cannot import torch, safetensors and transformers)"
        ));
    }
    let onnx = dir.join("expert.onnx");
    // tract 0.23 cannot load the export as written (a broadcast lost in its EinSum
    // decluttering of a Concat feeding a MatMul), so it runs the same arithmetic written
    // without one (bench/expert_reference.py --tract-onnx; checked against transformers).
    let tract_onnx = dir.join("expert_tract.onnx");
    let (mut ours, mut torch_ms, mut ort_ms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tract_fresh, mut tract_same) = (Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        ours.push(ours_ms(&mut expert, &cfg, reps)?);
        progress(&format!("{main} round {}: ours done", r + 1));
        if torch {
            let variant = (tract && ort).then_some(tract_onnx.as_path());
            for (f, ms) in theirs(py, &model, &onnx, variant, reps, ort)? {
                if f == main {
                    torch_ms.push(ms);
                } else if f == ort_name {
                    ort_ms.push(ms);
                }
            }
            progress(&format!("{main} round {}: Python done", r + 1));
        }
        #[cfg(feature = "onnx")]
        if tract && tract_onnx.is_file() {
            // A network tract refuses is a figure without its column, not a failed bench.
            let run = tract_ms(&tract_onnx, &cfg, &mut expert, reps);
            match run {
                Ok(run) => {
                    progress(&format!(
                        "{tract_name} round {}: tract {:.1} ms with a new cache, {:.1} ms with the same, {} plans optimised; |v_tract - v_native| <= {:.1e}",
                        r + 1,
                        run.fresh,
                        run.same,
                        run.plans,
                        run.max_diff
                    ));
                    tract_fresh.push(run.fresh);
                    tract_same.push(run.same);
                }
                Err(e) => progress(&format!("{tract_name}: no tract column: {e}")),
            }
        }
    }
    if tract && tract_fresh.is_empty() {
        progress(&format!(
            "{tract_name}: no tract column (the export needs {py} with torch, transformers, onnx and onnxruntime)"
        ));
    }
    if !tract_same.is_empty() {
        progress(&format!(
            "{tract_name}: tract, median of the rounds: {:.1} ms with a new cache every call, {:.1} ms with the same cache",
            median(tract_fresh.clone()),
            median(tract_same)
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ours = median(ours);
    let col = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    let mut out = Vec::new();
    if wants(&main) {
        out.push(Figure {
            figure: main.clone(),
            ours,
            pytorch: col(torch_ms),
            unit: "ms",
        });
    }
    if wants(&ort_name) {
        out.push(Figure {
            figure: ort_name,
            ours,
            pytorch: col(ort_ms),
            unit: "ms",
        });
    }
    if tract {
        out.push(Figure {
            figure: tract_name,
            ours,
            pytorch: col(tract_fresh),
            unit: "ms",
        });
    }
    if wants(&peak_name) {
        let gflops = cfg.step_flops(BATCH, PREFIX) * STEPS as f64 / ours / 1e6;
        let peak = flow_matching::kernel::peak::fma_peak_gflops();
        progress(&format!(
            "{main}: {:.1} GFLOP a call, {gflops:.0} GFLOP/s; the FMA peak of {} threads: {peak:.0} GFLOP/s",
            cfg.step_flops(BATCH, PREFIX) * STEPS as f64 / 1e9,
            flow_matching::kernel::available_threads(),
        ));
        out.push(Figure {
            figure: peak_name,
            ours: 100.0 * gflops / peak,
            pytorch: None,
            unit: "% of FMA peak",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_expert_has_the_issues_shape_and_samples() {
        let dir = std::env::temp_dir().join(format!("fm-bench-expert-{}", std::process::id()));
        let cfg = write_model(&dir).unwrap();
        let d = &cfg.decoder;
        assert_eq!(
            (d.hidden_size, d.num_hidden_layers, d.num_attention_heads),
            (256, 4, 4)
        );
        assert_eq!(
            (d.num_key_value_heads, d.head_dim, d.intermediate_size),
            (2, 64, 512)
        );
        let mut expert = ActionExpert::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(expert.x_dims(), vec![64, 2]);
        let ms = ours_ms(&mut expert, &cfg, 1).unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{ms}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
