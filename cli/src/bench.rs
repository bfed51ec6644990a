//! `flow-matching bench`: our figures against PyTorch eager's, side by side.

use std::path::PathBuf;

use crate::harness::{self as bench, BenchDevice, BenchOptions};
use flow_matching::{kernel, Result};

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Alternating rounds (ours, then PyTorch's).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// One JSON object a line instead of a table.
    #[arg(long)]
    json: bool,
    /// The Python interpreter that runs the PyTorch reference.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The PyTorch reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/pytorch_reference.py"))]
    script: PathBuf,
    /// Let the script `pip install torch safetensors numpy` first.
    #[arg(long)]
    install: bool,
    /// Scales every repetition count (0.2 for a quick look).
    #[arg(long, default_value_t = 1.0)]
    reps_scale: f64,
    /// Only the ONNX figures (onnx_traj_b6, onnx_traj_b6_ort), not the velocity-mlp ones.
    #[arg(long)]
    onnx_only: bool,
    /// Only the named figures, comma-separated (e.g. `expert_b6_p1024,traj_b6`); every figure
    /// when not given.
    #[arg(long, value_delimiter = ',', value_name = "NAME[,NAME]")]
    figures: Vec<String>,
    /// Where to measure: `cuda` times sample_b1, sample_b64, sample_b4096 and train_b4096 on
    /// GPU 0 against PyTorch eager on CUDA (needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
}

/// The most alternating rounds and the largest repetition scale `bench` accepts: beyond
/// them a run takes hours, which no figure needs.
const MAX_ROUNDS: usize = 100;
const MAX_REPS_SCALE: f64 = 100.0;

/// Every figure `bench` can make on the CPU, in the table's order.
fn known_figures() -> Vec<String> {
    let mut v: Vec<String> = bench::FIGURES.iter().map(|s| s.to_string()).collect();
    #[cfg(feature = "onnx")]
    v.extend(crate::bench_onnx::NAMES.iter().map(|s| s.to_string()));
    v.extend(crate::bench_expert::names());
    v
}

