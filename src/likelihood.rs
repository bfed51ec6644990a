//! Exact and estimated log-likelihoods through the instantaneous change of variables.
//!
//! With dx/dt = v(x, t) carrying noise at t = 0 to data at t = 1,
//! `log p1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt`. We integrate the augmented state
//! `(x, l)` with `dl/dt = div v` from the data at t = 1 (where l = 0) back to t = 0, so that
//! `l(0) = -∫_0^1 div v dt` and `log p1(x1) = log N(x0) + l(0)`.
//!
//! The divergence comes from candle's autograd: exactly, with one backward pass per dimension
//! (for small D), or by Hutchinson's estimator `E[e^T J e]` with K seeded probes `e`, drawn
//! once and held fixed along the trajectory so that the augmented ODE stays deterministic.

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::flow_matching::randn;
use crate::schedule::Schedule;
use crate::solver::Method;
use crate::step::{checked_step, StepFn};

/// The distribution of Hutchinson's probe vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeKind {
    /// Entries ±1 with equal probability (the lower-variance choice).
    #[default]
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

impl std::str::FromStr for ProbeKind {
    type Err = Error;

    /// Parses `rademacher` or `gaussian`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rademacher" => Ok(ProbeKind::Rademacher),
            "gaussian" | "normal" => Ok(ProbeKind::Gaussian),
            _ => Err(Error::UnknownName {
                kind: "probe distribution",
                name: s.to_string(),
                known: "rademacher, gaussian".into(),
            }),
        }
    }
}

/// How the divergence of the velocity is computed.
#[derive(Debug, Clone, PartialEq)]
pub enum Divergence {
    /// Exact: one backward pass per dimension of x.
    Exact,
    /// Hutchinson's estimator with `probes` probe vectors per row, drawn from `seed`.
    Hutchinson {
        /// Number of probes K (at least 1); each costs one backward pass per evaluation.
        probes: usize,
        /// Their distribution.
        kind: ProbeKind,
        /// Seed of the probes.
        seed: u64,
    },
}

/// Options of [`log_likelihood`].
#[derive(Debug, Clone)]
pub struct LikelihoodOptions {
    /// How the divergence is computed.
    pub divergence: Divergence,
    /// Integration method on the augmented state (RK4 by default).
    pub method: Method,
    /// Number of steps (ignored by a custom grid and by adaptive methods).
    pub steps: usize,
    /// Time grid, run backwards from 1 to 0.
    pub schedule: Schedule,
    /// The dtype of the augmented state.
    pub dtype: DType,
}

impl Default for LikelihoodOptions {
    fn default() -> Self {
        LikelihoodOptions {
            divergence: Divergence::Exact,
            method: Method::Rk4,
            steps: 32,
            schedule: Schedule::Uniform,
            dtype: DType::F32,
        }
    }
}

/// Per-sample log-likelihoods and what they were computed from.
#[derive(Debug, Clone)]
pub struct LogLikelihood {
    /// `log p(x)` of each row, in nats.
    pub log_p: Vec<f64>,
    /// `-∫_0^1 div v dt` of each row (the change of log-density along the path).
    pub delta_log_p: Vec<f64>,
    /// The noise each row maps to at t = 0, `[B, *x_dims]`.
    pub noise: Tensor,
    /// The number of dimensions D of one sample.
    pub dims: usize,
    /// Velocity evaluations (each with its backward passes).
    pub nfe: usize,
}

impl LogLikelihood {
    /// Bits per dimension of each row, `-log p / (D ln 2)`.
    pub fn bits_per_dim(&self) -> Vec<f64> {
        let scale = self.dims as f64 * std::f64::consts::LN_2;
        self.log_p.iter().map(|l| -l / scale).collect()
    }

    /// The mean log-likelihood over the rows.
    pub fn mean(&self) -> f64 {
        mean(&self.log_p)
    }

