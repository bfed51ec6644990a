//! The command-line interface: a thin layer that parses arguments and calls the library.

mod bench;
mod sample;

use clap::{Parser, Subcommand};

use crate::error::Result;

/// Flow-matching generative models: sample, train, evaluate.
#[derive(Debug, Parser)]
#[command(name = "flow-matching", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Draw samples from a velocity-mlp model and write them as .npy files.
    Sample(sample::SampleArgs),
    /// Time sampling and training against PyTorch eager, side by side.
    Bench(bench::BenchArgs),
    /// One batch-4096 sample, then the peak RSS in MiB (the benchmark's child process).
    #[command(hide = true)]
    BenchPeakRss(bench::PeakRssArgs),
}

/// Runs the command line `args` (the program name first).
pub fn run<I, T>(args: I) -> Result<()>
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
    match cli.command {
        Command::Sample(a) => sample::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchPeakRss(a) => bench::run_peak_rss(a),
    }
}

/// Parses a comma-separated list of labels such as `0,1,2`.
pub(crate) fn parse_labels(s: &str) -> std::result::Result<Vec<u32>, String> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("label {p:?} is not a non-negative integer"))
        })
        .collect()
}
