//! `flow-matching bench`: this crate against PyTorch eager on the velocity-mlp workload, the
//! two measured alternately in one run (ours, theirs, ours, ...) so machine load hits both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use flow_matching::diffusion::{Diffusion, SampleOptions};
use flow_matching::error::{Error, Result};
use flow_matching::flow_matching::{randn, FlowMatching};
use flow_matching::model::{
    loss_and_grads, TransformerConfig, VelocityMlp, VelocityMlpConfig, WaypointTransformer,
};
use flow_matching::train::{AdamW, AdamWParams};
use flow_matching::XDims;

/// Batch sizes of the sampling figures.
pub const SAMPLE_BATCHES: [usize; 3] = [1, 64, 4096];
/// Batch size of the training and peak-memory figures.
pub const BIG_BATCH: usize = 4096;
/// Euler steps per sample.
pub const STEPS: usize = 10;

/// The velocity-mlp and waypoint-transformer figures this module makes, in the table's order
/// (the first [`SCRIPT_FIGURES`] are the ones `bench/pytorch_reference.py` times).
pub const FIGURES: [&str; 12] = [
    "sample_b1",
    "sample_rk4_b1",
    "sample_cfg_b1",
    "sample_b64",
    "sample_b4096",
    "train_b4096",
    "train_b4096_peak",
    "gemm_b4096",
    "traj_b6",
    "train_traj_b256",
    "train_traj_b256_peak",
    "peak_rss_b4096",
];

/// How many of [`FIGURES`], from the first, `bench/pytorch_reference.py` times in one run.
const SCRIPT_FIGURES: usize = 8;

/// Rows, depth and width of the `gemm_b4096` product: the velocity-mlp's hidden layer at the
/// training batch.
const GEMM: (usize, usize, usize) = (BIG_BATCH, 256, 256);

/// A choice of figures by name (`bench --figures`).
pub type Wants<'a> = &'a dyn Fn(&str) -> bool;

/// One row of the result table.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Name, e.g. `sample_b64`.
    pub figure: String,
    /// Our median.
    pub ours: f64,
    /// PyTorch's median, when torch ran.
    pub pytorch: Option<f64>,
    /// `ms`, `steps/s` or `MiB`.
    pub unit: &'static str,
}

impl Figure {
    /// How many times better this crate is (> 1 is better): time and memory ratios are
    /// theirs / ours, rates ours / theirs.
    pub fn ratio(&self) -> Option<f64> {
        let p = self.pytorch?;
        // Rates and shares of the peak are better higher; times and memory lower.
        Some(
            if matches!(self.unit, "steps/s" | "GFLOP/s" | "% of FMA peak") {
                self.ours / p
            } else {
                p / self.ours
            },
        )
    }
}

/// The workload model: x_dims [2], hidden 256, depth 3, 16 frequencies, seed 0.
pub fn workload_model(varmap: &VarMap) -> Result<VelocityMlp> {
    let cfg = VelocityMlpConfig::new(XDims::new(2)?);
    VelocityMlp::init(cfg, varmap, &Device::Cpu, 0)
}

