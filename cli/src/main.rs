//! The `flow-matching` command: a thin layer that parses arguments, calls the library and
//! renders its results and progress.

mod bench;
mod bench_expert;
#[cfg(feature = "onnx")]
mod bench_onnx;
mod bounds;
mod cond;
mod demo;
mod driving;
mod encode;
mod eval;
mod eval_traj;
mod harness;
mod loglik;
#[cfg(feature = "onnx")]
mod onnx;
mod poses;
mod progress;
mod reflow;
mod sample;
mod train;

use clap::{Parser, Subcommand};

use flow_matching::Result;

/// Flow-matching generative models: sample, train, evaluate.
#[derive(Debug, Parser)]
#[command(name = "flow-matching", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train on built-in data, sample, plot, and print quality against step count.
    Demo(demo::DemoArgs),
    /// Train a velocity-mlp or a waypoint transformer (--arch) on a data file or built-in data.
    Train(train::TrainArgs),
    /// Sample quality of a velocity-mlp or ONNX model against data, for several solvers, grids
    /// and step counts.
    Eval(eval::EvalArgs),
    /// minADE/minFDE (metres) of sampled trajectories against the true futures, as the seed
    /// scores them.
    EvalTraj(eval_traj::EvalTrajArgs),
    /// Logged poses (history and future) to the seed's normalised actions and start speeds.
    TrajToActions(poses::TrajToActionsArgs),
    /// Normalised actions to poses (positions and rotation matrices) from v0 or the history.
    ActionsToTraj(poses::ActionsToTrajArgs),
    /// Draw samples from a model (velocity-mlp, waypoint transformer, ONNX network, or an
    /// action-expert directory over a KV cache) and write them as .npy files.
    Sample(sample::SampleArgs),
    /// Log-likelihoods (nats, bits/dim) of data rows under a velocity-mlp model.
    Loglik(loglik::LoglikArgs),
    /// Retrain a velocity-mlp on its own (noise, sample) pairs so that 1-2 Euler steps sample
    /// well.
    Reflow(reflow::ReflowArgs),
    /// Map data to noise by integrating a velocity-mlp's flow backwards.
    Encode(encode::EncodeArgs),
    /// Time sampling and training against PyTorch eager (and ONNX Runtime), side by side.
    Bench(bench::BenchArgs),
    /// One batch-4096 sample, then the peak RSS in MiB (the benchmark's child process).
    #[command(hide = true)]
    BenchPeakRss(bench::PeakRssArgs),
}

/// Runs the command line `args` (the program name first).
fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and succeed; usage errors print clap's message.
            e.exit();
        }
    };
    // A typo in the memory ceiling is refused before anything runs, not silently ignored.
    flow_matching::limits::memory_limit()?;
    if matches!(cli.command, Command::Bench(_) | Command::BenchPeakRss(_)) {
        // The benchmark writes scratch files it reads back at once; it has no outputs to stage.
        return match cli.command {
            Command::Bench(a) => bench::run(a),
            Command::BenchPeakRss(a) => bench::run_peak_rss(a),
            _ => Ok(()),
        };
    }
    // Every output of the command is staged, and renamed only once the command has succeeded:
    // all of them or none (docs/reliability.md).
    let tx = flow_matching::output::Transaction::begin()?;
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::EvalTraj(a) => eval_traj::run(a),
        Command::TrajToActions(a) => poses::run_traj_to_actions(a),
        Command::ActionsToTraj(a) => poses::run_actions_to_traj(a),
        Command::Sample(a) => sample::run(a),
        Command::Loglik(a) => loglik::run(a),
        Command::Reflow(a) => reflow::run(a),
        Command::Encode(a) => encode::run(a),
        Command::Bench(_) | Command::BenchPeakRss(_) => Ok(()),
    }?;
    finish()?;
    drop(tx);
    Ok(())
}

/// The "wrote ..." lines of the running command, printed once its outputs are renamed.
static WROTE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Says `line` (a "wrote ..." report) after the command's outputs are in place, never before.
fn wrote(line: String) {
    WROTE.lock().unwrap_or_else(|p| p.into_inner()).push(line);
}

/// Renames every output staged so far, then prints the deferred [`wrote`] lines (called at the
/// end of every command, or earlier by one that prints a report after its files).
fn finish() -> Result<()> {
    flow_matching::output::commit_open()?;
    let lines = std::mem::take(&mut *WROTE.lock().unwrap_or_else(|p| p.into_inner()));
    for l in lines {
        eprintln!("{l}");
    }
    Ok(())
}

/// Whether a model path names an ONNX network (by its `.onnx` extension).
fn is_onnx(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// How an ONNX model runs: `--runtime tract|ort`, `--ort-lib PATH`, `--ort-threads N`,
/// `--ort-spin`.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeFlags {
    /// For an ONNX model: the runtime, tract (pure Rust, built in) or ort (ONNX Runtime, in a
    /// build with --features ort).
    #[arg(long, default_value = "tract", value_parser = ["tract", "ort"])]
    pub runtime: String,
    /// With --runtime ort: the ONNX Runtime shared library, 1.17 or later (e.g. the onnxruntime
    /// Python wheel's onnxruntime/capi/libonnxruntime.so.<version>); default: $ORT_DYLIB_PATH.
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<std::path::PathBuf>,
    /// With --runtime ort: ONNX Runtime's intra-op threads.
    #[arg(long, value_name = "N")]
    pub ort_threads: Option<usize>,
    /// With --runtime ort: idle intra-op threads spin between ops (ONNX Runtime's and Python's
    /// default): lower latency on several threads, cores kept busy.
    #[arg(long)]
    pub ort_spin: bool,
}

/// Parses a comma-separated list of labels such as `0,1,2`.
fn parse_labels(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|p| {
            p.trim().parse::<u32>().map_err(|_| {
                flow_matching::Error::invalid(
                    "--labels",
                    flow_matching::limits::excerpt(s),
                    format!(
                        "comma-separated class indices; {:?} is not a non-negative integer",
                        flow_matching::limits::excerpt(p)
                    ),
                )
            })
        })
        .collect()
}

fn main() {
    if let Err(e) = run(std::env::args_os()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
