//! Heun's method: an Euler predictor corrected by the mean of the two end slopes.

use candle_core::Tensor;

use super::{axpy, eval, FixedStep};
use crate::error::Result;
use crate::step::StepFn;

/// Heun's method (explicit trapezoid), second order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heun;

impl FixedStep for Heun {
    const NAME: &'static str = "heun";
    const EVALS: usize = 2;

    fn advance(&self, f: &mut dyn StepFn, x: &Tensor, t0: f64, t1: f64, dt: f64) -> Result<Tensor> {
        let k1 = eval(f, x, t0)?;
        let xp = axpy(x, dt, &k1)?;
        let k2 = eval(f, &xp, t1)?;
        axpy(x, 0.5 * dt, &(k1 + k2)?)
    }
}