/// The median of `v` (NaN when empty); every figure module takes its rounds' median here.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `reps` timed calls after a warm-up call (the warm-up alone when `reps` is 0).
fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t0 = Instant::now();
    f()?;
    if reps == 0 {
        return Ok(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// The median time (ms) of one `STEPS`-step Euler sample of `batch` rows.
pub fn sample_ms(model: &VelocityMlp, batch: usize, reps: usize) -> Result<f64> {
    sample_method_ms(model, "euler", batch, reps)
}

/// The median time (ms) of one `STEPS`-step sample of `batch` rows with `method`.
pub fn sample_method_ms(
    model: &VelocityMlp,
    method: &str,
    batch: usize,
    reps: usize,
) -> Result<f64> {
    sample_method_ms_on(model, method, batch, reps, &Device::Cpu)
}

/// [`sample_method_ms`] on `device` (`model` already there): the noise is drawn on the CPU
/// and copied over, and on a GPU each timed sample ends with the device synchronised.
pub fn sample_method_ms_on(
    model: &VelocityMlp,
    method: &str,
    batch: usize,
    reps: usize,
    device: &Device,
) -> Result<f64> {
    let fm = FlowMatching::new(2)?.with_method(method)?;
    let mut rng = StdRng::seed_from_u64(batch as u64);
    let x_init = randn(&mut rng, &[batch, 2], DType::F32, &Device::Cpu)?.to_device(device)?;
    let opts = SampleOptions {
        steps: Some(STEPS),
        x_init: Some(x_init),
        ..Default::default()
    };
    let mut m = model.detach();
    median_ms(reps, || {
        fm.sample(batch, &mut m, device, &opts)?;
        if !device.is_cpu() {
            device.synchronize()?;
        }
        Ok(())
    })
}

/// Classes of the conditional workload model (sample_cfg_b1).
pub const CLASSES: usize = 10;
/// Guidance weight of sample_cfg_b1.
pub const GUIDANCE: f64 = 2.0;

/// The conditional workload model: the workload model with `CLASSES` classes (seed 1).
pub fn conditional_model(varmap: &VarMap) -> Result<VelocityMlp> {
    let cfg = VelocityMlpConfig {
        num_classes: CLASSES,
        ..VelocityMlpConfig::new(XDims::new(2)?)
    };
    VelocityMlp::init(cfg, varmap, &Device::Cpu, 1)
}

/// The median time (ms) of one `STEPS`-step Euler sample of one row of class 0 with
/// classifier-free guidance weight `GUIDANCE`.
pub fn cfg_sample_ms(model: &VelocityMlp, reps: usize) -> Result<f64> {
    let fm = FlowMatching::new(2)?.with_guidance(GUIDANCE)?;
    let mut rng = StdRng::seed_from_u64(1);
    let opts = SampleOptions {
        steps: Some(STEPS),
        x_init: Some(randn(&mut rng, &[1, 2], DType::F32, &Device::Cpu)?),
        ..Default::default()
    };
    let m = model.detach();
    let mut guided = fm.guided(&m, &[0])?;
    median_ms(reps, || {
        fm.sample(1, &mut guided, &Device::Cpu, &opts)?;
        Ok(())
    })
}

/// Training data of the benchmark: `(noisy_x, t, target)` for `batch` rows.
pub fn training_batch(batch: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(42);
    let dev = Device::Cpu;
    let x = randn(&mut rng, &[batch, 2], DType::F32, &dev)?;
    let noise = randn(&mut rng, &[batch, 2], DType::F32, &dev)?;
    let t: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
    let t = Tensor::from_vec(t, (batch, 1), &dev)?;
    let one_minus = t.affine(-1.0, 1.0)?;
    let noisy = (x.broadcast_mul(&t)? + noise.broadcast_mul(&one_minus)?)?;
    let target = (&x - &noise)?;
    Ok((noisy, t.flatten_all()?, target))
}

/// Training steps per second (loss, gradients and the AdamW update) at `batch` rows.
pub fn train_steps_per_s(batch: usize, reps: usize) -> Result<f64> {
    adamw_steps_per_s(&Device::Cpu, batch, reps, |m, x, t, target| {
        loss_and_grads(m, x, t, None, target)
    })
}

/// [`train_steps_per_s`] on a GPU: the same model, batch and AdamW, the loss and gradients by
/// candle's autograd (the fused backward is CPU-only), the device synchronised after each step.
pub fn train_steps_per_s_on(device: &Device, batch: usize, reps: usize) -> Result<f64> {
    adamw_steps_per_s(device, batch, reps, |m, x, t, target| {
        flow_matching::train::loss_and_grads(m, x, t, None, target)
    })
}

/// Loss and gradients of the workload model on `device`.
type GradsFn = fn(&VelocityMlp, &Tensor, &Tensor, &Tensor) -> Result<(f32, Vec<(String, Tensor)>)>;

/// Steps per second of the workload model on `device`: `grads` then the trainer's own AdamW
/// (PyTorch's settings in the reference script), the device synchronised after each step.
fn adamw_steps_per_s(device: &Device, batch: usize, reps: usize, grads: GradsFn) -> Result<f64> {
    let varmap = VarMap::new();
    let cfg = VelocityMlpConfig::new(XDims::new(2)?);
    let model = VelocityMlp::init(cfg, &varmap, device, 0)?;
    let params = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let vars = flow_matching::train::sorted_vars(&varmap)?;
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, &plain)?;
    let (noisy, t, target) = training_batch(batch)?;
    let (noisy, t, target) = (
        noisy.to_device(device)?,
        t.to_device(device)?,
        target.to_device(device)?,
    );
    let ms = median_ms(reps, || {
        let (_, mut g) = grads(&model, &noisy, &t, &target)?;
        g.sort_by(|a, b| a.0.cmp(&b.0));
        let g: Vec<Tensor> = g.into_iter().map(|(_, g)| g).collect();
        opt.step(&plain, &g, 1e-4)?;
        device.synchronize()?;
        Ok(())
    })?;
    Ok(1e3 / ms)
}

/// This process's peak resident memory in MiB (`VmHWM` of /proc/self/status).
pub fn peak_rss_mib() -> Result<f64> {
    let p = Path::new("/proc/self/status");
    let s = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or_else(|| Error::invalid("/proc/self/status", "no VmHWM line", "a Linux kernel"))
}

/// The body of the hidden `bench-peak-rss` subcommand: one batch-4096 sample from `model`,
/// then the peak RSS.
pub fn peak_rss_child(model: &Path) -> Result<f64> {
    let m = VelocityMlp::load(model, &Device::Cpu)?;
    sample_ms(&m, BIG_BATCH, 0)?;
    peak_rss_mib()
}

/// Trajectories per scene of the `traj_b6` figure (the seed's control-loop case).
pub const TRAJ_BATCH: usize = 6;
/// Condition numbers of the `traj_b6` model (the driving scenes').
pub const TRAJ_COND: usize = 7;

/// The `traj_b6` model: the waypoint transformer's defaults for `[64, 2]` (width 64, 3
/// blocks of 4 heads, MLP 128, 10 frequencies) with a 7-number condition, seed 2.
pub fn traj_model() -> Result<WaypointTransformer> {
    let cfg = TransformerConfig {
        cond_dims: Some(XDims::new(TRAJ_COND)?),
        ..TransformerConfig::new(XDims::new([64, 2])?)
    };
    WaypointTransformer::init(cfg, &VarMap::new(), &Device::Cpu, 2)
}

/// The median time (ms) of 6 trajectories `[6, 64, 2]` for one scene (its condition repeated
/// 6 times), `STEPS` Euler steps.
pub fn traj_ms(model: &WaypointTransformer, reps: usize) -> Result<f64> {
    let fm = FlowMatching::new([64, 2])?;
    let mut rng = StdRng::seed_from_u64(6);
    let cond =
        randn(&mut rng, &[1, TRAJ_COND], DType::F32, &Device::Cpu)?.repeat((TRAJ_BATCH, 1))?;
    let opts = SampleOptions {
        steps: Some(STEPS),
        x_init: Some(randn(
            &mut rng,
            &[TRAJ_BATCH, 64, 2],
            DType::F32,
            &Device::Cpu,
        )?),
        ..Default::default()
    };
    let mut f = model.with_condition(&cond)?;
    median_ms(reps, || {
        fm.sample(TRAJ_BATCH, &mut f, &Device::Cpu, &opts)?;
        Ok(())
    })
}

/// PyTorch eager's median (ms) for the same model file and workload
/// (`python/waypoint_transformer.py bench`), with the same number of threads as ours.
fn traj_pytorch_ms(opts: &BenchOptions, model: &Path, reps: usize) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/waypoint_transformer.py");
    let threads = flow_matching::kernel::available_threads().to_string();
    let reps = reps.to_string();
    let batch = TRAJ_BATCH.to_string();
    let steps = STEPS.to_string();
    let out = Command::new(&opts.python)
        .arg(&script)
        .args(["bench", &model.to_string_lossy(), "--batch", &batch])
        .args(["--steps", &steps, "--reps", &reps, "--threads", &threads])
        .output()
        .map_err(|e| Error::io(&script, e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|j| j["median_ms"].as_f64());
    match (out.status.success(), value) {
        (true, Some(v)) => Ok(v),
        _ => Err(Error::invalid(
            "PyTorch waypoint-transformer run",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string(),
            "a successful run of python/waypoint_transformer.py bench (needs torch, numpy, safetensors)",
        )),
    }
}

/// Samples per step of the `train_traj_b256` figure.
pub const TRAIN_TRAJ_BATCH: usize = 256;
/// Condition numbers of the `train_traj_b256` model.
pub const TRAIN_TRAJ_COND: usize = 5;
/// The share of rows whose condition `train_traj_b256` drops (the trainer's default).
pub const TRAIN_TRAJ_DROP: f64 = 0.1;

/// The `train_traj_b256` model: the waypoint transformer's defaults for `[64, 2]` with a
/// 5-number condition, seed 3, its trainable weights `Var`s in `varmap`.
pub fn train_traj_model(varmap: &VarMap) -> Result<WaypointTransformer> {
    let cfg = TransformerConfig {
        cond_dims: Some(XDims::new(TRAIN_TRAJ_COND)?),
        ..TransformerConfig::new(XDims::new([64, 2])?)
    };
    WaypointTransformer::init(cfg, varmap, &Device::Cpu, 3)
}

/// The floating-point operations of one training step of a waypoint transformer at `batch`
/// samples: twice the multiply-adds of every matmul of the forward, times three (the forward,
/// the input gradients, the weight gradients). The backward's recomputed attention scores and
/// the elementwise work are not counted, so the share of the peak is a lower bound.
pub fn transformer_train_flop(cfg: &TransformerConfig, batch: usize) -> f64 {
    let (l, c, w, ff) = (cfg.len(), cfg.channels(), cfg.width, cfg.mlp_hidden);
    let (p, cf, dh) = (cfg.per_value(), cfg.cond_features(), cfg.width / cfg.heads);
    let per_sample = l * ((c + 1) * p * w + w * w)
        + p * w
        + w * w
        + if cf > 0 { cf * w + w * w } else { 0 }
        + cfg.depth
            * (6 * w * w + l * (3 * w * w + w * w + 2 * w * ff) + cfg.heads * 2 * l * l * dh)
        + 2 * w * w
        + l * w * c;
    2.0 * 3.0 * (per_sample * batch) as f64
}

/// Training steps per second of the `train_traj_b256` workload: the model's own
/// `loss_and_grads` (the fused step on the CPU) under a condition with
/// [`TRAIN_TRAJ_DROP`] of its rows dropped, then the trainer's AdamW (PyTorch's settings in
/// `python/waypoint_transformer.py train-bench`).
pub fn train_traj_steps_per_s(reps: usize) -> Result<f64> {
    use flow_matching::model::Condition;
    use flow_matching::train::TrainableModel;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = train_traj_model(&varmap)?;
    let params = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let vars = flow_matching::train::sorted_vars(&varmap)?;
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, &plain)?;
    let b = TRAIN_TRAJ_BATCH;
    let mut rng = StdRng::seed_from_u64(256);
    let x = randn(&mut rng, &[b, 64, 2], DType::F32, &dev)?;
    let noise = randn(&mut rng, &[b, 64, 2], DType::F32, &dev)?;
    let t: Vec<f32> = (0..b).map(|_| rng.random::<f32>()).collect();
    let t = Tensor::from_vec(t, (b, 1, 1), &dev)?;
    let noisy = (x.broadcast_mul(&t)? + noise.broadcast_mul(&t.affine(-1.0, 1.0)?)?)?;
    let target = (&x - &noise)?;
    let t = t.flatten_all()?;
    let keep: Vec<f32> = (0..b)
        .map(|_| (rng.random::<f64>() >= TRAIN_TRAJ_DROP) as u8 as f32)
        .collect();
    let cond = Condition::Features {
        values: randn(&mut rng, &[b, TRAIN_TRAJ_COND], DType::F32, &dev)?,
        keep: Some(Tensor::from_vec(keep, b, &dev)?),
    };
    let ms = median_ms(reps, || {
        let (_, mut g) = model.loss_and_grads(&noisy, &t, Some(&cond), &target)?;
        g.sort_by(|a, b| a.0.cmp(&b.0));
        let g: Vec<Tensor> = g.into_iter().map(|(_, g)| g).collect();
        opt.step(&plain, &g, 1e-4)?;
        Ok(())
    })?;
    Ok(1e3 / ms)
}

