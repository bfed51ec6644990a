//! Time conventions of flow models, and the adapter that runs a model trained with noise at
//! t = 1 under this crate's samplers (which integrate from noise at t = 0 to data at t = 1).
//!
//! openpi's pi0/pi0.5 and LeRobot train with `x_t = t·noise + (1 - t)·action` and a net that
//! predicts `noise - action`, integrating from t = 1 down to 0. With `s = 1 - t` that is
//! exactly this crate's convention with the velocity negated, so every solver and schedule
//! applies unchanged: the adapter evaluates the model at `t = 1 - s` and returns `-v`.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::schedule::TimeGrid;
use crate::step::{FastVelocity, StepFn};

/// Which end of the time interval holds the noise, as a model was trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeConvention {
    /// Noise at t = 0, data at t = 1 (this crate's and the seed's): `x_t = t·x + (1-t)·noise`.
    #[default]
    NoiseAt0,
    /// Noise at t = 1, data at t = 0 (openpi, LeRobot): `x_t = t·noise + (1-t)·x`.
    NoiseAt1,
}

impl TimeConvention {
    /// Every convention, in the order the error messages list them.
    pub const ALL: [TimeConvention; 2] = [TimeConvention::NoiseAt0, TimeConvention::NoiseAt1];

    /// The name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TimeConvention::NoiseAt0 => "noise_at_0",
            TimeConvention::NoiseAt1 => "noise_at_1",
        }
    }

    /// The model's own time for the sampler's time `s`.
    pub fn model_time(self, s: f32) -> f32 {
        match self {
            TimeConvention::NoiseAt0 => s,
            TimeConvention::NoiseAt1 => 1.0 - s,
        }
    }
}

impl std::fmt::Display for TimeConvention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TimeConvention {
    type Err = Error;

    /// Parses `noise_at_0` or `noise_at_1`.
    ///
    /// ```
    /// use flow_matching::convention::TimeConvention;
    /// let c: TimeConvention = "noise_at_1".parse().unwrap();
    /// assert_eq!(c, TimeConvention::NoiseAt1);
    /// assert!("noise_at_2".parse::<TimeConvention>().unwrap_err().to_string().contains("noise_at_0"));
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s.trim())
            .ok_or_else(|| Error::UnknownName {
                kind: "time convention",
                name: s.to_string(),
                known: Self::ALL.map(|c| c.name()).join(", "),
            })
    }
}

/// A step function trained with noise at t = 1, seen by the samplers as one with noise at
/// t = 0: `v'(x, s) = -v(x, 1 - s)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::convention::NoiseAtOne;
/// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
///
/// // openpi's convention: the net predicts noise - action; here the action is 0, so v = x / t.
/// let net = |x: &Tensor, t: &Tensor| x.broadcast_div(t);
/// let fm = FlowMatching::new(2).unwrap().with_steps(4).unwrap();
/// let s = fm.sample(3, &mut NoiseAtOne(net), &Device::Cpu, &SampleOptions::seeded(0)).unwrap();
/// let max = s.x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
/// assert!(max < 1e-5, "every sample reaches the action 0, got {max}");
/// ```
#[derive(Debug, Clone)]
pub struct NoiseAtOne<S>(pub S);

impl<S: StepFn> StepFn for NoiseAtOne<S> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        // -t + 1 rounds like 1 - t.
        let tm = t.affine(-1.0, 1.0)?;
        Ok(self.0.step(x, &tm)?.neg()?)
    }

    fn step_at(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let tm = TimeConvention::NoiseAt1.model_time(t as f32) as f64;
        Ok(self.0.step_at(x, tm)?.neg()?)
    }

    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let inner = self.0.fast_velocity()?;
        Some(Box::new(FlipFast(inner)))
    }
}

/// [`NoiseAtOne`] on the slice level.
pub(crate) struct FlipFast<'a>(pub Box<dyn FastVelocity + 'a>);

impl FastVelocity for FlipFast<'_> {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        self.0
            .velocity(x, TimeConvention::NoiseAt1.model_time(t), out)?;
        for v in out.iter_mut() {
            *v = -*v;
        }
        Ok(())
    }

    fn euler_in_place(&mut self, _x: &mut [f32], _grid: &TimeGrid) -> Option<Result<()>> {
        // The inner model's Euler would integrate its own time the wrong way: use the step loop.
        None
    }
}
