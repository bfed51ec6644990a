//! One description of every Runge-Kutta method (Butcher tableaux) and one driver for fixed
//! steps and one for adaptive Dormand-Prince, both generic over the vector operations of
//! [`Field`]. [`TensorField`](super::fields::TensorField) runs them on candle tensors (any
//! dtype or device), [`SliceField`](super::fields::SliceField) on preallocated f32 slices
//! through a [`FastVelocity`](crate::step::FastVelocity): the same arithmetic in the same
//! order, so the two paths agree to the bit for the same velocities.

use crate::error::{Error, Result};
use crate::schedule::TimeGrid;

use super::AdaptiveOptions;

/// An explicit Runge-Kutta method: stage `s` evaluates the field at `t0 + c[s] dt` and
/// `x + dt sum_j a[s][j] k_j`; the step is `x + dt sum_s b[s] k_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tableau {
    /// The name the method parses from.
    pub name: &'static str,
    /// Stage times as fractions of the step (a stage at `c = 1` is evaluated at `t1` itself).
    pub c: &'static [f64],
    /// Each stage's coefficients on the earlier stages (`a[0]` is empty).
    pub a: &'static [&'static [f64]],
    /// The solution's weights.
    pub b: &'static [f64],
}

impl Tableau {
    /// Velocity evaluations per step.
    pub fn stages(&self) -> usize {
        self.b.len()
    }
}

/// Forward Euler.
pub const EULER: Tableau = Tableau {
    name: "euler",
    c: &[0.0],
    a: &[&[]],
    b: &[1.0],
};

/// Explicit midpoint.
pub const MIDPOINT: Tableau = Tableau {
    name: "midpoint",
    c: &[0.0, 0.5],
    a: &[&[], &[0.5]],
    b: &[0.0, 1.0],
};

/// Heun's method (explicit trapezoid).
pub const HEUN: Tableau = Tableau {
    name: "heun",
    c: &[0.0, 1.0],
    a: &[&[], &[1.0]],
    b: &[0.5, 0.5],
};

