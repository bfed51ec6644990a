//! The seed's `FlowMatching` sampler and its training helpers.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution, StandardNormal};

use crate::diffusion::{Diffusion, Sample, SampleOptions, XDims};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::solver::Method;
use crate::step::StepFn;

/// How training draws the time `t` of each sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TimestepSampler {
    /// `t ~ U(0, 1)`.
    Uniform,
    /// `t = 0.999 - 0.999 * Beta(1.5, 1)`: favours small t, i.e. noisy inputs (the seed's default).
    #[default]
    Beta,
    /// `t = sigmoid(m + s * N(0, 1))`.
    LogitNormal {
        /// Mean of the underlying normal.
        mean: f64,
        /// Standard deviation of the underlying normal.
        std: f64,
    },
}

/// The names [`TimestepSampler`] parses from.
pub const TIMESTEP_SAMPLER_NAMES: [&str; 3] = ["uniform", "beta", "logit-normal"];

impl std::str::FromStr for TimestepSampler {
    type Err = Error;

    /// Parses `uniform`, `beta`, `logit-normal` (mean 0, std 1) or `logit-normal:M,S`.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "uniform" => return Ok(TimestepSampler::Uniform),
            "beta" => return Ok(TimestepSampler::Beta),
            "logit-normal" | "logit_normal" | "logitnormal" => {
                return Ok(TimestepSampler::LogitNormal {
                    mean: 0.0,
                    std: 1.0,
                })
            }
            _ => {}
        }
        if let Some(rest) = lower.strip_prefix("logit-normal:") {
            let parts: Vec<&str> = rest.split(',').collect();
            if let [m, sd] = parts.as_slice() {
                if let (Ok(mean), Ok(std)) = (m.trim().parse::<f64>(), sd.trim().parse::<f64>()) {
                    if std > 0.0 && mean.is_finite() && std.is_finite() {
                        return Ok(TimestepSampler::LogitNormal { mean, std });
                    }
                }
            }
            return Err(Error::invalid(
                "timestep sampler",
                s,
                "logit-normal:MEAN,STD with STD > 0",
            ));
        }
        Err(Error::UnknownName {
            kind: "timestep sampler",
            name: s.to_string(),
            known: TIMESTEP_SAMPLER_NAMES.join(", "),
        })
    }
}

impl TimestepSampler {
    /// Draws one time in [0, 1].
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        match self {
            TimestepSampler::Uniform => rng.random::<f64>(),
            TimestepSampler::Beta => {
                // Beta(1.5, 1) has valid parameters, so construction cannot fail.
                let b = Beta::new(1.5, 1.0).map(|d| d.sample(rng)).unwrap_or(0.5);
                0.999 - 0.999 * b
            }
            TimestepSampler::LogitNormal { mean, std } => {
                let z: f64 = StandardNormal.sample(rng);
                1.0 / (1.0 + (-(mean + std * z)).exp())
            }
        }
    }

    /// The exact CDF of the drawn times, for tests and diagnostics.
    pub fn cdf(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, 1.0);
        match self {
            TimestepSampler::Uniform => t,
            TimestepSampler::Beta => {
                // P(0.999 - 0.999 B <= t) = P(B >= 1 - t / 0.999) = 1 - u^1.5 with u = 1 - t/0.999.
                let u = (1.0 - t / 0.999).clamp(0.0, 1.0);
                1.0 - u.powf(1.5)
            }
            TimestepSampler::LogitNormal { mean, std } => {
                if t <= 0.0 {
                    return 0.0;
                }
                if t >= 1.0 {
                    return 1.0;
                }
                let z = ((t / (1.0 - t)).ln() - mean) / std;
                0.5 * erfc(-z / std::f64::consts::SQRT_2)
            }
        }
    }
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// One batch of training data (the seed's `construct_training_data`).
#[derive(Debug, Clone)]
pub struct TrainingBatch {
    /// The data `[B, *x_dims]`.
    pub x: Tensor,
    /// `t x + (1 - t) noise`.
    pub noisy_x: Tensor,
    /// The times `[B, 1, ..., 1]`.
    pub t: Tensor,
    /// The noise `[B, *x_dims]`.
    pub noise: Tensor,
    /// 1.0 where the condition is dropped (for classifier-free guidance), else 0.0; `[B]`.
    pub drop_mask: Tensor,
}

