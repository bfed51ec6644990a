//! Adaptive Dormand-Prince 5(4) with error control, FSAL and a step cap.

use candle_core::{DType, Tensor};

use super::{check_finite, eval, Integration, Solver};
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

const C: [f64; 6] = [0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 6] = [
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
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

/// `x + h * sum(coef_i * k_i)`, skipping zero coefficients.
fn combine(x: &Tensor, h: f64, coefs: &[f64], ks: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, k) in coefs.iter().zip(ks) {
        if *c == 0.0 {
            continue;
        }
        let term = k.affine(c * h, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        None => Ok(x.clone()),
        Some(a) => Ok((x + a)?),
    }
}

/// RMS of `err / (atol + rtol * max(|x0|, |x1|))`, computed in f64.
fn error_norm(err: &Tensor, x0: &Tensor, x1: &Tensor, o: &AdaptiveOptions) -> Result<f64> {
    let err = err.to_dtype(DType::F64)?;
    let scale = x0
        .to_dtype(DType::F64)?
        .abs()?
        .maximum(&x1.to_dtype(DType::F64)?.abs()?)?
        .affine(o.rtol, o.atol)?;
    let r = (err / scale)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
    Ok(r.sqrt())
}

impl Dopri5 {
    /// Hairer's starting-step heuristic from the field's size at the start.
    fn initial_step(
        &self,
        f: &mut dyn StepFn,
        x: &Tensor,
        k1: &Tensor,
        t0: f64,
        dir: f64,
        span: f64,
    ) -> Result<f64> {
        let o = &self.0;
        let scale = x.to_dtype(DType::F64)?.abs()?.affine(o.rtol, o.atol)?;
        let rms = |v: &Tensor| -> Result<f64> {
            let r = (v.to_dtype(DType::F64)? / &scale)?
                .sqr()?
                .mean_all()?
                .to_scalar::<f64>()?;
            Ok(r.sqrt())
        };
        let d0 = rms(x)?;
        let d1 = rms(k1)?;
        let h0 = if d0 < 1e-5 || d1 < 1e-5 {
            1e-6
        } else {
            0.01 * d0 / d1
        };
        let h0 = h0.min(span);
        let x1 = combine(x, dir * h0, &[1.0], std::slice::from_ref(k1))?;
        let k2 = eval(f, &x1, t0 + dir * h0)?;
        let d2 = rms(&(k2 - k1)?)? / h0;
        let h1 = if d1.max(d2) <= 1e-15 {
            (h0 * 1e-3).max(1e-6)
        } else {
            (0.01 / d1.max(d2)).powf(0.2)
        };
        Ok((100.0 * h0).min(h1).min(span))
    }
}

impl Solver for Dopri5 {
    fn name(&self) -> &'static str {
        "dopri5"
    }

    fn integrate(
        &self,
        f: &mut dyn StepFn,
        mut x: Tensor,
        grid: &[f64],
        record: bool,
    ) -> Result<Integration> {
        let o = &self.0;
        o.validate()?;
        let (t_start, t_end) = match (grid.first(), grid.last()) {
            (Some(a), Some(b)) if grid.len() >= 2 && a != b => (*a, *b),
            _ => return Err(Error::ZeroSteps),
        };
        let dir = if t_end > t_start { 1.0 } else { -1.0 };
        let span = (t_end - t_start).abs();
        let mut t = t_start;
        let mut states = Vec::new();
        if record {
            states.push(x.clone());
        }
        let mut times = vec![t_start];
        let mut k1 = eval(f, &x, t)?;
        let mut nfe = 1;
        let mut h = match o.first_step {
            Some(h) => h,
            None => {
                nfe += 1;
                self.initial_step(f, &x, &k1, t, dir, span)?
            }
        }
        .clamp(o.min_step, o.max_step);
        let (mut accepted, mut rejected) = (0usize, 0usize);
        let mut reached_end = true;
        // Right after a rejection the step may not grow (Hairer's rule): the estimate that
        // just failed says the field is harder here than the last step size suggested.
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
            let mut ks = vec![k1.clone()];
            for s in 0..6 {
                let xs = combine(&x, hs, A[s], &ks)?;
                let ts = if s >= 4 { t + hs } else { t + C[s] * hs };
                ks.push(eval(f, &xs, ts)?);
                if s == 5 {
                    // The seventh stage's input is the fifth-order solution (FSAL).
                    nfe += 6;
                    let err = combine(&x.zeros_like()?, hs, &E, &ks)?;
                    let en = error_norm(&err, &x, &xs, o)?;
                    let en = if en.is_nan() { f64::INFINITY } else { en };
                    let factor = if en == 0.0 {
                        10.0
                    } else {
                        (0.9 * en.powf(-0.2)).clamp(0.2, 10.0)
                    };
                    if en <= 1.0 {
                        t = if last { t_end } else { t + hs };
                        x = xs;
                        k1 = ks[6].clone();
                        accepted += 1;
                        check_finite(&x, accepted, t)?;
                        if record {
                            states.push(x.clone());
                        }
                        times.push(t);
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
                                format!("a smaller step is needed at t = {t:.6} to meet rtol = {}, atol = {}", o.rtol, o.atol),
                            ));
                        }
                        h = (h_try * factor.min(1.0)).max(o.min_step);
                    }
                    break;
                }
            }
        }
        Ok(Integration {
            x,
            states,
            times,
            nfe,
            accepted,
            rejected,
            reached_end,
        })
    }
}
