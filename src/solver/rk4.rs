//! Classical fourth-order Runge-Kutta.

use candle_core::Tensor;

use super::{axpy, eval, FixedStep};
use crate::error::Result;
use crate::step::StepFn;

/// Classical Runge-Kutta, fourth order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rk4;

impl FixedStep for Rk4 {
    const NAME: &'static str = "rk4";
    const EVALS: usize = 4;

    fn advance(&self, f: &mut dyn StepFn, x: &Tensor, t0: f64, t1: f64, dt: f64) -> Result<Tensor> {
        let half = 0.5 * dt;
        let k1 = eval(f, x, t0)?;
        let k2 = eval(f, &axpy(x, half, &k1)?, t0 + half)?;
        let k3 = eval(f, &axpy(x, half, &k2)?, t0 + half)?;
        let k4 = eval(f, &axpy(x, dt, &k3)?, t1)?;
        // (k1 + 2 k2 + 2 k3 + k4) / 6
        let sum = ((k1 + k4)? + ((k2 + k3)? * 2.0)?)?;
        axpy(x, dt / 6.0, &sum)
    }
}