    /// The standard error of [`mean`](Self::mean) (sample standard deviation / sqrt(N); 0 for one row).
    pub fn std_err(&self) -> f64 {
        std_err(&self.log_p)
    }

    /// Bits per dimension of the mean log-likelihood.
    pub fn mean_bits_per_dim(&self) -> f64 {
        -self.mean() / (self.dims as f64 * std::f64::consts::LN_2)
    }
}

/// The mean of a non-empty slice (0 for an empty one).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The standard error of the mean: sample standard deviation over sqrt(N); 0 below two values.
pub fn std_err(v: &[f64]) -> f64 {
    let n = v.len();
    if n < 2 {
        return 0.0;
    }
    let m = mean(v);
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (var / n as f64).sqrt()
}

/// `log N(x; 0, I)` of each row of `x` `[B, ...]`.
pub fn standard_normal_log_density(x: &Tensor) -> Result<Vec<f64>> {
    let b = x.dim(0)?;
    let d = x.elem_count() / b.max(1);
    let sq = x
        .to_dtype(DType::F64)?
        .reshape((b, d))?
        .sqr()?
        .sum(1)?
        .to_vec1::<f64>()?;
    let c = -0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln();
    Ok(sq.into_iter().map(|s| c - 0.5 * s).collect())
}

/// The augmented field on `[B, D + 1]`: the velocity of the first D columns and the divergence
/// in the last one.
struct Augmented<'f> {
    field: &'f mut dyn StepFn,
    x_shape: Vec<usize>,
    d: usize,
    divergence: &'f Divergence,
    probes: Vec<Tensor>,
}

impl Augmented<'_> {
    /// The velocity `[B, *x_dims]` and divergence `[B]` at `x` and per-row times `t`.
    fn velocity_and_divergence(&mut self, x: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        // The model's weights carry no gradient; x is a fresh variable per evaluation, so each
        // backward pass only reaches this evaluation's graph.
        let xv = Var::from_tensor(&x.detach())?;
        let xt = xv.as_tensor();
        let v = checked_step(self.field, xt, t)?;
        let b = x.dim(0)?;
        let v_flat = v.reshape((b, self.d))?;
        let mut div = Tensor::zeros(b, x.dtype(), x.device())?;
        match self.divergence {
            Divergence::Exact => {
                for i in 0..self.d {
                    let grads = v_flat.narrow(1, i, 1)?.sum_all()?.backward()?;
                    let g = grads.get(xt).ok_or_else(not_differentiable)?;
                    let gi = g.reshape((b, self.d))?.narrow(1, i, 1)?.squeeze(1)?;
                    div = (div + gi)?;
                }
            }
            Divergence::Hutchinson { .. } => {
                let k = self.probes.len() as f64;
                for e in &self.probes {
                    let grads = (&v * e)?.sum_all()?.backward()?;
                    let g = grads.get(xt).ok_or_else(not_differentiable)?;
                    let est = (g * e)?.reshape((b, self.d))?.sum(1)?;
                    div = (div + est.affine(1.0 / k, 0.0)?)?;
                }
            }
        }
        Ok((v.detach(), div.detach()))
    }
}

fn not_differentiable() -> Error {
    Error::invalid(
        "velocity field",
        "not differentiable in x",
        "a field built from candle operations on x (its output must depend on x)",
    )
}

impl StepFn for Augmented<'_> {
    fn step(&mut self, z: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t = t.flatten_all()?.get(0)?.to_dtype(DType::F64)?.to_scalar()?;
        self.step_at(z, t)
    }

    fn step_at(&mut self, z: &Tensor, t: f64) -> Result<Tensor> {
        let x = z.narrow(1, 0, self.d)?.reshape(self.x_shape.as_slice())?;
        let (v, div) = self.velocity_and_divergence(&x, t)?;
        let b = z.dim(0)?;
        Ok(Tensor::cat(
            &[v.reshape((b, self.d))?, div.unsqueeze(1)?],
            1,
        )?)
    }
}

