//! Explicit midpoint: evaluate at the half step, advance with that slope.

use super::rk::{Tableau, MIDPOINT};
use super::FixedStep;

/// Explicit midpoint method, second order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Midpoint;

impl FixedStep for Midpoint {
    const TABLEAU: &'static Tableau = &MIDPOINT;
}
