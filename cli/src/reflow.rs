//! `flow-matching reflow`: retrain a model on its own (noise, sample) pairs so that one or two
//! Euler steps sample well.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Device;

use flow_matching::error::Result;
use flow_matching::model::VelocityMlp;
use flow_matching::reflow::{reflow, ReflowOptions};
use flow_matching::solver::Method;
use flow_matching::train::TrainConfig;

/// Arguments of `reflow`.
#[derive(Debug, clap::Args)]
pub struct ReflowArgs {
    /// The velocity-mlp file to straighten.
    #[arg(long)]
    model: PathBuf,
    /// The model file to write (an ordinary velocity-mlp; sample it with --steps 1 or 2).
    #[arg(long)]
    out: PathBuf,
    /// (noise, sample) pairs generated per round.
    #[arg(long, default_value_t = 50_000)]
    pairs: usize,
    /// The solver that generates the pairs: rk4, dopri5, midpoint, heun or euler.
    #[arg(long, default_value = "rk4")]
    method: String,
    /// Its step count.
    #[arg(long, default_value_t = 32)]
    solver_steps: usize,
    /// Rounds of generate-then-retrain (each round starts from the previous round's model).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Training steps per round.
    #[arg(long, default_value_t = 6_000)]
    steps: usize,
    /// Samples per training step.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Peak learning rate of each round (warm-up then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Guidance weight when generating a conditional model's pairs (1: plain conditional).
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Seed of the pairs' noise and of the training draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `reflow`.
pub fn run(a: ReflowArgs) -> Result<()> {
    let device = Device::Cpu;
    // The output is checked and locked before the pairs are generated.
    let _locks =
        flow_matching::output::prepare_outputs(&[("--out", &a.out)], &[("--model", &a.model)])?;
    let model = VelocityMlp::load(&a.model, &device)?;
    let defaults = ReflowOptions::default();
    let options = ReflowOptions {
        pairs: a.pairs,
        method: a.method.parse::<Method>()?,
        solver_steps: a.solver_steps,
        rounds: a.rounds,
        guidance: a.guidance,
        train: TrainConfig {
            steps: a.steps,
            batch_size: a.batch,
            lr: a.lr,
            seed: a.seed,
            ..defaults.train
        },
        seed: a.seed,
    };
    options.validate()?;
    // The pairs (noise and sample, with the solver's stages) and the training run, bounded
    // before the first pair is drawn; the reports grow one small row per round.
    let d = model.config().x_dims.numel();
    crate::bounds::memory(
        format!(
            "reflow --pairs {} of {d} values with --rounds {}",
            a.pairs, a.rounds
        ),
        &[
            crate::bounds::floats(&[a.pairs, d, 12]),
            flow_matching::limits::checked_bytes(&[a.rounds], 64),
        ],
    )?;
    crate::bounds::training(model.config(), a.batch, a.steps)?;
    eprintln!(
        "reflow: {} round(s) of {} pairs ({} in {} steps), then {} steps of batch {} each",
        a.rounds, a.pairs, a.method, a.solver_steps, a.steps, a.batch
    );
    let start = std::time::Instant::now();
    let bar = crate::progress::Bar::new(a.steps, "step");
    let (out, rounds) = reflow(&model, &options, bar.callback())?;
    drop(bar);
    for (i, r) in rounds.iter().enumerate() {
        eprintln!(
            "round {}: {} solver evaluations per pair, mean |x1 - x0|² {:.4}, final loss {:.5}",
            i + 1,
            r.solver_nfe,
            r.mean_pair_distance2,
            r.final_loss
        );
    }
    let source = a
        .model
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().into_owned());
    let meta = HashMap::from([
        ("reflow.source".to_string(), source),
        ("reflow.rounds".to_string(), a.rounds.to_string()),
        ("reflow.pairs".to_string(), a.pairs.to_string()),
        (
            "reflow.solver".to_string(),
            format!("{}:{}", a.method, a.solver_steps),
        ),
        ("reflow.steps".to_string(), a.steps.to_string()),
    ]);
    out.save_with_metadata(&a.out, &[], &meta)?;
    crate::wrote(format!(
        "reflowed in {:.1} s; wrote {}",
        start.elapsed().as_secs_f64(),
        a.out.display()
    ));
    Ok(())
}
