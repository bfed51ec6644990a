//! Sample quality against data for a grid of solvers, time schedules and step counts.

use candle_core::{Device, Tensor};

use rand::SeedableRng;

use crate::data::{DataSource, Dataset};
use crate::diffusion::{Diffusion, SampleOptions};
use crate::error::{Error, Result};
use crate::flow_matching::FlowMatching;
use crate::guidance::Guided;
use crate::metrics::{
    energy_distance, mmd2_rbf, nearest_centroid_accuracy, sliced_wasserstein, Bandwidth,
    MmdEstimator,
};
use crate::model::VelocityMlp;
use crate::progress::{Progress, Reporter};
use crate::schedule::Schedule;
use crate::solver::Method;
use crate::step::StepFn;

/// Random projections of the sliced Wasserstein distance in every report.
pub const PROJECTIONS: usize = 256;

/// One sampler setting to evaluate.
#[derive(Debug, Clone)]
pub struct Setting {
    /// Integration method.
    pub method: Method,
    /// Time grid.
    pub schedule: Schedule,
    /// Step count (ignored by the adaptive method).
    pub steps: usize,
}

/// The quality of one setting.
#[derive(Debug, Clone)]
pub struct Row {
    /// The setting.
    pub setting: Setting,
    /// Mean velocity evaluations per sample batch.
    pub nfe: usize,
    /// Sliced 2-Wasserstein distance between the samples and the reference data.
    pub sliced_wasserstein: f64,
    /// Unbiased MMD² (RBF kernel, median bandwidth) between the samples and the data.
    pub mmd2: f64,
    /// Energy distance between the samples and the data.
    pub energy: f64,
    /// For a conditional model: the fraction a nearest-centroid classifier fitted on the data
    /// labels as the class asked for.
    pub accuracy: Option<f64>,
}

/// What to compare against and how many samples to draw.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Samples to draw per setting.
    pub n: usize,
    /// Seed of the noise and of the projections.
    pub seed: u64,
    /// Classifier-free guidance weight for conditional models (1.0: plain conditional).
    pub guidance: f64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            n: 2000,
            seed: 0,
            guidance: 1.0,
        }
    }
}

/// Labels `0, 1, ..., K-1, 0, 1, ...` for `n` samples of a `K`-class model.
pub fn cycling_labels(n: usize, num_classes: usize) -> Vec<u32> {
    (0..n).map(|i| (i % num_classes.max(1)) as u32).collect()
}

/// Draws `n` samples from `model` with one setting: conditioned on cycling labels (guided with
/// `guidance`) for a conditional model. Returns the samples, their labels and the NFE.
pub fn generate(
    model: &VelocityMlp,
    setting: &Setting,
    n: usize,
    seed: u64,
    guidance: f64,
) -> Result<(Tensor, Option<Vec<u32>>, usize)> {
    let device = model.device().clone();
    let mut fm = FlowMatching::new(model.config().x_dims.dims())?;
    fm.method = setting.method.clone();
    fm.schedule = setting.schedule.clone();
    let opts = SampleOptions {
        steps: Some(setting.steps),
        ..SampleOptions::seeded(seed)
    };
    let k = model.config().num_classes;
    if k == 0 {
        let mut f = model.clone();
        let out = fm.sample(n, &mut f, &device, &opts)?;
        return Ok((out.x, None, out.nfe));
    }
    let labels = cycling_labels(n, k);
    let mut guided;
    let mut cond;
    let f: &mut dyn StepFn = if guidance == 1.0 {
        cond = model.with_labels(&labels)?;
        &mut cond
    } else {
        guided = Guided::new(model, &labels, guidance)?;
        &mut guided
    };
    let out = fm.sample(n, f, &device, &opts)?;
    Ok((out.x, Some(labels), out.nfe))
}

/// Added to the seed of [`subsample`] in [`evaluate`], so the rows kept do not depend on the
/// noise drawn with the same seed.
const SUBSAMPLE_SALT: u64 = 0x5eed_5ab5;

