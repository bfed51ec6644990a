//! Classical fourth-order Runge-Kutta.

use super::rk::{Tableau, RK4};
use super::FixedStep;

/// Classical Runge-Kutta, fourth order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rk4;

impl FixedStep for Rk4 {
    const TABLEAU: &'static Tableau = &RK4;
}
