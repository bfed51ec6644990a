//! `demo --data driving`: flow matching against a regression on multimodal driving futures.
//!
//! Trains a conditional velocity model on fresh driving scenes every step, trains the same
//! network as a plain MSE regression (the baseline of `flow_matching::regression`), then
//! scores both on held-out scenes by minADE_6 / minFDE_6 in metres next to the generator's
//! own references (the oracle: 6 fresh draws of the true future; the conditional mean), and
//! draws a bird's-eye grid of scenes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

use super::train::{Arch, TrainSettings};
use flow_matching::condition::repeat_per_cond;
use flow_matching::data::driving::{
    conditional_means, draw_driving, draw_driving_with, oracle_futures, DrivingSet, COND_DIM,
    HORIZON, SCALES,
};
use flow_matching::diffusion::{Diffusion, SampleOptions};
use flow_matching::error::Result;
use flow_matching::flow_matching::FlowMatching;
use flow_matching::io::stage_npy;
use flow_matching::model::{CondNorm, Condition, VelocityMlp, WaypointTransformer};
use flow_matching::output::{commit, prepare_outputs};
use flow_matching::plot::{trajectory_grid, TrajectoryPanel};
use flow_matching::regression::{predict, regression_loss};
use flow_matching::schedule::Schedule;
use flow_matching::solver::Method;
use flow_matching::step::StepFn;
use flow_matching::train::{
    default_loss_and_grads, ModelConfig, Sizing, TrainOutput, TrainableModel, Trainer,
};
use flow_matching::trajectory::{
    horizon_steps, minade_table, positions, score_actions, MinAde, HORIZONS_S,
};
use flow_matching::XDims;

/// Samples per scene, as in the seed.
pub const K: usize = 6;

/// Monte Carlo draws per scene for the conditional mean.
const MEAN_DRAWS: usize = 256;

/// The solver settings of the table: (method, steps); the pictures use Euler 10.
const SOLVERS: [(Method, usize); 6] = [
    (Method::Euler, 2),
    (Method::Euler, 4),
    (Method::Euler, 10),
    (Method::Euler, 32),
    (Method::Midpoint, 5),
    (Method::Heun, 5),
];

/// A model the demo can train and bind to scene conditions.
pub trait DrivingModel: TrainableModel {
    /// The step function of this model under conditions `[B, COND_DIM]`.
    fn bind(&self, cond: &Tensor) -> Result<Box<dyn StepFn + '_>>;
}

impl DrivingModel for VelocityMlp {
    fn bind(&self, cond: &Tensor) -> Result<Box<dyn StepFn + '_>> {
        Ok(Box::new(self.with_condition(cond)?))
    }
}

impl DrivingModel for WaypointTransformer {
    fn bind(&self, cond: &Tensor) -> Result<Box<dyn StepFn + '_>> {
        Ok(Box::new(self.with_condition(cond)?))
    }
}

/// Trains on fresh scenes every step: flow matching, or the regression baseline when
/// `regression` (same model config and trainer, regression loss, no condition dropout).
fn fit<C>(
    mc: C,
    settings: &TrainSettings,
    sizing: &Sizing,
    regression: bool,
    device: &Device,
) -> Result<TrainOutput<C::Model>>
where
    C: ModelConfig,
{
    let mut config = settings.train_config(sizing)?;
    if regression {
        config.cond_drop_rate = 0.0;
    }
    let mut trainer = Trainer::<C::Model>::new(mc, config, device)?;
    if regression {
        trainer = trainer.with_loss_fn(regression_loss(Box::new(
            default_loss_and_grads::<C::Model>,
        )));
    }
    let bar = crate::progress::Bar::new(sizing.steps, "step");
    trainer = trainer.with_progress(bar.callback());
    trainer.train(|rng: &mut StdRng, b| {
        let d = draw_driving_with(b, rng)?;
        Ok((d.x, Condition::features(d.cond)))
    })
}

/// `K` flow-matching samples per held-out scene, condition-major `[N * K, 64, 2]`, and the
/// function evaluations it took.
fn sample<M: DrivingModel>(
    model: &M,
    test: &DrivingSet,
    method: &Method,
    steps: usize,
    seed: u64,
) -> Result<(Tensor, usize)> {
    let cond = repeat_per_cond(&test.cond, K)?;
    let n = cond.dim(0)?;
    let mut f = model.bind(&cond)?;
    let mut fm = FlowMatching::new([HORIZON, 2])?.with_steps(steps)?;
    fm.method = method.clone();
    fm.schedule = Schedule::Uniform;
    let out = fm.sample(n, f.as_mut(), model.device(), &SampleOptions::seeded(seed))?;
    Ok((out.x, out.nfe))
}

