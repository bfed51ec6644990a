//! Flow-matching generative models on candle.
//!
//! A flow-matching model turns Gaussian noise at t = 0 into data at t = 1 by integrating a
//! velocity field v(x, t). This crate gives the seed's sampler ([`FlowMatching`] under the
//! [`Diffusion`] trait and the [`StepFn`] protocol), ODE solvers, time schedules, the
//! `velocity-mlp` model shared with PyTorch, and training helpers.
//!
//! How the modules stack (each imports only modules below it or beside it, never back):
//! - protocol and sampling: [`step`] (the `StepFn` protocol), [`solver`], [`schedule`],
//!   [`diffusion`], [`flow_matching`], [`condition`], [`guidance`], [`likelihood`];
//! - models: [`model`] (velocity-mlp, waypoint transformer, their fused CPU paths, checked
//!   model-file reading), `onnx` (feature `onnx`: ONNX networks on tract or ONNX Runtime);
//! - kernels: [`kernel`] (packed matmul, element-wise, attention; AVX-512, AVX2 and portable
//!   builds chosen at run time);
//! - training: [`train`], [`coupling`], [`reflow`], [`regression`];
//! - data and scores: [`data`], [`io`], [`trajectory`], [`metrics`], [`evaluate`];
//! - plumbing: [`error`], [`describe`], [`limits`], [`output`], [`progress`], `plot`
//!   (feature `plot`).

#![warn(missing_docs)]

pub mod condition;
pub mod convention;
pub mod coupling;
pub mod data;
pub mod describe;
pub mod diffusion;
pub mod error;
pub mod evaluate;
pub mod flow_matching;
pub mod guidance;
pub mod io;
pub mod kernel;
pub mod likelihood;
pub mod limits;
pub mod metrics;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod output;
#[cfg(feature = "plot")]
pub mod plot;
pub mod progress;
pub mod reflow;
pub mod regression;
pub mod schedule;
pub mod solver;
pub mod step;
pub mod train;
pub mod trajectory;
pub mod unicycle;

pub use diffusion::{Diffusion, Sample, SampleOptions, XDims};
pub use error::{Error, Result};
pub use flow_matching::{FlowMatching, TimestepSampler, TrainingBatch};
pub use model::{
    Condition, TransformerConfig, VelocityMlp, VelocityMlpConfig, WaypointTransformer,
};
pub use schedule::{Schedule, TimeGrid};
pub use solver::{AdaptiveOptions, Method};
pub use step::{FastVelocity, StepFn};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
