//! Forward Euler: `x' = x + dt v(x, t)`.

use super::rk::{Tableau, EULER};
use super::FixedStep;

/// Forward Euler, first order; the seed's only method.
#[derive(Debug, Clone, Copy, Default)]
pub struct Euler;

impl FixedStep for Euler {
    const TABLEAU: &'static Tableau = &EULER;
}