/// The baseline's one prediction per held-out scene `[N, 64, 2]`.
fn baseline<M: DrivingModel>(model: &M, test: &DrivingSet) -> Result<Tensor> {
    let mut f = model.bind(&test.cond)?;
    predict(
        f.as_mut(),
        test.scenes.len(),
        &[HORIZON, 2],
        DType::F32,
        model.device(),
    )
}

/// The condition's shape and standardisation, from 4096 scenes (the same probe as
/// `train --data driving`).
fn cond_shape() -> Result<(XDims, CondNorm)> {
    let probe = draw_driving(4096, 12345)?;
    Ok((XDims::new([COND_DIM])?, CondNorm::from_rows(&probe.cond)?))
}

/// The files the demo writes into its directory.
const FILES: [&str; 7] = [
    "model.safetensors",
    "samples.npy",
    "baseline.npy",
    "test_x.npy",
    "test_cond.npy",
    "test_v0.npy",
    "scenes.png",
];

/// Runs the driving demo into `out_dir` with the velocity-mlp or the waypoint transformer:
/// `sizing.steps` training steps for each model, `n_test` held-out scenes.
pub fn run(
    out_dir: &Path,
    settings: &TrainSettings,
    sizing: &Sizing,
    arch: Arch,
    n_test: usize,
    seed: u64,
) -> Result<()> {
    crate::bounds::at_least_one("--n", n_test)?;
    std::fs::create_dir_all(out_dir).map_err(|e| flow_matching::Error::io(out_dir, e))?;
    let paths: Vec<PathBuf> = FILES.iter().map(|f| out_dir.join(f)).collect();
    let outputs: Vec<(&str, &Path)> = FILES
        .iter()
        .zip(&paths)
        .map(|(f, p)| (*f, p.as_path()))
        .collect();
    let _locks = prepare_outputs(&outputs, &[])?;
    let (dims, norm) = cond_shape()?;
    match arch {
        Arch::Transformer => {
            let mut mc = settings.transformer_config(sizing, &[HORIZON, 2])?;
            (mc.cond_dims, mc.cond_norm) = (Some(dims), Some(norm));
            mc.validate()?;
            eprintln!(
                "driving: a waypoint transformer (width {}, depth {}, heads {}), {} steps of batch {} on fresh scenes",
                mc.width, mc.depth, mc.heads, sizing.steps, sizing.batch_size
            );
            run_with(mc, out_dir, settings, sizing, n_test, seed)
        }
        Arch::Mlp => {
            let mut mc = settings.model_config(sizing, &[HORIZON, 2], 0)?;
            (mc.cond_dims, mc.cond_norm) = (Some(dims), Some(norm));
            mc.validate()?;
            eprintln!(
                "driving: a velocity-mlp (hidden {}, depth {}), {} steps of batch {} on fresh scenes",
                mc.hidden, mc.depth, sizing.steps, sizing.batch_size
            );
            run_with(mc, out_dir, settings, sizing, n_test, seed)
        }
    }
}

