//! The step-function protocol `step_fn(x, t) -> v`, below both the samplers and the solvers.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// The step-function protocol: the velocity `v(x, t)` for `x` `[B, *x_dims]` and `t` `[B, 1, ..., 1]`.
///
/// Any closure `FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>` is a step function; a
/// closure that captures a condition is conditional generation.
pub trait StepFn {
    /// The velocity at `x` and per-row times `t`, shaped like `x`.
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// The velocity when every row shares the time `t`; models override it to compute the
    /// time features once instead of once per row.
    fn step_at(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let t = time_tensor(x, t)?;
        self.step(x, &t)
    }

    /// A slice-level form of this velocity for CPU f32 sampling, if the step function has one;
    /// `FlowMatching::sample` then runs Euler over preallocated slices (see `crate::kernel`).
    /// The default, `None`, keeps the generic tensor path.
    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        None
    }
}

/// A velocity evaluated on row-major f32 slices `[B, D]` with one time shared by every row.
pub trait FastVelocity {
    /// Writes `v(x, t)` into `out` (the shape of `x`); it must not allocate once warmed up.
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()>;

    /// Runs Euler over the whole `grid` (computed on demand) in place of `x`, if the implementor can do better than
    /// one [`Self::velocity`] call a step (a model can fork its threads once per run); `None`
    /// means "use the step loop". Errors must be the step loop's (`Error::NonFinite`).
    fn euler_in_place(
        &mut self,
        _x: &mut [f32],
        _grid: &crate::schedule::TimeGrid,
    ) -> Option<Result<()>> {
        None
    }
}

impl<F> StepFn for F
where
    F: FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(self(x, t)?)
    }
}

/// `t` as a `[B, 1, ..., 1]` tensor of `x`'s dtype and device.
pub fn time_tensor(x: &Tensor, t: f64) -> Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    Ok(Tensor::full(t, shape, x.device())?.to_dtype(x.dtype())?)
}

/// Calls a step function and checks that it answered with `x`'s shape, dtype and device.
pub fn checked_step(f: &mut dyn StepFn, x: &Tensor, t: f64) -> Result<Tensor> {
    let v = f.step_at(x, t)?;
    if v.dims() != x.dims() {
        return Err(Error::StepShape {
            expected: x.dims().to_vec(),
            got: v.dims().to_vec(),
        });
    }
    if v.dtype() != x.dtype() {
        return Err(Error::StepDType {
            expected: x.dtype(),
            got: v.dtype(),
        });
    }
    if !v.device().same_device(x.device()) {
        return Err(Error::StepDevice {
            expected: format!("{:?}", x.device().location()),
            got: format!("{:?}", v.device().location()),
        });
    }
    Ok(v)
}