/// Classical fourth-order Runge-Kutta.
pub const RK4: Tableau = Tableau {
    name: "rk4",
    c: &[0.0, 0.5, 0.5, 1.0],
    a: &[&[], &[0.5], &[0.0, 0.5], &[0.0, 0.0, 1.0]],
    b: &[1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
};

/// Dormand-Prince 5(4) stage times.
pub const DOPRI_C: [f64; 6] = [0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0];
/// Dormand-Prince 5(4) stage coefficients; the last row is the fifth-order solution (FSAL).
pub const DOPRI_A: [&[f64]; 6] = [
    &[0.2],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
/// The fifth-order weights minus the embedded fourth-order ones.
pub const DOPRI_E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

/// The vector operations the drivers need. Implementations must round like candle's tensor
/// ops do (each product `(c h) k` rounded, then summed left to right, then added to the base;
/// norms in f64) so that every implementation gives the same bits.
pub trait Field {
    /// A state or velocity.
    type V;
    /// A vector shaped like `x` (its contents are overwritten before use); setup only.
    fn like(&mut self, x: &Self::V) -> Result<Self::V>;
    /// `t1 - t0` rounded as the state's precision computes it.
    fn delta(&self, t0: f64, t1: f64) -> f64;
    /// `out = v(x, t)`.
    fn eval(&mut self, x: &Self::V, t: f64, out: &mut Self::V) -> Result<()>;
    /// `out = base + sum_i (coefs[i] h) ks[i]` over the non-zero coefficients (no base: the
    /// sum alone).
    fn combine(
        &mut self,
        out: &mut Self::V,
        base: Option<&Self::V>,
        h: f64,
        coefs: &[f64],
        ks: &[Self::V],
    ) -> Result<()>;
    /// `out = a - b`.
    fn sub(&mut self, out: &mut Self::V, a: &Self::V, b: &Self::V) -> Result<()>;
    /// `sqrt(mean((v / (atol + rtol max(|x0|, |x1|)))^2))` in f64 (`x1 = None`: `|x0|` alone).
    fn scaled_rms(
        &mut self,
        v: &Self::V,
        x0: &Self::V,
        x1: Option<&Self::V>,
        rtol: f64,
        atol: f64,
    ) -> Result<f64>;
    /// Errors with [`Error::NonFinite`] when `x` holds NaN or infinity after step `step`.
    fn check_finite(&mut self, x: &Self::V, step: usize, t: f64) -> Result<()>;
    /// Keeps a copy of an accepted state (recorded runs only).
    fn record(&mut self, x: &Self::V) -> Result<()>;
}

/// What a driver returns besides the recorded states (which the field keeps).
#[derive(Debug, Clone)]
pub struct Run<V> {
    /// The state at the last time reached.
    pub x: V,
    /// The times of the accepted states, the start first, when recording; otherwise the start
    /// and the last time reached (a long run stores no grid).
    pub times: Vec<f64>,
    /// Velocity evaluations.
    pub nfe: usize,
    /// Accepted steps.
    pub accepted: usize,
    /// Rejected steps.
    pub rejected: usize,
    /// False when the step cap stopped the run early.
    pub reached_end: bool,
}

/// Integrates `x` along `grid` with `tab`, one step per grid interval; the buffers are made
/// before the loop, which then allocates nothing for slice fields.
pub fn fixed<F: Field>(
    f: &mut F,
    tab: &Tableau,
    mut x: F::V,
    grid: &TimeGrid,
    record: bool,
) -> Result<Run<F::V>> {
    if grid.len() < 2 {
        return Err(Error::ZeroSteps);
    }
    let stages = tab.stages();
    let mut ks = (0..stages)
        .map(|_| f.like(&x))
        .collect::<Result<Vec<_>>>()?;
    let mut xs = f.like(&x)?;
    let mut next = f.like(&x)?;
    if record {
        f.record(&x)?;
    }
    for (i, (t0, t1)) in grid.windows().enumerate() {
        let dt = f.delta(t0, t1);
        for s in 0..stages {
            let c = tab.c[s];
            let ts = if c == 1.0 { t1 } else { t0 + c * dt };
            let (done, rest) = ks.split_at_mut(s);
            if s == 0 {
                f.eval(&x, ts, &mut rest[0])?;
            } else {
                f.combine(&mut xs, Some(&x), dt, tab.a[s], done)?;
                f.eval(&xs, ts, &mut rest[0])?;
            }
        }
        f.combine(&mut next, Some(&x), dt, tab.b, &ks)?;
        std::mem::swap(&mut x, &mut next);
        f.check_finite(&x, i + 1, t1)?;
        if record {
            f.record(&x)?;
        }
    }
    let steps = grid.steps();
    let times = if record {
        grid.to_vec()
    } else {
        grid.first().into_iter().chain(grid.last()).collect()
    };
    Ok(Run {
        x,
        times,
        nfe: steps * stages,
        accepted: steps,
        rejected: 0,
        reached_end: true,
    })
}

/// Hairer's starting-step heuristic from the field's size at the start; `ks[0]` holds
/// `v(x, t0)`, `ks[1]`, `xs` and `tmp` are scratch.
#[allow(clippy::too_many_arguments)]
fn initial_step<F: Field>(
    f: &mut F,
    o: &AdaptiveOptions,
    x: &F::V,
    ks: &mut [F::V],
    xs: &mut F::V,
    tmp: &mut F::V,
    t0: f64,
    dir: f64,
    span: f64,
) -> Result<f64> {
    let d0 = f.scaled_rms(x, x, None, o.rtol, o.atol)?;
    let d1 = f.scaled_rms(&ks[0], x, None, o.rtol, o.atol)?;
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    let h0 = h0.min(span);
    f.combine(xs, Some(x), dir * h0, &[1.0], &ks[..1])?;
    let (k1, rest) = ks.split_at_mut(1);
    f.eval(xs, t0 + dir * h0, &mut rest[0])?;
    f.sub(tmp, &rest[0], &k1[0])?;
    let d2 = f.scaled_rms(tmp, x, None, o.rtol, o.atol)? / h0;
    let h1 = if d1.max(d2) <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / d1.max(d2)).powf(0.2)
    };
    Ok((100.0 * h0).min(h1).min(span))
}

