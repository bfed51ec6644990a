//! The two implementations of [`Field`]: candle tensors through a [`StepFn`] (any dtype and
//! device) and preallocated f32 slices through a [`FastVelocity`] (the CPU fast path).

use candle_core::{DType, Tensor};

use super::rk::Field;
use super::{check_finite, delta, eval};
use crate::error::{Error, Result};
use crate::step::{FastVelocity, StepFn};

/// Tensors: every operation is a candle op, so the solvers run wherever the step function does.
pub struct TensorField<'a> {
    /// The step function.
    pub f: &'a mut dyn StepFn,
    /// The state's dtype (for [`Field::delta`]).
    pub dtype: DType,
    /// The recorded states.
    pub states: Vec<Tensor>,
}

impl<'a> TensorField<'a> {
    /// A field over `f` for states of `dtype`.
    pub fn new(f: &'a mut dyn StepFn, dtype: DType) -> Self {
        TensorField {
            f,
            dtype,
            states: Vec::new(),
        }
    }
}

impl Field for TensorField<'_> {
    type V = Tensor;

    fn like(&mut self, x: &Tensor) -> Result<Tensor> {
        // Tensors are immutable and shared: the buffer is replaced, never written.
        Ok(x.clone())
    }

    fn delta(&self, t0: f64, t1: f64) -> f64 {
        delta(self.dtype, t0, t1)
    }

    fn eval(&mut self, x: &Tensor, t: f64, out: &mut Tensor) -> Result<()> {
        *out = eval(self.f, x, t)?;
        Ok(())
    }

    fn combine(
        &mut self,
        out: &mut Tensor,
        base: Option<&Tensor>,
        h: f64,
        coefs: &[f64],
        ks: &[Tensor],
    ) -> Result<()> {
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
        *out = match (base, acc) {
            (Some(b), Some(a)) => (b + a)?,
            (Some(b), None) => b.clone(),
            (None, Some(a)) => a,
            (None, None) => ks
                .first()
                .ok_or_else(|| Error::invalid("combine", "no vectors", "at least one"))?
                .zeros_like()?,
        };
        Ok(())
    }

    fn sub(&mut self, out: &mut Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        *out = (a - b)?;
        Ok(())
    }

    fn scaled_rms(
        &mut self,
        v: &Tensor,
        x0: &Tensor,
        x1: Option<&Tensor>,
        rtol: f64,
        atol: f64,
    ) -> Result<f64> {
        let mut m = x0.to_dtype(DType::F64)?.abs()?;
        if let Some(x1) = x1 {
            m = m.maximum(&x1.to_dtype(DType::F64)?.abs()?)?;
        }
        let scale = m.affine(rtol, atol)?;
        let r = (v.to_dtype(DType::F64)? / scale)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f64>()?;
        Ok(r.sqrt())
    }

    fn check_finite(&mut self, x: &Tensor, step: usize, t: f64) -> Result<()> {
        check_finite(x, step, t)
    }

    fn record(&mut self, x: &Tensor) -> Result<()> {
        self.states.push(x.clone());
        Ok(())
    }
}

/// f32 slices through a [`FastVelocity`]: the loops round exactly like candle's f32 ops
/// (products rounded, then summed left to right, no fused multiply-adds; norms in f64 summed
/// in order), and nothing is allocated once the buffers exist.
pub struct SliceField<'a> {
    /// The slice-level velocity.
    pub f: &'a mut dyn FastVelocity,
    /// The recorded states, step-major `[T + 1, B, D]`.
    pub states: Vec<f32>,
}

impl<'a> SliceField<'a> {
    /// A field over `f`; `reserve` floats of recording space are allocated up front.
    pub fn new(f: &'a mut dyn FastVelocity, reserve: usize) -> Self {
        SliceField {
            f,
            states: Vec::with_capacity(reserve),
        }
    }
}

/// Up to this many non-zero terms in one combination (Dormand-Prince's error has 6).
const MAX_TERMS: usize = 8;

impl Field for SliceField<'_> {
    type V = Vec<f32>;

    fn like(&mut self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(vec![0.0; x.len()])
    }

    fn delta(&self, t0: f64, t1: f64) -> f64 {
        delta(DType::F32, t0, t1)
    }

    fn eval(&mut self, x: &Vec<f32>, t: f64, out: &mut Vec<f32>) -> Result<()> {
        self.f.velocity(x, t as f32, out)
    }

    fn combine(
        &mut self,
        out: &mut Vec<f32>,
        base: Option<&Vec<f32>>,
        h: f64,
        coefs: &[f64],
        ks: &[Vec<f32>],
    ) -> Result<()> {
        let mut terms: [(f32, &[f32]); MAX_TERMS] = [(0.0, &[]); MAX_TERMS];
        let mut n = 0;
        for (c, k) in coefs.iter().zip(ks) {
            if *c != 0.0 {
                if n == MAX_TERMS {
                    return Err(Error::invalid(
                        "Runge-Kutta combination",
                        coefs.len(),
                        format!("at most {MAX_TERMS} non-zero coefficients"),
                    ));
                }
                // candle's affine rounds the multiplier to the dtype first.
                terms[n] = ((c * h) as f32, k.as_slice());
                n += 1;
            }
        }
        let terms = &terms[..n];
        let len = out.len();
        match (base, terms.split_first()) {
            (Some(b), None) => out.copy_from_slice(b),
            (None, None) => out.fill(0.0),
            (b, Some(((m0, k0), rest))) => {
                for j in 0..len {
                    // `v * m + 0.0` as candle's affine computes it (the `+ 0.0` turns -0 into +0).
                    let mut acc = k0[j] * m0 + 0.0;
                    for (m, k) in rest {
                        acc += k[j] * m + 0.0;
                    }
                    out[j] = match b {
                        Some(b) => b[j] + acc,
                        None => acc,
                    };
                }
            }
        }
        Ok(())
    }

    fn sub(&mut self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) -> Result<()> {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x - y;
        }
        Ok(())
    }

    fn scaled_rms(
        &mut self,
        v: &Vec<f32>,
        x0: &Vec<f32>,
        x1: Option<&Vec<f32>>,
        rtol: f64,
        atol: f64,
    ) -> Result<f64> {
        let mut sum = 0f64;
        for j in 0..v.len() {
            let mut m = (x0[j] as f64).abs();
            if let Some(x1) = x1 {
                let a = (x1[j] as f64).abs();
                // candle's maximum: `if a < b { b } else { a }` per element.
                m = if m < a { a } else { m };
            }
            let q = v[j] as f64 / (m * rtol + atol);
            sum += q * q;
        }
        // mean_all is the sum times `1 / n` (an affine map), as candle computes it.
        let mean = sum * (1.0 / v.len().max(1) as f64) + 0.0;
        Ok(mean.sqrt())
    }

    fn check_finite(&mut self, x: &Vec<f32>, step: usize, t: f64) -> Result<()> {
        if x.iter().all(|v| v.is_finite()) {
            Ok(())
        } else {
            Err(Error::NonFinite { step, t })
        }
    }

    fn record(&mut self, x: &Vec<f32>) -> Result<()> {
        self.states.extend_from_slice(x);
        Ok(())
    }
}
