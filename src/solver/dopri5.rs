//! Adaptive Dormand-Prince 5(4) with error control, FSAL and a step cap.

use candle_core::Tensor;

use super::fields::TensorField;
use super::{rk, Integration, Solver};
use crate::error::{Error, Result};
use crate::step::StepFn;

/// Tolerances and limits of the adaptive solver.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveOptions {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// First step size; `None` picks one from the field at the start.
    pub first_step: Option<f64>,
    /// Smallest step size allowed (a smaller one needed is an error).
    pub min_step: f64,
    /// Largest step size allowed.
    pub max_step: f64,
    /// Cap on accepted plus rejected steps.
    pub max_steps: usize,
    /// At the cap: `true` returns the state reached, `false` errors.
    pub return_on_max_steps: bool,
}

impl Default for AdaptiveOptions {
    fn default() -> Self {
        AdaptiveOptions {
            rtol: 1e-5,
            atol: 1e-5,
            first_step: None,
            min_step: 1e-10,
            max_step: 1.0,
            max_steps: 10_000,
            return_on_max_steps: false,
        }
    }
}

impl AdaptiveOptions {
    /// Checks that the tolerances and step limits are usable.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(name, v, "a finite number greater than 0"))
            }
        };
        positive("rtol", self.rtol)?;
        positive("atol", self.atol)?;
        positive("max_step", self.max_step)?;
        if let Some(h) = self.first_step {
            positive("first_step", h)?;
        }
        if !(self.min_step >= 0.0 && self.min_step <= self.max_step) {
            return Err(Error::invalid(
                "min_step",
                self.min_step,
                format!("between 0 and max_step = {}", self.max_step),
            ));
        }
        if self.max_steps == 0 {
            return Err(Error::invalid("max_steps", 0, "at least 1"));
        }
        Ok(())
    }
}

/// Dormand-Prince 5(4): fifth-order steps, a fourth-order embedded error estimate.
#[derive(Debug, Clone, Default)]
pub struct Dopri5(pub AdaptiveOptions);

impl Solver for Dopri5 {
    fn name(&self) -> &'static str {
        "dopri5"
    }

    fn integrate(
        &self,
        f: &mut dyn StepFn,
        x: Tensor,
        grid: &crate::schedule::TimeGrid,
        record: bool,
    ) -> Result<Integration> {
        let mut field = TensorField::new(f, x.dtype());
        let run = rk::dopri5(&mut field, &self.0, x, grid, record)?;
        Ok(Integration::from_run(run, field.states))
    }
}