impl TrainingBatch {
    /// Builds the pair from given data, times `[B]` (or any shape with B elements) and noise.
    pub fn from_parts(x: &Tensor, t: &Tensor, noise: &Tensor, drop_mask: Tensor) -> Result<Self> {
        if noise.dims() != x.dims() {
            return Err(Error::Shape {
                what: "noise".into(),
                expected: format!("{:?} (the shape of x)", x.dims()),
                got: noise.dims().to_vec(),
            });
        }
        let b = x.dim(0)?;
        if t.elem_count() != b {
            return Err(Error::Shape {
                what: "timesteps".into(),
                expected: format!("{b} elements, one per sample"),
                got: t.dims().to_vec(),
            });
        }
        let mut tshape = vec![1usize; x.rank()];
        tshape[0] = b;
        let t = t.reshape(tshape)?.to_dtype(x.dtype())?;
        let one_minus_t = t.affine(-1.0, 1.0)?;
        let noisy_x = (x.broadcast_mul(&t)? + noise.broadcast_mul(&one_minus_t)?)?;
        Ok(TrainingBatch {
            x: x.clone(),
            noisy_x,
            t,
            noise: noise.clone(),
            drop_mask,
        })
    }

    /// The regression target of the velocity, `x - noise`.
    pub fn target(&self) -> Result<Tensor> {
        Ok((&self.x - &self.noise)?)
    }
}

/// The flow-matching sampler: Euler (or another method) on a time grid from noise to data.
#[derive(Debug, Clone)]
pub struct FlowMatching {
    x_dims: XDims,
    /// Integration method (the seed's `int_method`).
    pub method: Method,
    /// Steps per sample (the seed's `num_inference_steps`).
    pub num_inference_steps: usize,
    /// Time grid.
    pub schedule: Schedule,
    /// How training draws times.
    pub timestep_sampler: TimestepSampler,
    /// Probability of dropping the condition in training, for classifier-free guidance.
    pub cond_drop_rate: f64,
    /// Classifier-free guidance weight used at inference (1.0 = plain conditional).
    pub guidance_weight: f64,
}

impl FlowMatching {
    /// A sampler with Euler, 10 steps, the uniform grid, the Beta timestep sampler, a 0.1 drop
    /// rate and guidance weight 1.0 (the seed's defaults).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let fm = FlowMatching::new([64, 2]).unwrap();
    /// // v(x, t) = -x: a closure is a step function.
    /// let mut v = |x: &Tensor, _t: &Tensor| x.neg();
    /// let out = fm.sample(3, &mut v, &Device::Cpu, &SampleOptions::seeded(0)).unwrap();
    /// assert_eq!(out.x.dims(), &[3, 64, 2]);
    /// ```
    pub fn new(x_dims: impl Into<crate::diffusion::DimsArg>) -> Result<Self> {
        Ok(FlowMatching {
            x_dims: XDims::new(x_dims)?,
            method: Method::Euler,
            num_inference_steps: 10,
            schedule: Schedule::Uniform,
            timestep_sampler: TimestepSampler::Beta,
            cond_drop_rate: 0.1,
            guidance_weight: 1.0,
        })
    }

    /// Sets the method by name (`"euler"`, `"rk4"`, ...); an unknown name is an error.
    pub fn with_method(mut self, name: &str) -> Result<Self> {
        self.method = name.parse()?;
        Ok(self)
    }

