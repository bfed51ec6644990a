//! The README's few-step table: sample quality (sliced W2 to fresh data, and its ratio to the
//! data-to-data floor) against the number of Euler steps, for a base model (independent
//! coupling), an OT-coupled model and a reflowed model, on each built-in 2-D data set and on
//! user files.
//!
//! ```text
//! cargo run --release --example few_step_table -- [--data moons,8gaussians,...] \
//!     [--user TRAIN.npy:HELDOUT.npy] [--n 2000] [--seed 0] [--rounds 1]
//! ```
//!
//! Every model is trained with the defaults the CLI uses (sizes from `Sizing::for_data`). A
//! toy is compared with `n` fresh points, its floor is two fresh `n`-point samples; a user
//! file is compared with the first `n` rows of HELDOUT, its floor is `n` training rows
//! against the same held-out rows, so samples and floor are measured at equal sizes.

use std::time::Instant;

use candle_core::Device;
use flow_matching::coupling::Coupling;
use flow_matching::data::{DataSource, Dataset};
use flow_matching::evaluate::{evaluate, noise_floor, EvalOptions, Setting, PROJECTIONS};
use flow_matching::metrics::sliced_wasserstein;
use flow_matching::reflow::{reflow, ReflowOptions};
use flow_matching::train::{AdamWParams, LrSchedule, Sizing, TrainConfig, Trainer};
use flow_matching::{Method, Result, Schedule, VelocityMlp, VelocityMlpConfig, XDims};

const STEPS: [usize; 5] = [1, 2, 4, 8, 32];

/// CPU seconds (user + system) of this process so far, from /proc (0 where unavailable).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The CLI's default training settings for data of `rows` rows (None: endless) of `dim`.
fn default_config(rows: Option<usize>, dim: usize, seed: u64) -> (Sizing, TrainConfig) {
    let s = Sizing::for_data(rows, dim);
    let c = TrainConfig {
        steps: s.steps,
        batch_size: s.batch_size,
        lr: 2e-3,
        adamw: AdamWParams::default(),
        max_grad_norm: Some(1.0),
        warmup_steps: 100,
        schedule: LrSchedule::Cosine { min_lr: 0.0 },
        ema_decay: 0.999,
        ema_warmup: true,
        timestep_sampler: "logit-normal".parse().expect("a valid sampler name"),
        cond_drop_rate: 0.1,
        seed,
        checkpoint_every: 0,
        coupling: Coupling::Independent,
    };
    (s, c)
}

struct Case {
    name: String,
    source: DataSource,
    table: Option<Dataset>,
    reference: Dataset,
    floor: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let n: usize = get("--n").and_then(|s| s.parse().ok()).unwrap_or(2000);
    let seed: u64 = get("--seed").and_then(|s| s.parse().ok()).unwrap_or(0);
    let rounds: usize = get("--rounds").and_then(|s| s.parse().ok()).unwrap_or(1);
    let names =
        get("--data").unwrap_or_else(|| "moons,8gaussians,checkerboard,circles,swissroll".into());
    let device = Device::Cpu;

    let mut cases = Vec::new();
    for name in names.split(',').filter(|s| !s.is_empty()) {
        let source = DataSource::parse(name)?;
        let reference = source.load(n, seed.wrapping_add(1))?;
        let (floor, _) = noise_floor(&source, &reference, seed)?;
        cases.push(Case {
            name: name.to_string(),
            source,
            table: None,
            reference,
            floor,
        });
    }
    if let Some(spec) = get("--user") {
        let (train, held) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        let source = DataSource::parse(train)?;
        let table = source.load(0, 0)?;
        let held = DataSource::parse(held)?.load(0, 0)?;
        let first: Vec<usize> = (0..n.min(held.len())).collect();
        let reference = Dataset::new(held.batch(&first)?.0, None, 0)?;
        let rows: Vec<usize> = (0..n.min(table.len())).collect();
        let floor = sliced_wasserstein(&table.batch(&rows)?.0, &reference.x, PROJECTIONS, seed)?;
        cases.push(Case {
            name: std::path::Path::new(train)
                .file_name()
                .map_or(train.to_string(), |f| f.to_string_lossy().into_owned()),
            source,
            table: Some(table),
            reference,
            floor,
        });
    }

    let settings: Vec<Setting> = STEPS
        .iter()
        .map(|&s| Setting {
            method: Method::Euler,
            schedule: Schedule::Uniform,
            steps: s,
        })
        .collect();
    let eval_opts = EvalOptions {
        n,
        seed,
        guidance: 1.0,
    };
    let mut out = String::from(
        "| data | model | 1 step | 2 steps | 4 steps | 8 steps | 32 steps | floor | train s (CPU s) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for case in &cases {
        let rows = case.table.as_ref().map(Dataset::len);
        let (sizing, config) = default_config(rows, 2, seed);
        let mc = VelocityMlpConfig {
            hidden: sizing.hidden,
            depth: sizing.depth,
            ..VelocityMlpConfig::new(XDims::new(2)?)
        };
        let draw = |rng: &mut rand::rngs::StdRng, b: usize| match &case.table {
            Some(t) => Ok((t.random_batch(rng, b)?.0, None)),
            None => Ok((case.source.draw_batch(rng, b)?.0, None)),
        };
        let train = |coupling: Coupling| -> Result<(VelocityMlp, f64, f64)> {
            let (w, c) = (Instant::now(), cpu_seconds());
            let config = TrainConfig {
                coupling,
                ..config.clone()
            };
            let mut t = Trainer::new(mc.clone(), config, &device)?;
            let m = t.train(draw)?.model;
            Ok((m, w.elapsed().as_secs_f64(), cpu_seconds() - c))
        };
        let mut models = Vec::new();
        let (base, bw, bc) = train(Coupling::Independent)?;
        eprintln!(
            "{}: base trained in {bw:.1} s ({bc:.1} CPU s), {sizing}",
            case.name
        );
        let (ot, ow, oc) = train("ot".parse()?)?;
        eprintln!("{}: OT trained in {ow:.1} s ({oc:.1} CPU s)", case.name);
        let (w, c) = (Instant::now(), cpu_seconds());
        let ropts = ReflowOptions {
            rounds,
            seed,
            ..ReflowOptions::default()
        };
        let (re, reports) = reflow(&base, &ropts, |_| {})?;
        for (r, rep) in reports.iter().enumerate() {
            eprintln!(
                "{}: reflow round {} loss {:.4}",
                case.name,
                r + 1,
                rep.final_loss
            );
        }
        let (rw, rc) = (w.elapsed().as_secs_f64(), cpu_seconds() - c);
        eprintln!("{}: reflow in {rw:.1} s ({rc:.1} CPU s)", case.name);
        models.push(("base".to_string(), base, bw, bc));
        models.push(("OT".to_string(), ot, ow, oc));
        models.push((format!("reflow x{rounds}"), re, bw + rw, bc + rc));
        for (label, model, wall, cpu) in &models {
            let rows = evaluate(model, &case.reference, &settings, &eval_opts)?;
            out.push_str(&format!("| {} | {label} |", case.name));
            for r in &rows {
                out.push_str(&format!(
                    " {:.3} ({:.1}x) |",
                    r.sliced_wasserstein,
                    r.sliced_wasserstein / case.floor
                ));
            }
            out.push_str(&format!(" {:.3} | {wall:.0} ({cpu:.0}) |\n", case.floor));
        }
        eprint!("{out}");
    }
    println!("{out}");
    Ok(())
}
