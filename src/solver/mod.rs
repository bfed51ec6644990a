//! ODE integrators for dx/dt = v(x, t), one per file, under the [`Solver`] trait.

mod dopri5;
mod euler;
mod heun;
mod midpoint;
mod rk4;

pub use dopri5::{AdaptiveOptions, Dopri5};
pub use euler::Euler;
pub use heun::Heun;
pub use midpoint::Midpoint;
pub use rk4::Rk4;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::step::{checked_step, StepFn};

/// The states and statistics of one integration.
#[derive(Debug, Clone)]
pub struct Integration {
    /// The state at the last time reached.
    pub x: Tensor,
    /// Every accepted state, the initial one first (only when recording).
    pub states: Vec<Tensor>,
    /// The times of the accepted states (always recorded; the first is the start time).
    pub times: Vec<f64>,
    /// Velocity evaluations used.
    pub nfe: usize,
    /// Accepted steps.
    pub accepted: usize,
    /// Rejected steps (adaptive solvers only).
    pub rejected: usize,
    /// False when an adaptive solver stopped at its step cap before the end time.
    pub reached_end: bool,
}

/// An integrator of dx/dt = v(x, t) over a time grid.
pub trait Solver {
    /// The name the method parses from.
    fn name(&self) -> &'static str;

    /// Integrates from `grid[0]` to the grid's last time, starting at `x`. Fixed-step solvers
    /// step along the grid; adaptive ones use only its ends. Grids may run backwards.
    fn integrate(
        &self,
        f: &mut dyn StepFn,
        x: Tensor,
        grid: &[f64],
        record: bool,
    ) -> Result<Integration>;
}

/// A one-step method: advances `x` from `t0` to `t1` with a fixed number of evaluations.
pub trait FixedStep {
    /// The name the method parses from.
    const NAME: &'static str;
    /// Velocity evaluations per step.
    const EVALS: usize;
    /// The state at `t1`, with `dt = t1 - t0` computed in the state's precision.
    fn advance(&self, f: &mut dyn StepFn, x: &Tensor, t0: f64, t1: f64, dt: f64) -> Result<Tensor>;
}

impl<S: FixedStep> Solver for S {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn integrate(
        &self,
        f: &mut dyn StepFn,
        mut x: Tensor,
        grid: &[f64],
        record: bool,
    ) -> Result<Integration> {
        if grid.len() < 2 {
            return Err(Error::ZeroSteps);
        }
        let mut states = Vec::new();
        if record {
            states.push(x.clone());
        }
        for (i, w) in grid.windows(2).enumerate() {
            let dt = delta(x.dtype(), w[0], w[1]);
            x = self.advance(f, &x, w[0], w[1], dt)?;
            check_finite(&x, i + 1, w[1])?;
            if record {
                states.push(x.clone());
            }
        }
        let steps = grid.len() - 1;
        Ok(Integration {
            x,
            states,
            times: grid.to_vec(),
            nfe: steps * S::EVALS,
            accepted: steps,
            rejected: 0,
            reached_end: true,
        })
    }
}

/// `t1 - t0` rounded as the state's dtype would compute it, so a float32 sampler matches a
/// float32 reference to the last bit.
pub fn delta(dtype: DType, t0: f64, t1: f64) -> f64 {
    match dtype {
        DType::F64 => t1 - t0,
        _ => (t1 as f32 - t0 as f32) as f64,
    }
}

/// `x + a * v`, rounding `a * v` first as the reference does (no fused multiply-add).
pub fn axpy(x: &Tensor, a: f64, v: &Tensor) -> Result<Tensor> {
    Ok(x.add(&v.affine(a, 0.0)?)?)
}

/// Errors when `x` holds NaN or infinity after step `step` (reaching time `t`).
pub fn check_finite(x: &Tensor, step: usize, t: f64) -> Result<()> {
    let s = x.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite { step, t })
    }
}

/// Calls the step function with its output checked; shared by the solvers. The velocity is
/// detached, so a step function over trainable weights never chains a graph across steps.
pub(crate) fn eval(f: &mut dyn StepFn, x: &Tensor, t: f64) -> Result<Tensor> {
    Ok(checked_step(f, x, t)?.detach())
}

/// An integration method, chosen by name (`euler`, `midpoint`, `heun`, `rk4`, `dopri5`).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Method {
    /// Forward Euler, first order, 1 evaluation a step (the seed's method).
    #[default]
    Euler,
    /// Explicit midpoint, second order, 2 evaluations a step.
    Midpoint,
    /// Heun's method (explicit trapezoid), second order, 2 evaluations a step.
    Heun,
    /// Classical Runge-Kutta, fourth order, 4 evaluations a step.
    Rk4,
    /// Adaptive Dormand-Prince 5(4).
    Dopri5(AdaptiveOptions),
}

/// The names [`Method`] parses from.
pub const METHOD_NAMES: [&str; 5] = ["euler", "midpoint", "heun", "rk4", "dopri5"];

impl std::str::FromStr for Method {
    type Err = Error;

    /// Parses a method name, case-insensitively.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "euler" => Ok(Method::Euler),
            "midpoint" => Ok(Method::Midpoint),
            "heun" => Ok(Method::Heun),
            "rk4" => Ok(Method::Rk4),
            "dopri5" => Ok(Method::Dopri5(AdaptiveOptions::default())),
            _ => Err(Error::UnknownName {
                kind: "integration method",
                name: s.to_string(),
                known: METHOD_NAMES.join(", "),
            }),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.solver().name())
    }
}

impl Method {
    /// The integrator for this method.
    pub fn solver(&self) -> Box<dyn Solver> {
        match self {
            Method::Euler => Box::new(Euler),
            Method::Midpoint => Box::new(Midpoint),
            Method::Heun => Box::new(Heun),
            Method::Rk4 => Box::new(Rk4),
            Method::Dopri5(o) => Box::new(Dopri5(o.clone())),
        }
    }

    /// Whether the method picks its own steps (and so uses only the grid's ends).
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Method::Dopri5(_))
    }
}