/// Refuses a `--figures` name this build cannot make (listing the known ones).
fn check_figures(names: &[String]) -> Result<()> {
    let known = known_figures();
    for n in names {
        if !known.contains(n) {
            return Err(flow_matching::Error::invalid(
                "--figures",
                n,
                format!("one of {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Refuses a round count or repetition scale that is zero, negative, not a number, or would
/// run for hours (each repetition count is scaled, then rounded, per figure).
fn check_flags(a: &BenchArgs) -> Result<()> {
    check_figures(&a.figures)?;
    if !(1..=MAX_ROUNDS).contains(&a.rounds) {
        return Err(flow_matching::Error::invalid(
            "--rounds",
            a.rounds,
            format!("from 1 to {MAX_ROUNDS}"),
        ));
    }
    if !(a.reps_scale > 0.0 && a.reps_scale <= MAX_REPS_SCALE) {
        return Err(flow_matching::Error::invalid(
            "--reps-scale",
            a.reps_scale,
            format!("a number above 0 and at most {MAX_REPS_SCALE}"),
        ));
    }
    Ok(())
}

/// Arguments of the hidden `bench-peak-rss` child.
#[derive(Debug, clap::Args)]
pub struct PeakRssArgs {
    /// The velocity-mlp file to sample from.
    #[arg(long)]
    model: PathBuf,
}

/// Runs `bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    check_flags(&a)?;
    let picked = a.figures.clone();
    let onnx_only = a.onnx_only;
    let wants = move |name: &str| {
        if !picked.is_empty() {
            return picked.iter().any(|p| p == name);
        }
        !onnx_only || name.starts_with("onnx_")
    };
    let opts = BenchOptions {
        rounds: a.rounds,
        python: a.python.clone(),
        script: a.script.clone(),
        install: a.install,
        reps_scale: a.reps_scale,
        device: a.device,
    };
    if a.device != BenchDevice::Cpu {
        if a.onnx_only {
            return Err(flow_matching::Error::invalid(
                "--onnx-only",
                "with --device cuda",
                "the ONNX figures are CPU figures: use --device cpu",
            ));
        }
        return run_gpu(&a, &opts);
    }
    let torch = a.install || bench::torch_available(&a.python);
    let path = kernel::kernel_path().name();
    let features = kernel::cpu_features();
    let requested = match kernel::requested_path() {
        Ok(Some(p)) if p.name() != path => format!(
            "{} asked for {}, which this CPU lacks",
            kernel::KERNEL_ENV,
            p.name()
        ),
        Ok(Some(_)) => format!("forced by {}", kernel::KERNEL_ENV),
        Ok(None) => "the fastest this CPU has".to_string(),
        Err(e) => format!("{} ignored: {e}", kernel::KERNEL_ENV),
    };
    let cpu = cpu_model();
    let threads = kernel::available_threads();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "header": true, "cpu": cpu, "cpu_features": features, "kernel_path": path,
                "kernel_choice": requested, "threads": threads, "loadavg_at_start": load,
            })
        );
    } else {
        println!("CPU: {cpu}; features: {}", features.join(" "));
        println!(
            "kernel path: {path} ({requested}); {threads} threads; load average at start: {load}"
        );
    }
    let mut figures = bench::run(&opts, &wants, |m| eprintln!("{m}"))?;
    #[cfg(feature = "onnx")]
    figures.extend(crate::bench_onnx::figures(
        &a.python,
        a.rounds,
        a.reps_scale,
        &wants,
        &mut |m| eprintln!("{m}"),
    )?);
    figures.extend(crate::bench_expert::figures(
        &a.python,
        a.rounds,
        a.reps_scale,
        &wants,
        &mut |m| eprintln!("{m}"),
    )?);
    if a.json {
        for f in &figures {
            println!(
                "{}",
                serde_json::json!({
                    "figure": f.figure, "ours": f.ours, "pytorch": f.pytorch,
                    "unit": f.unit, "ratio": f.ratio(), "kernel_path": path,
                })
            );
        }
    } else {
        print_table(&figures);
    }
    if !torch {
        eprintln!(
            "PyTorch is not importable by {}: install it with `{} -m pip install torch safetensors numpy` \
             (or pass --install) to compare",
            a.python, a.python
        );
    }
    Ok(())
}

/// `bench --device cuda`: the GPU figures only (no peak RSS, no ONNX figures, both CPU
/// measures), the GPU named from `nvidia-smi` in the header.
fn run_gpu(a: &BenchArgs, opts: &BenchOptions) -> Result<()> {
    // Opened first, so a CPU-only build or a missing GPU fails before anything runs.
    opts.device.open()?;
    let torch = a.install || bench::torch_available(&a.python);
    let gpu = gpu_name();
    let cpu = cpu_model();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"header": true, "device": a.device.name(), "gpu": gpu, "cpu": cpu})
        );
    } else {
        println!(
            "device: {} (GPU 0: {gpu}); host CPU: {cpu}",
            a.device.name()
        );
    }
    let picked = a.figures.clone();
    let wants = move |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    let figures = bench::run(opts, &wants, |m| eprintln!("{m}"))?;
    if a.json {
        for f in &figures {
            println!(
                "{}",
                serde_json::json!({
                    "figure": f.figure, "ours": f.ours, "pytorch": f.pytorch,
                    "unit": f.unit, "ratio": f.ratio(), "device": a.device.name(), "gpu": gpu,
                })
            );
        }
    } else {
        print_table(&figures);
    }
    if !torch {
        eprintln!(
            "PyTorch is not importable by {}: no PyTorch column on the GPU either",
            a.python
        );
    }
    Ok(())
}

/// GPU 0's name and driver from `nvidia-smi` ("unknown" where it does not answer).
fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version",
            "--format=csv,noheader",
            "--id=0",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            match s.split_once(", ") {
                Some((name, driver)) => format!("{name}, driver {driver}"),
                None => s,
            }
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The text table of `bench`.
fn print_table(figures: &[bench::Figure]) {
    println!(
        "{:<20} {:>12} {:>12} {:>8}  unit",
        "figure", "ours", "theirs", "ratio"
    );
    for f in figures {
        let p = f.pytorch.map_or("-".to_string(), |p| format!("{p:.3}"));
        let r = f.ratio().map_or("-".to_string(), |r| format!("{r:.2}x"));
        println!(
            "{:<20} {:>12.3} {:>12} {:>8}  {}",
            f.figure, f.ours, p, r, f.unit
        );
    }
}

/// The CPU's model name from /proc/cpuinfo ("unknown" elsewhere).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the hidden child: one batch-4096 sample, then prints the peak RSS in MiB.
pub fn run_peak_rss(a: PeakRssArgs) -> Result<()> {
    println!("{:.3}", bench::peak_rss_child(&a.model)?);
    Ok(())
}