/// Adaptive Dormand-Prince 5(4) from `grid`'s first time to its last, with error control,
/// FSAL, Hairer's no-growth-after-rejection rule and the step cap of `o`.
pub fn dopri5<F: Field>(
    f: &mut F,
    o: &AdaptiveOptions,
    mut x: F::V,
    grid: &TimeGrid,
    record: bool,
) -> Result<Run<F::V>> {
    o.validate()?;
    let (t_start, t_end) = match (grid.first(), grid.last()) {
        (Some(a), Some(b)) if grid.len() >= 2 && a != b => (a, b),
        _ => return Err(Error::ZeroSteps),
    };
    let dir = if t_end > t_start { 1.0 } else { -1.0 };
    let span = (t_end - t_start).abs();
    let mut t = t_start;
    let mut ks = (0..7).map(|_| f.like(&x)).collect::<Result<Vec<_>>>()?;
    let mut xs = f.like(&x)?;
    let mut err = f.like(&x)?;
    if record {
        f.record(&x)?;
    }
    // Reserved so that runs of up to a few hundred steps never grow it inside the loop.
    let mut times = Vec::with_capacity(if record { o.max_steps.min(512) + 1 } else { 2 });
    times.push(t_start);
    f.eval(&x, t, &mut ks[0])?;
    let mut nfe = 1;
    let mut h = match o.first_step {
        Some(h) => h,
        None => {
            nfe += 1;
            initial_step(f, o, &x, &mut ks, &mut xs, &mut err, t, dir, span)?
        }
    }
    .clamp(o.min_step, o.max_step);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let mut reached_end = true;
    // Right after a rejection the step may not grow (Hairer's rule): the estimate that just
    // failed says the field is harder here than the last step size suggested.
    let mut just_rejected = false;
    while dir * (t_end - t) > 1e-12 * span.max(1.0) {
        if accepted + rejected >= o.max_steps {
            if o.return_on_max_steps {
                reached_end = false;
                break;
            }
            return Err(Error::MaxStepsReached {
                steps: accepted + rejected,
                t,
                t_end,
            });
        }
        let remaining = dir * (t_end - t);
        let last = h >= remaining;
        let h_try = if last { remaining } else { h };
        let hs = dir * h_try;
        for s in 0..6 {
            let (done, rest) = ks.split_at_mut(s + 1);
            f.combine(&mut xs, Some(&x), hs, DOPRI_A[s], done)?;
            let ts = if s >= 4 { t + hs } else { t + DOPRI_C[s] * hs };
            f.eval(&xs, ts, &mut rest[0])?;
        }
        // The seventh stage's input (now in xs) is the fifth-order solution (FSAL).
        nfe += 6;
        f.combine(&mut err, None, hs, &DOPRI_E, &ks)?;
        let en = f.scaled_rms(&err, &x, Some(&xs), o.rtol, o.atol)?;
        let en = if en.is_nan() { f64::INFINITY } else { en };
        let factor = if en == 0.0 {
            10.0
        } else {
            (0.9 * en.powf(-0.2)).clamp(0.2, 10.0)
        };
        if en <= 1.0 {
            t = if last { t_end } else { t + hs };
            std::mem::swap(&mut x, &mut xs);
            ks.swap(0, 6);
            accepted += 1;
            f.check_finite(&x, accepted, t)?;
            if record {
                f.record(&x)?;
                times.push(t);
            }
            let factor = if just_rejected {
                factor.min(1.0)
            } else {
                factor
            };
            just_rejected = false;
            h = (h_try * factor).clamp(o.min_step, o.max_step);
        } else {
            rejected += 1;
            just_rejected = true;
            if h_try <= o.min_step {
                return Err(Error::invalid(
                    "min_step",
                    o.min_step,
                    format!(
                        "a smaller step is needed at t = {t:.6} to meet rtol = {}, atol = {}",
                        o.rtol, o.atol
                    ),
                ));
            }
            h = (h_try * factor.min(1.0)).max(o.min_step);
        }
    }
    if !record {
        times.push(t);
    }
    Ok(Run {
        x,
        times,
        nfe,
        accepted,
        rejected,
        reached_end,
    })
}
