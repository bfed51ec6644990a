//! `flow-matching demo`: train on built-in data, sample, plot, and print quality against steps.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Parser;

use super::eval::settings;
use super::train::{fit, TrainSettings, TrainingData};
use flow_matching::diffusion::{Diffusion, SampleOptions};
use flow_matching::error::Result;
use flow_matching::evaluate::{evaluate, generate, noise_floor, table, EvalOptions, Setting};
use flow_matching::flow_matching::FlowMatching;
use flow_matching::io::write_npy;
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// moons (default), 8gaussians, checkerboard, circles, swissroll, digits, or driving
    /// (conditional trajectories: flow matching against a regression, minADE/minFDE).
    #[arg(long, default_value = "moons")]
    data: String,
    /// Train a class-conditional model (digits: one row of the image per class).
    #[arg(long)]
    conditional: bool,
    /// Where to write the model, samples and pictures.
    #[arg(long, default_value = "demo")]
    out_dir: PathBuf,
    /// Training steps (default: 10000 for 2-D toys, 6000 for digits, 3000 for driving).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance weight when sampling a conditional model.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Samples drawn for the table and the pictures (driving: held-out scenes, default 500).
    #[arg(long)]
    n: Option<usize>,
    /// The velocity network of the driving demo: mlp or transformer.
    #[arg(long, default_value = "mlp")]
    arch: String,
    /// Seed of everything.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The demo's training settings: the `train` defaults with a size that trains in about a minute.
fn preset(digits: bool, steps: Option<usize>, seed: u64) -> Result<TrainSettings> {
    let mut args = vec!["preset".to_string()];
    if digits {
        args.extend(
            [
                "--hidden", "256", "--depth", "3", "--batch", "256", "--lr", "2e-3",
            ]
            .map(String::from),
        );
    } else {
        args.extend(
            [
                "--hidden", "128", "--depth", "3", "--batch", "256", "--lr", "2e-3",
            ]
            .map(String::from),
        );
    }
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        s: TrainSettings,
    }
    // Parsing fixed literals through clap keeps one source of truth for the defaults.
    let mut s = Wrap::try_parse_from(args)
        .map(|w| w.s)
        .map_err(|e| flow_matching::Error::invalid("demo preset", e, "valid training settings"))?;
    s.steps = Some(steps.unwrap_or(if digits { 6000 } else { 10000 }));
    s.seed = seed;
    Ok(s)
}

/// Training steps of the driving demo (each model).
const DRIVING_STEPS: usize = 3000;

/// The driving demo's sizes: velocity-mlp hidden 512, depth 3 (transformer: width 64,
/// depth 3), batch 256.
fn driving(a: &DemoArgs) -> Result<()> {
    let arch: super::train::Arch = a.arch.parse()?;
    let settings = preset(false, Some(a.steps.unwrap_or(DRIVING_STEPS)), a.seed)?;
    let sizing = flow_matching::train::Sizing {
        hidden: 512,
        depth: 3,
        batch_size: 256,
        steps: a.steps.unwrap_or(DRIVING_STEPS),
    };
    super::driving::run(
        &a.out_dir,
        &settings,
        &sizing,
        arch,
        a.n.unwrap_or(500),
        a.seed,
    )
}