/// PyTorch eager's steps per second on the same model file and workload
/// (`python/waypoint_transformer.py train-bench`), with the same number of threads as ours.
fn train_traj_pytorch_steps_per_s(opts: &BenchOptions, model: &Path, reps: usize) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/waypoint_transformer.py");
    let threads = flow_matching::kernel::available_threads().to_string();
    let (reps, batch) = (reps.to_string(), TRAIN_TRAJ_BATCH.to_string());
    let mut cmd = Command::new(&opts.python);
    cmd.arg(&script)
        .args(["train-bench", &model.to_string_lossy(), "--batch", &batch])
        .args(["--reps", &reps, "--threads", &threads]);
    let stdout = script_stdout(
        &mut cmd,
        &script,
        "PyTorch waypoint-transformer training run",
        "torch, numpy, safetensors",
    )?;
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|j| j["median_ms"].as_f64())
        .map(|ms| 1e3 / ms)
        .ok_or_else(|| {
            Error::invalid(
                "PyTorch waypoint-transformer training output",
                stdout.trim().to_string(),
                "a JSON line with median_ms",
            )
        })
}

/// How the benchmark runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Alternating rounds (ours then PyTorch's).
    pub rounds: usize,
    /// The Python interpreter.
    pub python: String,
    /// The PyTorch script.
    pub script: PathBuf,
    /// Pass `--install` to the script (pip install torch).
    pub install: bool,
    /// Scales every repetition count (for a quick look).
    pub reps_scale: f64,
    /// Where the figures are measured.
    pub device: BenchDevice,
}