    /// Sets the number of inference steps (at least 1).
    pub fn with_steps(mut self, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::ZeroSteps);
        }
        self.num_inference_steps = steps;
        Ok(self)
    }

    /// Draws standard normal noise `[B, *x_dims]` from a seeded generator (or the OS's entropy).
    pub fn noise(
        &self,
        batch: usize,
        seed: Option<u64>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        randn(&mut rng, &self.x_dims.batched(batch), dtype, device)
    }

    /// Draws training data from a batch `x` `[B, *x_dims]` (the seed's `construct_training_data`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::FlowMatching;
    /// use rand::SeedableRng;
    ///
    /// let fm = FlowMatching::new(2).unwrap();
    /// let x = Tensor::ones((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    /// let batch = fm.construct_training_data(&x, &mut rng).unwrap();
    /// assert_eq!(batch.t.dims(), &[4, 1]);
    /// ```
    pub fn construct_training_data<R: Rng + ?Sized>(
        &self,
        x: &Tensor,
        rng: &mut R,
    ) -> Result<TrainingBatch> {
        self.check_batch(x, "training data")?;
        let b = x.dim(0)?;
        let ts: Vec<f32> = (0..b)
            .map(|_| self.timestep_sampler.draw(rng) as f32)
            .collect();
        let t = Tensor::from_vec(ts, b, x.device())?;
        let noise = randn(rng, x.dims(), x.dtype(), x.device())?;
        let rate = self.cond_drop_rate;
        let mask: Vec<f32> = (0..b)
            .map(|_| if rng.random::<f64>() < rate { 1.0 } else { 0.0 })
            .collect();
        let drop_mask = Tensor::from_vec(mask, b, x.device())?;
        TrainingBatch::from_parts(x, &t, &noise, drop_mask)
    }

    /// Mean squared error between a predicted velocity and the target `x - noise`.
    pub fn compute_loss(&self, batch: &TrainingBatch, pred: &Tensor) -> Result<Tensor> {
        if pred.dims() != batch.x.dims() {
            return Err(Error::Shape {
                what: "prediction".into(),
                expected: format!("{:?} (the shape of x)", batch.x.dims()),
                got: pred.dims().to_vec(),
            });
        }
        Ok((pred - batch.target()?)?.sqr()?.mean_all()?)
    }

    fn check_batch(&self, x: &Tensor, what: &str) -> Result<()> {
        if x.rank() == 0 || x.dims()[1..] != *self.x_dims.dims() {
            return Err(Error::Shape {
                what: what.into(),
                expected: format!("[B, {}]", self.x_dims),
                got: x.dims().to_vec(),
            });
        }
        if x.dim(0)? == 0 {
            return Err(Error::ZeroBatch);
        }
        Ok(())
    }
}

