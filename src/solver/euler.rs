//! Forward Euler: `x' = x + dt v(x, t)`.

use candle_core::Tensor;

use super::{axpy, eval, FixedStep};
use crate::error::Result;
use crate::step::StepFn;

/// Forward Euler, first order; the seed's only method.
#[derive(Debug, Clone, Copy, Default)]
pub struct Euler;

impl FixedStep for Euler {
    const NAME: &'static str = "euler";
    const EVALS: usize = 1;

    fn advance(
        &self,
        f: &mut dyn StepFn,
        x: &Tensor,
        t0: f64,
        _t1: f64,
        dt: f64,
    ) -> Result<Tensor> {
        let v = eval(f, x, t0)?;
        axpy(x, dt, &v)
    }
}
