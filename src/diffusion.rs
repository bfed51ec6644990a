//! The sampler's contract: the sample shape, per-call options and the `Diffusion` trait.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::solver::Method;
use crate::step::StepFn;

/// The shape of one sample, without the batch dimension (`128` → `[128]`, `[64, 64, 3]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct XDims(Vec<usize>);

impl XDims {
    /// The most dimensions a sample shape may have.
    pub const MAX_RANK: usize = 32;

    /// Validates a shape: at least one dimension, none of them zero.
    ///
    /// ```
    /// use flow_matching::XDims;
    /// assert_eq!(XDims::new(128).unwrap().dims(), &[128]);
    /// assert_eq!(XDims::new([64, 64, 3]).unwrap().numel(), 64 * 64 * 3);
    /// assert!(XDims::new(Vec::<usize>::new()).is_err());
    /// ```
    pub fn new(dims: impl Into<DimsArg>) -> Result<Self> {
        let dims = dims.into().0;
        if dims.is_empty() {
            return Err(Error::InvalidXDims {
                dims,
                reason: "a sample needs at least one dimension",
            });
        }
        if dims.contains(&0) {
            return Err(Error::InvalidXDims {
                dims,
                reason: "every dimension must be at least 1",
            });
        }
        // Sizes come from files and flags: a product that wraps would be a tiny, wrong shape.
        if dims.len() > Self::MAX_RANK {
            return Err(Error::InvalidXDims {
                dims: dims[..Self::MAX_RANK].to_vec(),
                reason: "more than 32 dimensions (the first 32 shown)",
            });
        }
        if crate::limits::checked_bytes(&dims, 4).is_none_or(|b| b > isize::MAX as u64) {
            return Err(Error::InvalidXDims {
                dims,
                reason: "the product of the dimensions overflows (a sample of that many float32 values cannot exist)",
            });
        }
        Ok(XDims(dims))
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// The number of elements of one sample, `D = prod(x_dims)`.
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// The batched shape `[B, *x_dims]`.
    pub fn batched(&self, batch: usize) -> Vec<usize> {
        let mut s = Vec::with_capacity(self.0.len() + 1);
        s.push(batch);
        s.extend_from_slice(&self.0);
        s
    }

    /// The shape `[B, 1, ..., 1]` that broadcasts a per-row time against `[B, *x_dims]`.
    pub fn time_shape(&self, batch: usize) -> Vec<usize> {
        let mut s = vec![1; self.0.len() + 1];
        s[0] = batch;
        s
    }

    /// Parses `"64,2"` (the model metadata's form).
    pub fn parse(text: &str) -> Result<Self> {
        let dims = text
            .split(',')
            .map(|p| {
                p.trim().parse::<usize>().map_err(|_| {
                    Error::invalid(
                        "x_dims",
                        crate::limits::excerpt(text),
                        "comma-separated positive integers such as 64,2",
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        XDims::new(dims)
    }
}

impl std::fmt::Display for XDims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|d| d.to_string()).collect();
        write!(f, "{}", parts.join(","))
    }
}

/// Anything that reads as a list of dimensions: one integer, an array, a slice or a `Vec`.
pub struct DimsArg(Vec<usize>);

impl From<usize> for DimsArg {
    fn from(d: usize) -> Self {
        DimsArg(vec![d])
    }
}
impl From<Vec<usize>> for DimsArg {
    fn from(d: Vec<usize>) -> Self {
        DimsArg(d)
    }
}
impl From<&[usize]> for DimsArg {
    fn from(d: &[usize]) -> Self {
        DimsArg(d.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for DimsArg {
    fn from(d: [usize; N]) -> Self {
        DimsArg(d.to_vec())
    }
}
impl From<&XDims> for DimsArg {
    fn from(d: &XDims) -> Self {
        DimsArg(d.0.clone())
    }
}

/// Per-call options of [`Diffusion::sample`]; `None` fields fall back to the sampler's settings.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Return every state `[B, T + 1, *x_dims]` and the times `[T + 1]`.
    pub return_all_steps: bool,
    /// Number of steps for this call only (the seed's `inference_step`).
    pub steps: Option<usize>,
    /// Integration method for this call only (the seed's `int_method`).
    pub method: Option<Method>,
    /// Time grid for this call only.
    pub schedule: Option<Schedule>,
    /// The noise at t = 0, `[B, *x_dims]`, instead of drawing one.
    pub x_init: Option<Tensor>,
    /// Seed for the noise; `None` draws from the operating system.
    pub seed: Option<u64>,
    /// The dtype of the state (f32 by default; f64, f16 and bf16 are accepted).
    pub dtype: DType,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            return_all_steps: false,
            steps: None,
            method: None,
            schedule: None,
            x_init: None,
            seed: None,
            dtype: DType::F32,
        }
    }
}

impl SampleOptions {
    /// Options with a seed, everything else default.
    pub fn seeded(seed: u64) -> Self {
        SampleOptions {
            seed: Some(seed),
            ..Default::default()
        }
    }
}

/// What a sampling call returns.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The final state `[B, *x_dims]` at t = 1.
    pub x: Tensor,
    /// Every state `[B, T + 1, *x_dims]`, the noise first (with `return_all_steps`).
    pub trajectory: Option<Tensor>,
    /// The times of those states, `[T + 1]` from 0 to 1 (with `return_all_steps`).
    pub times: Option<Tensor>,
    /// Number of velocity evaluations (function evaluations) used.
    pub nfe: usize,
    /// Accepted steps (equal to the step count for fixed-step methods).
    pub accepted_steps: usize,
    /// Rejected steps (adaptive methods only).
    pub rejected_steps: usize,
    /// Whether the integration reached the end time (false only when an adaptive solver was
    /// capped and asked to return the state reached).
    pub reached_end: bool,
}

/// A generative model that turns noise into samples of shape `[B, *x_dims]` (the seed's `BaseDiffusion`).
pub trait Diffusion {
    /// The shape of one sample.
    fn x_dims(&self) -> &XDims;

    /// Draws `batch_size` samples by integrating `step_fn` from noise.
    fn sample(
        &self,
        batch_size: usize,
        step_fn: &mut dyn StepFn,
        device: &Device,
        options: &SampleOptions,
    ) -> Result<Sample>;
}