/// Where `bench` measures: the CPU (against PyTorch eager on the CPU), or the first CUDA GPU
/// (against PyTorch eager on CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevice {
    /// The CPU: every figure.
    Cpu,
    /// CUDA GPU 0: sample_b1, sample_b64, sample_b4096 and train_b4096.
    Cuda,
}

impl BenchDevice {
    /// `cpu` or `cuda`, as the reference script's `--device` takes it.
    pub fn name(self) -> &'static str {
        match self {
            BenchDevice::Cpu => "cpu",
            BenchDevice::Cuda => "cuda",
        }
    }

    /// The candle device; a clear error where this binary has no CUDA or no GPU answers.
    pub fn open(self) -> Result<Device> {
        match self {
            BenchDevice::Cpu => Ok(Device::Cpu),
            BenchDevice::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::invalid(
                        "--device",
                        "cuda",
                        "this binary was built without the `cuda` feature; rebuild it with \
                         `cargo build --release --features cuda` (needs nvcc and the CUDA \
                         libraries), or use --device cpu",
                    ));
                }
                Device::new_cuda(0).map_err(|e| {
                    // candle appends a backtrace to driver errors: the first line says it.
                    let e = e.to_string();
                    let first = e.lines().next().unwrap_or_default();
                    Error::invalid(
                        "--device",
                        "cuda",
                        format!("no CUDA GPU 0 answered: {first}"),
                    )
                })
            }
        }
    }
}