/// Log-likelihoods of the rows of `x` `[B, *x_dims]` (data at t = 1) under the flow of `field`.
///
/// `field` must be differentiable in x (built from candle operations); detach a model's weights
/// first ([`crate::VelocityMlp::detach`]) so that the backward passes do not reach them.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::likelihood::{log_likelihood, LikelihoodOptions};
///
/// // v(x, t) = x: x1 = e x0 and div v = D, so log p(x1) = log N(x1 / e) - D.
/// let x = Tensor::new(&[[0.5f64, -1.0]], &Device::Cpu).unwrap();
/// let mut v = |x: &Tensor, _t: &Tensor| Ok::<_, candle_core::Error>(x.clone());
/// let opts = LikelihoodOptions { dtype: candle_core::DType::F64, ..Default::default() };
/// let ll = log_likelihood(&mut v, &x, &opts).unwrap();
/// let x0 = [0.5 / 1f64.exp(), -1.0 / 1f64.exp()];
/// let want = -(2.0 * std::f64::consts::PI).ln() - 0.5 * (x0[0] * x0[0] + x0[1] * x0[1]) - 2.0;
/// assert!((ll.log_p[0] - want).abs() < 1e-4);
/// ```
pub fn log_likelihood(
    field: &mut dyn StepFn,
    x: &Tensor,
    options: &LikelihoodOptions,
) -> Result<LogLikelihood> {
    if x.rank() < 2 {
        return Err(Error::Shape {
            what: "data for the log-likelihood".into(),
            expected: "[N, *x_dims]".into(),
            got: x.dims().to_vec(),
        });
    }
    let b = x.dim(0)?;
    if b == 0 {
        return Err(Error::ZeroBatch);
    }
    let dtype = options.dtype;
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(Error::invalid(
            "dtype",
            format!("{dtype:?}"),
            "f32 or f64 (the divergence needs gradients)",
        ));
    }
    let x = x.to_dtype(dtype)?;
    let d = x.elem_count() / b;
    let probes = match &options.divergence {
        Divergence::Exact => Vec::new(),
        Divergence::Hutchinson { probes, kind, seed } => {
            if *probes == 0 {
                return Err(Error::invalid(
                    "number of probes",
                    0,
                    "at least 1 (or the exact divergence)",
                ));
            }
            let mut rng = StdRng::seed_from_u64(*seed);
            (0..*probes)
                .map(|_| draw_probe(&mut rng, *kind, x.dims(), dtype, x.device()))
                .collect::<Result<Vec<_>>>()?
        }
    };
    let grid = options.schedule.time_grid(options.steps, dtype)?.reversed();
    let mut aug = Augmented {
        field,
        x_shape: x.dims().to_vec(),
        d,
        divergence: &options.divergence,
        probes,
    };
    let z1 = Tensor::cat(
        &[
            x.reshape((b, d))?,
            Tensor::zeros((b, 1), dtype, x.device())?,
        ],
        1,
    )?;
    let run = options
        .method
        .solver()
        .integrate(&mut aug, z1, &grid, false)?;
    if !run.reached_end {
        return Err(Error::invalid(
            "integration",
            "stopped before t = 0",
            "a run that reaches the noise (raise the adaptive solver's max_steps)",
        ));
    }
    let noise = run.x.narrow(1, 0, d)?.reshape(x.dims())?;
    let delta = run
        .x
        .narrow(1, d, 1)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let base = standard_normal_log_density(&noise)?;
    let log_p = base.iter().zip(&delta).map(|(a, l)| a + l).collect();
    Ok(LogLikelihood {
        log_p,
        delta_log_p: delta,
        noise,
        dims: d,
        nfe: run.nfe,
    })
}

fn draw_probe(
    rng: &mut StdRng,
    kind: ProbeKind,
    shape: &[usize],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    match kind {
        ProbeKind::Gaussian => randn(rng, shape, dtype, device),
        ProbeKind::Rademacher => {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        }
    }
}
