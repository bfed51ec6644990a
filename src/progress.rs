//! Progress of long work (training, evaluation), reported to a callback that the application
//! renders: the library itself never writes to the terminal.
//!
//! ```
//! use flow_matching::progress::{Progress, Reporter};
//! let mut seen = Vec::new();
//! let mut r = Reporter::new("train", 0, 4);
//! for step in 1..=4 {
//!     r.report(step, Some(0.5), Some(1e-3), &mut |p: &Progress| seen.push(p.done));
//! }
//! assert_eq!(seen, [1, 2, 3, 4]);
//! ```

use std::time::{Duration, Instant};

/// One report from a long-running job.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What is running (`"train"`, `"eval"`, ...).
    pub stage: &'static str,
    /// Units done so far (steps, settings), counted from the start of the whole job.
    pub done: usize,
    /// Units in all.
    pub total: usize,
    /// The latest training loss, where there is one.
    pub loss: Option<f32>,
    /// The learning rate of the step just taken, where there is one.
    pub lr: Option<f64>,
    /// Wall time since this call started (a resumed run counts from its resumption).
    pub elapsed: Duration,
    /// Estimated time left, from the rate of this call so far (`None` before its first unit).
    pub remaining: Option<Duration>,
}

/// A receiver of progress reports that a long-running type stores; any
/// `FnMut(&Progress) + Send` closure is one.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// Times a job and builds its [`Progress`] reports, estimating the time left.
#[derive(Debug, Clone)]
pub struct Reporter {
    stage: &'static str,
    start_done: usize,
    total: usize,
    started: Instant,
}

impl Reporter {
    /// Starts the clock for a job `stage` that stands at `done` of `total` units.
    pub fn new(stage: &'static str, done: usize, total: usize) -> Self {
        Reporter {
            stage,
            start_done: done,
            total,
            started: Instant::now(),
        }
    }

    /// Changes the job's total (a run planned from its measured rate).
    pub fn set_total(&mut self, total: usize) {
        self.total = total;
    }

    /// The report for `done` units with the given loss and learning rate.
    pub fn progress(&self, done: usize, loss: Option<f32>, lr: Option<f64>) -> Progress {
        let elapsed = self.started.elapsed();
        let ran = done.saturating_sub(self.start_done);
        let remaining = (ran > 0).then(|| {
            let left = self.total.saturating_sub(done) as f64;
            Duration::from_secs_f64(elapsed.as_secs_f64() * left / ran as f64)
        });
        Progress {
            stage: self.stage,
            done,
            total: self.total,
            loss,
            lr,
            elapsed,
            remaining,
        }
    }

    /// Builds the report for `done` units and hands it to `sink`.
    pub fn report(
        &self,
        done: usize,
        loss: Option<f32>,
        lr: Option<f64>,
        sink: &mut dyn FnMut(&Progress),
    ) {
        sink(&self.progress(done, loss, lr));
    }
}
