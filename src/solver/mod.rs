//! ODE integrators for dx/dt = v(x, t), one per file, under the [`Solver`] trait.

mod dopri5;
mod euler;
pub mod fields;
mod heun;
mod midpoint;
pub mod rk;
mod rk4;

pub use dopri5::{AdaptiveOptions, Dopri5};
pub use euler::Euler;
pub use heun::Heun;
pub use midpoint::Midpoint;
pub use rk4::Rk4;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::schedule::TimeGrid;
use crate::step::{checked_step, FastVelocity, StepFn};
use fields::{SliceField, TensorField};
use rk::Tableau;

/// The states and statistics of one integration.
#[derive(Debug, Clone)]
pub struct Integration {
    /// The state at the last time reached.
    pub x: Tensor,
    /// Every accepted state, the initial one first (only when recording).
    pub states: Vec<Tensor>,
    /// The times of the accepted states when recording (the start first); otherwise the start
    /// and the last time reached.
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
        grid: &TimeGrid,
        record: bool,
    ) -> Result<Integration>;
}

/// A one-step method described by its Butcher tableau; the driver ([`rk::fixed`]) is shared
/// by every method and by both the tensor and the slice path.
pub trait FixedStep {
    /// The method's tableau.
    const TABLEAU: &'static Tableau;

    /// The state at `t1` after one step from `(x, t0)` (stage times `t0 + c dt`, `t1` for
    /// `c = 1`), with `dt = t1 - t0` computed in the state's precision.
    fn advance(&self, f: &mut dyn StepFn, x: &Tensor, t0: f64, t1: f64) -> Result<Tensor> {
        let mut field = TensorField::new(f, x.dtype());
        let grid = TimeGrid::from(vec![t0, t1]);
        Ok(rk::fixed(&mut field, Self::TABLEAU, x.clone(), &grid, false)?.x)
    }
}

impl<S: FixedStep> Solver for S {
    fn name(&self) -> &'static str {
        S::TABLEAU.name
    }

    fn integrate(
        &self,
        f: &mut dyn StepFn,
        x: Tensor,
        grid: &TimeGrid,
        record: bool,
    ) -> Result<Integration> {
        let mut field = TensorField::new(f, x.dtype());
        let run = rk::fixed(&mut field, S::TABLEAU, x, grid, record)?;
        Ok(Integration::from_run(run, field.states))
    }
}

impl Integration {
    /// Wraps a driver's run and the states its field recorded.
    fn from_run(run: rk::Run<Tensor>, states: Vec<Tensor>) -> Self {
        Integration {
            x: run.x,
            states,
            times: run.times,
            nfe: run.nfe,
            accepted: run.accepted,
            rejected: run.rejected,
            reached_end: run.reached_end,
        }
    }
}

/// The result of [`Method::integrate_slices`]: the final state and, when recording, every
/// accepted state step-major `[T + 1, B, D]`.
#[derive(Debug, Clone)]
pub struct SliceIntegration {
    /// The state at the last time reached.
    pub x: Vec<f32>,
    /// Every accepted state, the initial one first (only when recording).
    pub states: Option<Vec<f32>>,
    /// The times of the accepted states when recording; otherwise the start and the end.
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

/// `t1 - t0` rounded as the state's dtype would compute it, so a float32 sampler matches a
/// float32 reference to the last bit.
pub fn delta(dtype: DType, t0: f64, t1: f64) -> f64 {
    match dtype {
        DType::F64 => t1 - t0,
        _ => (t1 as f32 - t0 as f32) as f64,
    }
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

    /// The method's tableau (`None` for the adaptive Dormand-Prince, whose embedded pair has
    /// its own driver).
    pub fn tableau(&self) -> Option<&'static Tableau> {
        match self {
            Method::Euler => Some(Euler::TABLEAU),
            Method::Midpoint => Some(Midpoint::TABLEAU),
            Method::Heun => Some(Heun::TABLEAU),
            Method::Rk4 => Some(Rk4::TABLEAU),
            Method::Dopri5(_) => None,
        }
    }

    /// Integrates f32 `x` (`[B, D]` flattened) along `grid` through a slice-level velocity:
    /// the same driver and arithmetic as [`Solver::integrate`] on tensors, over buffers made
    /// before the loop. Euler without recording goes to [`FastVelocity::euler_in_place`]
    /// when the velocity offers it (a model forks its threads once per run).
    pub fn integrate_slices(
        &self,
        f: &mut dyn FastVelocity,
        mut x: Vec<f32>,
        grid: &TimeGrid,
        record: bool,
    ) -> Result<SliceIntegration> {
        if grid.len() < 2 {
            return Err(Error::ZeroSteps);
        }
        if matches!(self, Method::Euler) && !record {
            if let Some(r) = f.euler_in_place(&mut x, grid) {
                r?;
                let steps = grid.steps();
                return Ok(SliceIntegration {
                    x,
                    states: None,
                    times: grid.first().into_iter().chain(grid.last()).collect(),
                    nfe: steps,
                    accepted: steps,
                    rejected: 0,
                    reached_end: true,
                });
            }
        }
        let reserve = match (record, self) {
            (false, _) => 0,
            (true, Method::Dopri5(_)) => 64 * x.len(),
            (true, _) => grid.len().saturating_mul(x.len()),
        };
        let mut field = SliceField::new(f, reserve);
        let run = match self {
            Method::Dopri5(o) => rk::dopri5(&mut field, o, x, grid, record)?,
            Method::Euler => rk::fixed(&mut field, Euler::TABLEAU, x, grid, record)?,
            Method::Midpoint => rk::fixed(&mut field, Midpoint::TABLEAU, x, grid, record)?,
            Method::Heun => rk::fixed(&mut field, Heun::TABLEAU, x, grid, record)?,
            Method::Rk4 => rk::fixed(&mut field, Rk4::TABLEAU, x, grid, record)?,
        };
        Ok(SliceIntegration {
            x: run.x,
            states: record.then_some(field.states),
            times: run.times,
            nfe: run.nfe,
            accepted: run.accepted,
            rejected: run.rejected,
            reached_end: run.reached_end,
        })
    }

    /// Whether the method picks its own steps (and so uses only the grid's ends).
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Method::Dopri5(_))
    }
}
