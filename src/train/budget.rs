//! A wall-clock budget for a training run: the step count is planned from the time the run
//! measures per step, so a user says "ten minutes" instead of guessing a step count that fits.
//!
//! The plan is made once the run has taken [`CALIBRATION_STEPS`] steps and [`CALIBRATION_TIME`]
//! (the first steps include one-off costs: packing weights, allocating buffers, warming the
//! caches, so a longer look is steadier) and made again at half the planned run, when the rate
//! is known far better. Both happen inside the learning rate's linear warm-up at the default
//! sizes, where the total does not enter the schedule; a later re-plan only stretches or
//! shortens the cosine tail. The run never passes the budget: if the clock runs out before the
//! plan does, it stops after the step that crossed it.

use std::time::{Duration, Instant};

/// Steps timed before the first plan.
pub const CALIBRATION_STEPS: usize = 5;
/// Time spent before the first plan (unless [`CALIBRATION_MAX_STEPS`] come first).
pub const CALIBRATION_TIME: Duration = Duration::from_secs(2);
/// Steps after which the first plan is made even if [`CALIBRATION_TIME`] has not passed.
pub const CALIBRATION_MAX_STEPS: usize = 200;

/// A run's time budget and where its plan stands.
#[derive(Debug, Clone)]
pub struct TimeBudget {
    budget: Duration,
    max_steps: usize,
    started: Option<(Instant, usize)>,
    plans: usize,
}

impl TimeBudget {
    /// A budget of `budget` wall time from the first step of the run.
    ///
    /// ```
    /// use std::time::Duration;
    /// use flow_matching::train::TimeBudget;
    /// let mut b = TimeBudget::new(Duration::from_secs(60));
    /// b.start(0);
    /// // Nothing is planned before the calibration steps.
    /// assert_eq!(b.plan_at(1, 1_000, Duration::from_millis(10)), None);
    /// // 200 steps in 2 s: 10 ms a step, 58 s left: 5,800 more steps.
    /// assert_eq!(b.plan_at(200, 1_000, Duration::from_secs(2)), Some(6_000));
    /// ```
    pub fn new(budget: Duration) -> Self {
        TimeBudget {
            budget,
            max_steps: usize::MAX,
            started: None,
            plans: 0,
        }
    }

    /// Never plans past `max_steps` in all (a run that is fast enough stops there).
    pub fn with_max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = max_steps;
        self
    }

    /// The budget.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Starts the clock at step `step` (the first step of this call: a resumed run counts
    /// from its resumption).
    pub fn start(&mut self, step: usize) {
        self.started = Some((Instant::now(), step));
    }

    /// The plan after step `step` of a run planned to `total`: `Some(new total)` when a plan
    /// is made now (at least `step`, so the run may end here), `None` otherwise.
    pub fn after_step(&mut self, step: usize, total: usize) -> Option<usize> {
        let (t0, _) = self.started?;
        self.plan_at(step, total, t0.elapsed())
    }

    /// [`Self::after_step`] with the elapsed time given (what it measures; tests pass it).
    pub fn plan_at(&mut self, step: usize, total: usize, elapsed: Duration) -> Option<usize> {
        let (_, s0) = self.started?;
        let ran = step.saturating_sub(s0);
        if ran == 0 {
            return None;
        }
        if elapsed >= self.budget {
            return Some(step);
        }
        let calibrated = ran >= CALIBRATION_MAX_STEPS
            || (ran >= CALIBRATION_STEPS && elapsed >= CALIBRATION_TIME);
        let due = match self.plans {
            0 => calibrated,
            1 => step >= s0 + total.saturating_sub(s0) / 2,
            _ => false,
        };
        if !due {
            return None;
        }
        self.plans += 1;
        let per_step = elapsed.as_secs_f64() / ran as f64;
        let left = (self.budget - elapsed).as_secs_f64();
        let more = (left / per_step).floor();
        // A rate of zero (a clock that did not move) plans nothing new rather than forever.
        let more = if more.is_finite() { more as usize } else { 0 };
        Some(step.saturating_add(more).min(self.max_steps).max(step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_follows_the_measured_rate_and_is_revised_once_at_half_way() {
        let mut b = TimeBudget::new(Duration::from_secs(100));
        b.start(0);
        // 5 steps in 1 s: not calibrated yet (2 s needed).
        assert_eq!(b.plan_at(5, 10, Duration::from_secs(1)), None);
        // 10 steps in 2 s: 0.2 s a step, 98 s left: 490 more.
        assert_eq!(b.plan_at(10, 10, Duration::from_secs(2)), Some(500));
        assert_eq!(b.plan_at(100, 500, Duration::from_secs(20)), None);
        // At half the plan the steps got slower (0.25 s): 250 steps, 37.5 s left, 150 more.
        assert_eq!(
            b.plan_at(250, 500, Duration::from_millis(62_500)),
            Some(400)
        );
        assert_eq!(b.plan_at(300, 400, Duration::from_secs(75)), None);
        // Past the budget the run ends at this step whatever the plan.
        assert_eq!(b.plan_at(399, 400, Duration::from_secs(101)), Some(399));
    }

    #[test]
    fn a_resumed_run_times_only_its_own_steps() {
        let mut b = TimeBudget::new(Duration::from_secs(10));
        b.start(1_000);
        assert_eq!(b.plan_at(1_000, 2_000, Duration::from_secs(3)), None);
        // 200 steps in 1 s: 5 ms a step, 9 s left: 1,800 more.
        assert_eq!(b.plan_at(1_200, 2_000, Duration::from_secs(1)), Some(3_000));
    }

    #[test]
    fn a_fast_run_stops_at_its_most_steps() {
        let mut b = TimeBudget::new(Duration::from_secs(100)).with_max_steps(5_000);
        b.start(0);
        assert_eq!(b.plan_at(200, 5_000, Duration::from_secs(2)), Some(5_000));
    }

    #[test]
    fn a_budget_spent_in_calibration_ends_the_run() {
        let mut b = TimeBudget::new(Duration::from_secs(1));
        b.start(0);
        assert_eq!(b.plan_at(3, 1_000, Duration::from_millis(1_500)), Some(3));
    }
}