/// The demo for one model config.
fn run_with<C>(
    mc: C,
    out_dir: &Path,
    settings: &TrainSettings,
    sizing: &Sizing,
    n_test: usize,
    seed: u64,
) -> Result<()>
where
    C: ModelConfig,
    C::Model: DrivingModel,
{
    let device = Device::Cpu;
    let start = Instant::now();
    let fm_out = fit(mc.clone(), settings, sizing, false, &device)?;
    let fm_secs = start.elapsed().as_secs_f64();
    eprintln!("driving: flow matching trained in {fm_secs:.1} s; now the regression baseline");
    let start = Instant::now();
    let reg_out = fit(mc, settings, sizing, true, &device)?;
    let reg_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let test = draw_driving(n_test, seed.wrapping_add(1_000_003))?;
    let v0 = test.speeds();
    let h = horizon_steps(&HORIZONS_S);
    let v0_t = Tensor::from_vec(
        v0.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        v0.len(),
        &device,
    )?;
    let mut rows: Vec<(String, MinAde)> = Vec::new();
    let mut picture = None;
    for (method, steps) in SOLVERS {
        let (x, nfe) = sample(&fm_out.model, &test, &method, steps, seed)?;
        let m = score_actions(&x, &test.x, &v0, K, &SCALES, &h)?;
        rows.push((
            format!("flow matching, {method} {steps} steps (NFE {nfe})"),
            m,
        ));
        if method == Method::Euler && steps == 10 {
            picture = Some(x);
        }
    }
    let base = baseline(&reg_out.model, &test)?;
    let base_rep = repeat_per_cond(&base, K)?;
    rows.push((
        "regression baseline (same network, MSE)".into(),
        score_actions(&base_rep, &test.x, &v0, K, &SCALES, &h)?,
    ));
    let mean = conditional_means(&test.scenes, MEAN_DRAWS, seed.wrapping_add(7))?;
    rows.push((
        format!("conditional mean ({MEAN_DRAWS} draws)"),
        score_actions(&mean, &test.x, &v0, 1, &SCALES, &h)?,
    ));
    let oracle = oracle_futures(&test.scenes, K, seed.wrapping_add(11))?;
    rows.push((
        "oracle (6 fresh true futures)".into(),
        score_actions(&oracle, &test.x, &v0, K, &SCALES, &h)?,
    ));
    let eval_secs = start.elapsed().as_secs_f64();

    let Some(samples) = picture else {
        return Err(flow_matching::Error::invalid(
            "driving demo",
            "no Euler 10-step row",
            "the table's Euler 10-step samples for the picture",
        ));
    };
    // Every file is staged first and renamed into place together.
    let file = |f: &str| out_dir.join(f);
    fm_out.model.save_with_metadata(
        &file("model.safetensors"),
        &[],
        &std::collections::HashMap::new(),
    )?;
    let staged = vec![
        stage_npy(file("samples.npy"), &samples)?,
        stage_npy(file("baseline.npy"), &base)?,
        stage_npy(file("test_x.npy"), &test.x)?,
        stage_npy(file("test_cond.npy"), &test.cond)?,
        stage_npy(file("test_v0.npy"), &v0_t)?,
    ];
    draw(&file("scenes.png"), &test, &samples, &base)?;
    commit(staged)?;
    crate::finish()?;
    println!(
        "trained flow matching in {fm_secs:.0} s and the baseline in {reg_secs:.0} s; sampled and scored {n_test} held-out scenes in {eval_secs:.0} s"
    );
    println!("wrote {}/{{{}}}\n", out_dir.display(), FILES.join(", "));
    println!("minADE_6 / minFDE_6 in metres over {n_test} held-out scenes (K = {K}):\n");
    println!("{}", minade_table(&rows));
    let ade = |prefix: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map_or(f64::NAN, |(_, m)| m.ade_full())
    };
    let fm10 = ade("flow matching, euler 10 ");
    println!(
        "bars (6.4 s, euler 10): flow matching / oracle = {:.2} (at most 1.3), flow matching / baseline = {:.2} (at most 0.5)",
        fm10 / ade("oracle"),
        fm10 / ade("regression baseline")
    );
    Ok(())
}

/// The bird's-eye grid: 12 held-out scenes with the truth, 6 samples and the baseline.
fn draw(path: &Path, test: &DrivingSet, samples: &Tensor, base: &Tensor) -> Result<()> {
    let n = test.scenes.len().min(12);
    let v0 = test.speeds();
    let rep: Vec<f64> = v0[..n]
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, K))
        .collect();
    let pts = |t: &Tensor| -> Result<Vec<Vec<(f64, f64)>>> {
        Ok(t.to_dtype(DType::F64)?
            .to_vec3::<f64>()?
            .into_iter()
            .map(|r| r.into_iter().map(|p| (p[0], p[1])).collect())
            .collect())
    };
    let truth = pts(&positions(&test.x.narrow(0, 0, n)?, &v0[..n], &SCALES)?)?;
    let samp = pts(&positions(&samples.narrow(0, 0, n * K)?, &rep, &SCALES)?)?;
    let basep = pts(&positions(&base.narrow(0, 0, n)?, &v0[..n], &SCALES)?)?;
    let panels: Vec<TrajectoryPanel> = (0..n)
        .map(|i| {
            let s = &test.scenes[i];
            let mut layout = String::new();
            if s.left_ok {
                layout.push('L');
            }
            if s.right_ok {
                layout.push('R');
            }
            let light = if s.red { ", red" } else { "" };
            let lead = s
                .lead_gap
                .map(|g| format!(", lead {g:.0} m"))
                .unwrap_or_default();
            // The junction's stop line, across the lane.
            let road = vec![vec![(s.junction, -4.0), (s.junction, 4.0)]];
            TrajectoryPanel {
                title: format!(
                    "{:.0} m/s, junction {:.0} m {layout}{light}{lead}: {}",
                    s.v0,
                    s.junction,
                    test.intents[i].name()
                ),
                truth: truth[i].clone(),
                samples: samp[i * K..(i + 1) * K].to_vec(),
                baseline: Some(basep[i].clone()),
                road,
            }
        })
        .collect();
    trajectory_grid(
        path,
        &panels,
        4,
        "driving: truth (black), 6 flow-matching samples (blue), regression (red)",
    )
}
