//! Forward Euler over preallocated f32 slices, for step functions with a [`FastVelocity`].

use crate::error::{Error, Result};
use crate::schedule::TimeGrid;
use crate::step::FastVelocity;

/// The result of [`euler`]: the final state and, when recording, every state `[T + 1, B, D]`.
#[derive(Debug, Clone)]
pub struct EulerRun {
    /// The final state `[B, D]`.
    pub x: Vec<f32>,
    /// Every state, step-major `[T + 1, B, D]` (only when recording).
    pub states: Option<Vec<f32>>,
}

/// Integrates `x` along `grid` with Euler: `x += (t1 - t0) v(x, t0)`, `dt` rounded as f32 and
/// applied in two roundings like the generic path; no allocation inside the loop.
///
/// Errors name the step (1-based) and the time reached when the state stops being finite.
pub fn euler(
    f: &mut dyn FastVelocity,
    mut x: Vec<f32>,
    grid: &TimeGrid,
    record: bool,
) -> Result<EulerRun> {
    if grid.len() < 2 {
        return Err(Error::ZeroSteps);
    }
    if !record {
        if let Some(r) = f.euler_in_place(&mut x, grid) {
            r?;
            return Ok(EulerRun { x, states: None });
        }
    }
    let n = x.len();
    let mut v = vec![0.0f32; n];
    let mut states = record.then(|| {
        let mut s = Vec::with_capacity(grid.len().saturating_mul(n));
        s.extend_from_slice(&x);
        s
    });
    for (i, (w0, w1)) in grid.windows().enumerate() {
        let (t0, t1) = (w0 as f32, w1 as f32);
        let dt = t1 - t0;
        f.velocity(&x, t0, &mut v)?;
        let mut finite = true;
        for (xi, vi) in x.iter_mut().zip(&v) {
            let p = dt * *vi;
            *xi += p;
            finite &= xi.is_finite();
        }
        if !finite {
            return Err(Error::NonFinite { step: i + 1, t: w1 });
        }
        if let Some(s) = states.as_mut() {
            s.extend_from_slice(&x);
        }
    }
    Ok(EulerRun { x, states })
}

/// Reorders step-major states `[T + 1, B, D]` into the trajectory layout `[B, T + 1, D]`.
pub fn batch_major(states: &[f32], steps_plus_one: usize, batch: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; states.len()];
    for s in 0..steps_plus_one {
        for b in 0..batch {
            let src = (s * batch + b) * d;
            let dst = (b * steps_plus_one + s) * d;
            out[dst..dst + d].copy_from_slice(&states[src..src + d]);
        }
    }
    out
}