/// Whether `python` can import torch and safetensors.
pub fn torch_available(python: &str) -> bool {
    python_imports(python, "torch, safetensors")
}

/// Whether `python` can `import` every module of `modules` (comma-separated).
pub fn python_imports(python: &str, modules: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a reference script's command and returns its stdout; a failure is one error naming
/// `what`, with the script's last line of stderr, and what the script `needs`.
pub fn script_stdout(
    cmd: &mut Command,
    script: &Path,
    what: &'static str,
    needs: &str,
) -> Result<String> {
    let out = cmd.output().map_err(|e| Error::io(script, e))?;
    if !out.status.success() {
        return Err(Error::invalid(
            what,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string(),
            format!("a successful run of {} (needs {needs})", script.display()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_python(opts: &BenchOptions, model: &Path, extra: &[&str]) -> Result<Vec<(String, f64)>> {
    let mut cmd = Command::new(&opts.python);
    cmd.arg(&opts.script).arg("--model").arg(model);
    cmd.arg("--reps-scale").arg(opts.reps_scale.to_string());
    if opts.install {
        cmd.arg("--install");
    }
    cmd.args(extra);
    let out = cmd.output().map_err(|e| Error::io(&opts.script, e))?;
    if !out.status.success() {
        return Err(Error::invalid(
            "PyTorch reference run",
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
            "a successful run of the script",
        ));
    }
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(line) {
            if let (Some(f), Some(x)) = (j["figure"].as_str(), j["value"].as_f64()) {
                v.push((f.to_string(), x));
            }
        }
    }
    Ok(v)
}

fn our_round(
    model: &VelocityMlp,
    cond: &VelocityMlp,
    scale: f64,
    wants: Wants,
) -> Result<Vec<(String, f64)>> {
    let reps = |n: usize| ((n as f64 * scale) as usize).max(1);
    let mut v = Vec::new();
    for (b, n) in SAMPLE_BATCHES.iter().zip([200, 50, 5]) {
        let name = format!("sample_b{b}");
        if wants(&name) {
            v.push((name, sample_ms(model, *b, reps(n))?));
        }
        if *b == 1 && wants("sample_rk4_b1") {
            let rk4 = sample_method_ms(model, "rk4", 1, reps(100))?;
            v.push(("sample_rk4_b1".into(), rk4));
        }
        if *b == 1 && wants("sample_cfg_b1") {
            v.push(("sample_cfg_b1".into(), cfg_sample_ms(cond, reps(n))?));
        }
    }
    // The share of the peak is computed from the rate after the rounds.
    if wants("train_b4096") || wants("train_b4096_peak") {
        v.push((
            "train_b4096".into(),
            train_steps_per_s(BIG_BATCH, reps(10))?,
        ));
    }
    if wants("gemm_b4096") {
        v.push(("gemm_b4096".into(), gemm_gflops(reps(20))));
    }
    Ok(v)
}

/// GFLOP/s of the `gemm_b4096` product `y += x w` (`[4096, 256] x [256, 256]`) through the
/// packed kernel that training uses, each pool thread taking its share of the rows as a
/// training step does; the median of `reps` products.
pub fn gemm_gflops(reps: usize) -> f64 {
    use rayon::prelude::*;
    let (m, k, n) = GEMM;
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let wt: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos() / 16.0).collect();
    let mut y = vec![0f32; m * n];
    let per = m.div_ceil(flow_matching::kernel::available_threads());
    let mut times = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let t0 = Instant::now();
        y.par_chunks_mut(per * n)
            .zip(x.par_chunks(per * k))
            .for_each(|(yc, xc)| {
                flow_matching::kernel::matmul_packed(yc, xc, &wt, xc.len() / k, n, k)
            });
        // The first product warms the pool and the caches.
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&y);
    2.0 * (m * n * k) as f64 / median(times) / 1e9
}

/// The floating-point operations of one training step of a velocity-mlp at `batch` rows:
/// twice the multiply-adds of every layer's forward product and weight gradient, and of
/// every input gradient but the first layer's (the input needs none).
pub fn mlp_train_flop(cfg: &VelocityMlpConfig, batch: usize) -> f64 {
    let d: usize = cfg.x_dims.dims().iter().product();
    let (h, first) = (cfg.hidden, d + 2 * cfg.num_freqs);
    let forward = first * h + (cfg.depth - 1) * h * h + h * d;
    2.0 * ((3 * forward - first * h) * batch) as f64
}

/// One round on a GPU: `model` is already on `device`.
fn gpu_round(
    model: &VelocityMlp,
    device: &Device,
    scale: f64,
    wants: Wants,
) -> Result<Vec<(String, f64)>> {
    let reps = |n: usize| ((n as f64 * scale) as usize).max(1);
    let mut v = Vec::new();
    for (b, n) in SAMPLE_BATCHES.iter().zip([200, 50, 5]) {
        let name = format!("sample_b{b}");
        if wants(&name) {
            let ms = sample_method_ms_on(model, "euler", *b, reps(n), device)?;
            v.push((name, ms));
        }
    }
    if wants("train_b4096") {
        v.push((
            "train_b4096".into(),
            train_steps_per_s_on(device, BIG_BATCH, reps(10))?,
        ));
    }
    Ok(v)
}

/// Runs the benchmark's figures that `wants` names (nothing when it names none of
/// [`FIGURES`]); `progress` hears a line after each half-round.
pub fn run(
    opts: &BenchOptions,
    wants: Wants,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Figure>> {
    if !FIGURES.iter().any(|f| wants(f)) {
        return Ok(Vec::new());
    }
    let dir = std::env::temp_dir().join(format!("flow-matching-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let model_path = dir.join("velocity-mlp.safetensors");
    workload_model(&VarMap::new())?.save(&model_path)?;
    let cond_path = dir.join("velocity-mlp-cond.safetensors");
    conditional_model(&VarMap::new())?.save(&cond_path)?;
    // Ours samples the files PyTorch loads, as a deployed model would be.
    let model = VelocityMlp::load(&model_path, &Device::Cpu)?;
    let cond = VelocityMlp::load(&cond_path, &Device::Cpu)?;
    let traj_path = dir.join("waypoint-transformer.safetensors");
    let traj = traj_model()?;
    traj.save(&traj_path)?;
    let traj_reps = ((50.0 * opts.reps_scale) as usize).max(1);
    let train_traj_path = dir.join("waypoint-transformer-train.safetensors");
    train_traj_model(&VarMap::new())?.save(&train_traj_path)?;
    let train_traj_reps = ((10.0 * opts.reps_scale) as usize).max(1);
    let train_traj = wants("train_traj_b256") || wants("train_traj_b256_peak");
    let torch = opts.install || torch_available(&opts.python);
    let mut ours: Vec<(String, Vec<f64>)> = Vec::new();
    let mut theirs: Vec<(String, Vec<f64>)> = Vec::new();
    let push = |acc: &mut Vec<(String, Vec<f64>)>, vals: Vec<(String, f64)>| {
        for (k, x) in vals {
            match acc.iter_mut().find(|(n, _)| *n == k) {
                Some((_, xs)) => xs.push(x),
                None => acc.push((k, vec![x])),
            }
        }
    };
    let gpu = match opts.device {
        BenchDevice::Cpu => None,
        dev => {
            let d = dev.open()?;
            Some((model.to_device(&d)?, d))
        }
    };
    for r in 0..opts.rounds.max(1) {
        match &gpu {
            None => {
                push(&mut ours, our_round(&model, &cond, opts.reps_scale, wants)?);
                if wants("traj_b6") {
                    push(
                        &mut ours,
                        vec![("traj_b6".into(), traj_ms(&traj, traj_reps)?)],
                    );
                }
                if train_traj {
                    let rate = train_traj_steps_per_s(train_traj_reps)?;
                    push(&mut ours, vec![("train_traj_b256".into(), rate)]);
                }
            }
            Some((m, d)) => push(&mut ours, gpu_round(m, d, opts.reps_scale, wants)?),
        }
        progress(&format!("round {}: ours done", r + 1));
        // PyTorch's script times all its sampling and training figures at once.
        let script_figures = FIGURES[..SCRIPT_FIGURES].iter().any(|f| wants(f));
        if torch && script_figures {
            let cond_arg = cond_path.to_string_lossy();
            let guidance = GUIDANCE.to_string();
            let extra: Vec<&str> = match opts.device {
                BenchDevice::Cpu => vec!["--cond-model", &cond_arg, "--guidance", &guidance],
                dev => vec!["--device", dev.name()],
            };
            push(&mut theirs, run_python(opts, &model_path, &extra)?);
        }
        if torch {
            // The trajectory figure is a CPU control-loop latency.
            if gpu.is_none() && wants("traj_b6") {
                push(
                    &mut theirs,
                    vec![(
                        "traj_b6".into(),
                        traj_pytorch_ms(opts, &traj_path, traj_reps)?,
                    )],
                );
            }
            if gpu.is_none() && train_traj {
                let rate = train_traj_pytorch_steps_per_s(opts, &train_traj_path, train_traj_reps)?;
                push(&mut theirs, vec![("train_traj_b256".into(), rate)]);
            }
            progress(&format!("round {}: PyTorch done", r + 1));
        }
    }
    // Measured once, after the rounds: the peak run is a second of every core's FMA units,
    // which would disturb a round.
    let peak = (gpu.is_none() && (wants("train_traj_b256_peak") || wants("train_b4096_peak")))
        .then(flow_matching::kernel::peak::fma_peak_gflops)
        .unwrap_or(f64::NAN);
    if gpu.is_none() && wants("train_b4096_peak") {
        let flop = mlp_train_flop(model.config(), BIG_BATCH);
        let share = |r: f64| 100.0 * flop * r / 1e9 / peak;
        let mine = median_of(&ours, "train_b4096").unwrap_or(f64::NAN);
        let note = median_of(&theirs, "train_b4096").map_or(String::new(), |r| {
            push(&mut theirs, vec![("train_b4096_peak".into(), share(r))]);
            format!(
                "; PyTorch {:.1} GFLOP/s; twice PyTorch's rate would be {:.0}% of the peak",
                flop * r / 1e9,
                share(2.0 * r)
            )
        });
        progress(&format!(
            "train_b4096: {:.2} GFLOP a step, ours {:.1} GFLOP/s{note}; the FMA peak of {} threads: {peak:.0} GFLOP/s",
            flop / 1e9,
            flop * mine / 1e9,
            flow_matching::kernel::available_threads()
        ));
        push(&mut ours, vec![("train_b4096_peak".into(), share(mine))]);
    }
    if gpu.is_none() && wants("train_traj_b256_peak") {
        let rate = median_of(&ours, "train_traj_b256").unwrap_or(f64::NAN);
        let cfg = train_traj_model(&VarMap::new())?.config().clone();
        let flop = transformer_train_flop(&cfg, TRAIN_TRAJ_BATCH);
        let gflops = flop * rate / 1e9;
        progress(&format!(
            "train_traj_b256: {:.2} GFLOP a step, {gflops:.1} GFLOP/s; the FMA peak of {} threads: {peak:.0} GFLOP/s",
            flop / 1e9,
            flow_matching::kernel::available_threads()
        ));
        push(
            &mut ours,
            vec![("train_traj_b256_peak".into(), 100.0 * gflops / peak)],
        );
    }
    if gpu.is_some() || !wants("peak_rss_b4096") {
        // Peak RSS is a CPU-memory figure; it says nothing about a GPU run.
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(figures(ours, &theirs));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io(Path::new("current_exe"), e))?;
    let child = Command::new(&exe)
        .arg("bench-peak-rss")
        .arg("--model")
        .arg(&model_path)
        .output()
        .map_err(|e| Error::io(&exe, e))?;
    let rss: f64 = String::from_utf8_lossy(&child.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            Error::invalid(
                "peak RSS child output",
                String::from_utf8_lossy(&child.stderr).trim().to_string(),
                "a number of MiB",
            )
        })?;
    push(&mut ours, vec![("peak_rss_b4096".into(), rss)]);
    if torch {
        push(&mut theirs, run_python(opts, &model_path, &["--peak-rss"])?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures(ours, &theirs))
}

/// The median of the figure `name` over the rounds in `acc`, when it was measured.
fn median_of(acc: &[(String, Vec<f64>)], name: &str) -> Option<f64> {
    acc.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| median(v.clone()))
}

/// The medians of both sides' rounds as table rows, in our figures' order.
fn figures(ours: Vec<(String, Vec<f64>)>, theirs: &[(String, Vec<f64>)]) -> Vec<Figure> {
    ours.into_iter()
        .map(|(k, xs)| {
            let unit = if k.ends_with("_peak") {
                "% of FMA peak"
            } else if k.starts_with("gemm") {
                "GFLOP/s"
            } else if k.starts_with("train") {
                "steps/s"
            } else if k.starts_with("peak") {
                "MiB"
            } else {
                "ms"
            };
            let pytorch = median_of(theirs, &k);
            Figure {
                figure: k,
                ours: median(xs),
                pytorch,
                unit,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_traj_b256_is_the_default_transformer_with_a_five_number_condition() {
        let model = train_traj_model(&VarMap::new()).unwrap();
        let cfg = model.config();
        assert_eq!(cfg.x_dims.dims(), &[64, 2]);
        assert_eq!(
            (cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden),
            (64, 3, 4, 128)
        );
        assert_eq!(cfg.cond_features(), TRAIN_TRAJ_COND);
        // 8.48 M multiply-adds a sample (2.65 M a block, of which 0.52 M attention), times
        // two FLOP, three passes and 256 samples.
        let gflop = transformer_train_flop(cfg, TRAIN_TRAJ_BATCH) / 1e9;
        assert!((13.0..13.1).contains(&gflop), "{gflop}");
    }

    #[test]
    fn train_b4096_counts_the_workload_step_and_gemm_b4096_runs() {
        let model = workload_model(&VarMap::new()).unwrap();
        // Forward 34 x 256 + 2 x 256 x 256 + 256 x 2 = 140,288 multiply-adds a row; three
        // passes less the first layer's input gradient (8,704), two FLOP each, 4,096 rows.
        let flop = mlp_train_flop(model.config(), BIG_BATCH);
        assert_eq!(flop, 2.0 * (3.0 * 140_288.0 - 8_704.0) * 4096.0);
        let g = gemm_gflops(1);
        assert!(g.is_finite() && g > 0.0, "{g}");
        let f = Figure {
            figure: "gemm_b4096".into(),
            ours: 200.0,
            pytorch: Some(100.0),
            unit: "GFLOP/s",
        };
        assert_eq!(f.ratio(), Some(2.0));
    }

    #[test]
    fn traj_b6_times_six_trajectories_of_the_waypoint_transformer() {
        let model = traj_model().unwrap();
        let cfg = model.config();
        assert_eq!(cfg.x_dims.dims(), &[64, 2]);
        assert_eq!((cfg.width, cfg.depth, cfg.heads), (64, 3, 4));
        let ms = traj_ms(&model, 1).unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{ms}");
        // The model file PyTorch times is the one we time: it loads back equal.
        let p = std::env::temp_dir().join(format!("fm-traj-b6-{}.safetensors", std::process::id()));
        model.save(&p).unwrap();
        let back = WaypointTransformer::load(&p, &Device::Cpu).unwrap();
        assert_eq!(back.config(), model.config());
        std::fs::remove_file(&p).unwrap();
    }
}
