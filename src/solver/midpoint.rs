//! Explicit midpoint: evaluate at the half step, advance with that slope.

use candle_core::Tensor;

use super::{axpy, eval, FixedStep};
use crate::error::Result;
use crate::step::StepFn;

/// Explicit midpoint method, second order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Midpoint;

impl FixedStep for Midpoint {
    const NAME: &'static str = "midpoint";
    const EVALS: usize = 2;

    fn advance(
        &self,
        f: &mut dyn StepFn,
        x: &Tensor,
        t0: f64,
        _t1: f64,
        dt: f64,
    ) -> Result<Tensor> {
        let k1 = eval(f, x, t0)?;
        let xm = axpy(x, 0.5 * dt, &k1)?;
        let k2 = eval(f, &xm, t0 + 0.5 * dt)?;
        axpy(x, dt, &k2)
    }
}