/// At most `n` rows of `data` drawn without replacement with `seed` (the table itself when it
/// has no more): keeps the pairwise metrics O(n²) whatever the size of the file.
///
/// ```
/// use flow_matching::data::DataSource;
/// let d = DataSource::parse("moons").unwrap().load(1000, 0).unwrap();
/// assert_eq!(flow_matching::evaluate::subsample(&d, 50, 1).unwrap().len(), 50);
/// assert_eq!(flow_matching::evaluate::subsample(&d, 5000, 1).unwrap().len(), 1000);
/// ```
pub fn subsample(data: &Dataset, n: usize, seed: u64) -> Result<Dataset> {
    if data.len() <= n {
        return Ok(data.clone());
    }
    if n == 0 {
        return Err(Error::invalid("sample count n", 0, "at least 1"));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx = rand::seq::index::sample(&mut rng, data.len(), n).into_vec();
    idx.sort_unstable();
    let (x, labels) = data.batch(&idx)?;
    Dataset::new(x, labels, data.num_classes)
}

/// Evaluates each setting against `data` (a fresh sample of the data distribution); a table
/// larger than `options.n` rows is subsampled to `n` first ([`subsample`]), so the cost is
/// linear in the table's size.
pub fn evaluate(
    model: &VelocityMlp,
    data: &Dataset,
    settings: &[Setting],
    options: &EvalOptions,
) -> Result<Vec<Row>> {
    evaluate_with_progress(model, data, settings, options, &mut |_| {})
}

/// [`evaluate`], reporting each finished setting to `on_progress`.
pub fn evaluate_with_progress(
    model: &VelocityMlp,
    data: &Dataset,
    settings: &[Setting],
    options: &EvalOptions,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<Row>> {
    let reporter = Reporter::new("eval", 0, settings.len());
    if data.x_dims() != model.config().x_dims.dims() {
        return Err(Error::Shape {
            what: "evaluation data".into(),
            expected: format!("[N, {}] (the model's x_dims)", model.config().x_dims),
            got: data.x.dims().to_vec(),
        });
    }
    let k = model.config().num_classes;
    let data_labels = match (k, &data.labels) {
        (0, _) => None,
        (_, Some(l)) => Some(l.clone()),
        (_, None) => {
            return Err(Error::invalid(
                "evaluation data",
                "unlabelled",
                format!("labels for a conditional model ({k} classes)"),
            ))
        }
    };
    // The metrics below are pairwise: compare against n data rows, not the whole file.
    let data = subsample(data, options.n, options.seed.wrapping_add(SUBSAMPLE_SALT))?;
    let data_labels = data_labels.map(|_| data.labels.clone().unwrap_or_default());
    let real = data.x.to_device(&Device::Cpu)?;
    let mut rows = Vec::with_capacity(settings.len());
    for s in settings {
        let (x, labels, nfe) = generate(model, s, options.n, options.seed, options.guidance)?;
        let x = x.to_device(&Device::Cpu)?;
        let sw = sliced_wasserstein(&real, &x, PROJECTIONS, options.seed)?;
        let mmd2 = mmd2_rbf(&real, &x, Bandwidth::Median, MmdEstimator::Unbiased)?;
        let energy = energy_distance(&real, &x)?;
        let accuracy = match (&data_labels, &labels) {
            (Some(rl), Some(gl)) => Some(nearest_centroid_accuracy(&real, rl, &x, gl)?),
            _ => None,
        };
        rows.push(Row {
            setting: s.clone(),
            nfe,
            sliced_wasserstein: sw,
            mmd2,
            energy,
            accuracy,
        });
        reporter.report(rows.len(), None, None, on_progress);
    }
    Ok(rows)
}

/// The sliced Wasserstein distance between two independent data samples: the noise floor a
/// perfect model would show. Toys get a second fresh sample of `data`'s size; a finite table is
/// split into two random halves. Returns the distance and the sample size it was measured at.
pub fn noise_floor(source: &DataSource, data: &Dataset, seed: u64) -> Result<(f64, usize)> {
    let (a, b) = if source.is_infinite() {
        let other = source.load(data.len(), seed.wrapping_add(2))?;
        (data.x.clone(), other.x)
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let idx = data.shuffled_indices(&mut rng);
        let half = data.len() / 2;
        (
            data.batch(&idx[..half])?.0,
            data.batch(&idx[half..2 * half])?.0,
        )
    };
    let n = a.dim(0)?;
    Ok((sliced_wasserstein(&a, &b, PROJECTIONS, seed)?, n))
}

/// Renders rows as a Markdown table (with an accuracy column when any row has one).
pub fn table(rows: &[Row]) -> String {
    let acc = rows.iter().any(|r| r.accuracy.is_some());
    let mut s = String::from("| method | schedule | steps | NFE | sliced W2 | MMD² | energy |");
    s.push_str(if acc { " class accuracy |\n" } else { "\n" });
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    s.push_str(if acc { " ---: |\n" } else { "\n" });
    for r in rows {
        let steps = if r.setting.method.is_adaptive() {
            "adaptive".to_string()
        } else {
            r.setting.steps.to_string()
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {:.5} | {:.4} |",
            r.setting.method,
            r.setting.schedule,
            steps,
            r.nfe,
            r.sliced_wasserstein,
            r.mmd2,
            r.energy
        ));
        if acc {
            s.push_str(&match r.accuracy {
                Some(a) => format!(" {:.1}% |", 100.0 * a),
                None => " |".to_string(),
            });
        }
        s.push('\n');
    }
    s
}

/// Evaluates each setting for any unconditional step function (an ONNX network, a closure):
/// `n` samples of shape `x_dims` per setting against `data`, with no class accuracy.
pub fn evaluate_step_fn(
    step_fn: &mut dyn StepFn,
    x_dims: &crate::XDims,
    data: &Dataset,
    settings: &[Setting],
    options: &EvalOptions,
) -> Result<Vec<Row>> {
    if data.x_dims() != x_dims.dims() {
        return Err(Error::Shape {
            what: "evaluation data".into(),
            expected: format!("[N, {x_dims}] (the model's x_dims)"),
            got: data.x.dims().to_vec(),
        });
    }
    let real = data.x.to_device(&Device::Cpu)?;
    let mut rows = Vec::with_capacity(settings.len());
    for s in settings {
        let mut fm = FlowMatching::new(x_dims)?;
        fm.method = s.method.clone();
        fm.schedule = s.schedule.clone();
        let opts = SampleOptions {
            steps: Some(s.steps),
            ..SampleOptions::seeded(options.seed)
        };
        let out = fm.sample(options.n, step_fn, &Device::Cpu, &opts)?;
        let x = out.x.to_device(&Device::Cpu)?;
        rows.push(Row {
            setting: s.clone(),
            nfe: out.nfe,
            sliced_wasserstein: sliced_wasserstein(&real, &x, PROJECTIONS, options.seed)?,
            mmd2: mmd2_rbf(&real, &x, Bandwidth::Median, MmdEstimator::Unbiased)?,
            energy: energy_distance(&real, &x)?,
            accuracy: None,
        });
    }
    Ok(rows)
}