/// Standard normal noise of a shape, from `rng`.
pub fn randn<R: Rng + ?Sized>(
    rng: &mut R,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

impl Diffusion for FlowMatching {
    fn x_dims(&self) -> &XDims {
        &self.x_dims
    }

    fn sample(
        &self,
        batch_size: usize,
        step_fn: &mut dyn StepFn,
        device: &Device,
        options: &SampleOptions,
    ) -> Result<Sample> {
        if batch_size == 0 {
            return Err(Error::ZeroBatch);
        }
        let dtype = check_dtype(options.dtype)?;
        let x0 = match &options.x_init {
            Some(x) => {
                let want = self.x_dims.batched(batch_size);
                if x.dims() != want.as_slice() {
                    return Err(Error::Shape {
                        what: "initial noise".into(),
                        expected: format!("{want:?} ([batch, *x_dims])"),
                        got: x.dims().to_vec(),
                    });
                }
                x.to_device(device)?.to_dtype(dtype)?
            }
            None => self.noise(batch_size, options.seed, dtype, device)?,
        };
        self.solve(step_fn, x0, options, false)
    }
}

/// The reverse direction: data at t = 1 back to noise at t = 0, the inverse of sampling.
impl FlowMatching {
    /// Maps data `x` `[B, *x_dims]` at t = 1 to noise at t = 0 along the reversed time grid
    /// (`options.x_init` and `options.seed` are not used); the trajectory and times run from 1
    /// down to 0.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let fm = FlowMatching::new(2).unwrap().with_method("rk4").unwrap();
    /// let mut v = |x: &Tensor, _t: &Tensor| x.neg();
    /// let opts = SampleOptions::seeded(0);
    /// let s = fm.sample(4, &mut v, &Device::Cpu, &opts).unwrap();
    /// let back = fm.encode(&s.x, &mut v, &opts).unwrap();
    /// let noise = fm.noise(4, Some(0), candle_core::DType::F32, &Device::Cpu).unwrap();
    /// let err = (back.x - noise).unwrap().abs().unwrap().max_all().unwrap();
    /// assert!(err.to_scalar::<f32>().unwrap() < 1e-4);
    /// ```
    pub fn encode(
        &self,
        x: &Tensor,
        step_fn: &mut dyn StepFn,
        options: &SampleOptions,
    ) -> Result<Sample> {
        self.check_batch(x, "data to encode")?;
        let dtype = check_dtype(options.dtype)?;
        self.solve(step_fn, x.to_dtype(dtype)?, options, true)
    }

    /// Integrates from `x0` along the options' grid, forwards (0 to 1) or `reverse` (1 to 0).
    fn solve(
        &self,
        step_fn: &mut dyn StepFn,
        x0: Tensor,
        options: &SampleOptions,
        reverse: bool,
    ) -> Result<Sample> {
        let steps = options.steps.unwrap_or(self.num_inference_steps);
        let method = options.method.as_ref().unwrap_or(&self.method);
        let schedule = options.schedule.as_ref().unwrap_or(&self.schedule);
        let dtype = x0.dtype();
        let device = x0.device().clone();
        let mut grid = schedule.time_grid(steps, dtype)?;
        if reverse {
            grid = grid.reversed();
        }
        if options.return_all_steps {
            // Every state is kept: refuse a trajectory that cannot fit before the first step.
            crate::limits::check_memory(
                &format!("a recorded trajectory of {} steps", grid.steps()),
                crate::limits::checked_bytes(
                    &[grid.len(), x0.elem_count(), 2],
                    dtype.size_in_bytes(),
                ),
            )?;
        }
        // Fast path: CPU f32 with a slice-level velocity (crate::kernel): every method, the
        // same driver and arithmetic as the tensor path below.
        if dtype == DType::F32 && device.is_cpu() {
            if let Some(mut fast) = step_fn.fast_velocity() {
                return fast_solve(method, fast.as_mut(), &x0, &grid, options.return_all_steps);
            }
        }
        let run = method
            .solver()
            .integrate(step_fn, x0, &grid, options.return_all_steps)?;
        let (trajectory, times) = if options.return_all_steps {
            let traj = Tensor::stack(&run.states, 1)?;
            let n = run.times.len();
            let times = Tensor::from_vec(run.times.clone(), n, &device)?.to_dtype(dtype)?;
            (Some(traj), Some(times))
        } else {
            (None, None)
        };
        Ok(Sample {
            x: run.x,
            trajectory,
            times,
            nfe: run.nfe,
            accepted_steps: run.accepted,
            rejected_steps: run.rejected,
            reached_end: run.reached_end,
        })
    }
}

/// Refuses the dtypes a sampler state cannot have.
fn check_dtype(dtype: DType) -> Result<DType> {
    if matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        Ok(dtype)
    } else {
        Err(Error::invalid(
            "dtype",
            format!("{dtype:?}"),
            "f32, f64, f16 or bf16",
        ))
    }
}

/// The fast path of [`FlowMatching::sample`] and [`FlowMatching::encode`] over f32 slices.
fn fast_solve(
    method: &Method,
    f: &mut dyn crate::step::FastVelocity,
    x0: &Tensor,
    grid: &crate::schedule::TimeGrid,
    record: bool,
) -> Result<Sample> {
    let dims = x0.dims().to_vec();
    let batch = dims[0];
    let d = x0.elem_count() / batch;
    let x = x0.flatten_all()?.to_vec1::<f32>()?;
    let run = method.integrate_slices(f, x, grid, record)?;
    let (trajectory, times) = match run.states {
        Some(states) => {
            let n = run.times.len();
            let traj = crate::kernel::euler::batch_major(&states, n, batch, d);
            let mut shape = dims.clone();
            shape.insert(1, n);
            let times: Vec<f32> = run.times.iter().map(|&t| t as f32).collect();
            (
                Some(Tensor::from_vec(traj, shape, x0.device())?),
                Some(Tensor::from_vec(times, n, x0.device())?),
            )
        }
        None => (None, None),
    };
    Ok(Sample {
        x: Tensor::from_vec(run.x, dims, x0.device())?,
        trajectory,
        times,
        nfe: run.nfe,
        accepted_steps: run.accepted,
        rejected_steps: run.rejected,
        reached_end: run.reached_end,
    })
}