/// Runs `demo`.
pub fn run(a: DemoArgs) -> Result<()> {
    if a.data == "driving" {
        return driving(&a);
    }
    if a.arch != "mlp" {
        return Err(flow_matching::Error::invalid(
            "--arch",
            flow_matching::limits::excerpt(&a.arch),
            "mlp: --arch transformer is for --data driving",
        ));
    }
    let n = a.n.unwrap_or(2000);
    let device = Device::Cpu;
    let data = TrainingData::open(&a.data, None, a.conditional)?;
    let digits = data.x_dims == [64];
    let train_settings = preset(digits, a.steps, a.seed)?;
    std::fs::create_dir_all(&a.out_dir).map_err(|e| flow_matching::Error::io(&a.out_dir, e))?;
    let model_path = a.out_dir.join("model.safetensors");
    let (loss_png, samples_npy, samples_png) = (
        a.out_dir.join("loss.png"),
        a.out_dir.join("samples.npy"),
        a.out_dir.join("samples.png"),
    );
    crate::bounds::at_least_one("--n", n)?;
    let _locks = flow_matching::output::prepare_outputs(
        &[
            ("model", &model_path),
            ("loss plot", &loss_png),
            ("samples", &samples_npy),
            ("sample plot", &samples_png),
        ],
        &[],
    )?;
    let (sizing, _) = data.sizing(&train_settings);
    eprintln!(
        "training a velocity-mlp (hidden {}, depth {}) on {} for {} steps of batch {}",
        sizing.hidden, sizing.depth, data.source, sizing.steps, sizing.batch_size
    );
    let start = std::time::Instant::now();
    let out = fit(&data, &train_settings, None, &model_path, &device)?;
    let train_secs = start.elapsed().as_secs_f64();
    let model = out.model;
    let losses: Vec<(usize, f64)> = out.history.iter().map(|&(s, l)| (s, l as f64)).collect();
    flow_matching::plot::loss_curve(
        a.out_dir.join("loss.png"),
        &losses,
        &format!("training loss ({})", data.source),
    )?;

    // The picture and samples.npy: 32 Euler steps.
    let final_setting = Setting {
        method: Method::Euler,
        schedule: Schedule::Uniform,
        steps: 32,
    };
    let (x, _labels, _) = generate(&model, &final_setting, n, a.seed, a.guidance)?;
    write_npy(a.out_dir.join("samples.npy"), &x)?;
    let reference = data.source.load(n, a.seed.wrapping_add(1))?;
    if digits {
        let k = model.config().num_classes;
        let (grid, names) = if k > 0 {
            let (g, _, _) = generate(
                &model,
                &final_setting,
                10 * k,
                a.seed.wrapping_add(7),
                a.guidance,
            )?;
            // Rows of the grid are classes: sample i has label i % k, so transpose the order.
            let idx: Vec<u32> = (0..k)
                .flat_map(|c| (0..10).map(move |j| (j * k + c) as u32))
                .collect();
            let idx = Tensor::from_vec(idx, 10 * k, &device)?;
            (
                g.index_select(&idx, 0)?,
                Some((0..k).map(|c| c.to_string()).collect::<Vec<_>>()),
            )
        } else {
            (x.narrow(0, 0, 100.min(n))?, None)
        };
        let rows = grid.dim(0)?.div_ceil(10);
        flow_matching::plot::digit_grid(
            a.out_dir.join("samples.png"),
            &grid,
            rows,
            10,
            names.as_deref(),
            "generated digits",
        )?;
    } else {
        // The same seed draws the same first rows of noise, so these paths end on plotted samples.
        let fm = FlowMatching::new(2)?.with_steps(32)?;
        let opts = SampleOptions {
            return_all_steps: true,
            x_init: Some(fm.noise(12, Some(a.seed), candle_core::DType::F32, &device)?),
            ..Default::default()
        };
        let mut f = model.clone();
        let traj = fm.sample(12, &mut f, &device, &opts)?.trajectory;
        flow_matching::plot::scatter_2d(
            a.out_dir.join("samples.png"),
            &reference.x,
            &x,
            traj.as_ref(),
            &format!("{}: data (grey) and 32-step Euler samples", data.source),
        )?;
    }

    let steps = [1, 2, 4, 8, 16, 32];
    let rows = evaluate(
        &model,
        &reference,
        &settings("euler", "uniform", &steps)?,
        &EvalOptions {
            n,
            seed: a.seed,
            guidance: a.guidance,
        },
    )?;
    let (floor, floor_n) = noise_floor(&data.source, &reference, a.seed)?;
    crate::finish()?;
    println!("trained in {train_secs:.1} s; wrote {}/{{model.safetensors, samples.npy, samples.png, loss.png}}\n", a.out_dir.display());
    println!("{}", table(&rows));
    println!(
        "reference: sliced W2 between two independent data samples = {floor:.4} (n = {floor_n})"
    );
    Ok(())
}
