//! Heun's method: an Euler predictor corrected by the mean of the two end slopes.

use super::rk::{Tableau, HEUN};
use super::FixedStep;

/// Heun's method (explicit trapezoid), second order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heun;

impl FixedStep for Heun {
    const TABLEAU: &'static Tableau = &HEUN;
}
