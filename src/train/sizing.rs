//! Training sizes chosen from the data when the user gives none.
//!
//! The rule (measured on the built-in 2-D sets, a 20,000-row user set and the 8×8 digits; see
//! docs/training.md). The step count of the middle row was measured on two trajectory sources
//! this project did not write (scripts/validation: highway-env traffic and an independently
//! written urban scene family, 20,000 futures `[64, 2]` each): 24,000 steps against 8,000
//! took minADE_6 from 0.326 to 0.247 m and from 0.480 to 0.425 m (1.47x to 1.30x the oracle).
//!
//! | data dimension D | hidden | depth | batch | steps |
//! | --- | ---: | ---: | ---: | ---: |
//! | D ≤ 16 | 128 | 3 | 256 | 20,000 |
//! | 16 < D ≤ 256 | 256 | 3 | 256 | 24,000 |
//! | D > 256 | 512 | 4 | 128 | 8,000 |
//!
//! A finite table of N rows is seen at most [`MAX_EPOCHS`] times (so a small table is not
//! memorised), but never fewer than [`MIN_STEPS`] steps; a table smaller than the batch
//! gets a batch of N rows.

use std::fmt;

/// The most passes over a finite table that the chosen step count makes.
pub const MAX_EPOCHS: usize = 300;
/// The fewest steps the rule chooses.
pub const MIN_STEPS: usize = 2_000;

/// Model width and depth, batch and step count for a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Hidden width of the MLP.
    pub hidden: usize,
    /// Hidden layers of the MLP.
    pub depth: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Optimiser steps.
    pub steps: usize,
}

impl Sizing {
    /// The sizes for data of `dim` numbers per sample; `rows` is the size of a finite table
    /// (`None` for endless data, such as the built-in toys).
    ///
    /// ```
    /// use flow_matching::train::Sizing;
    /// let s = Sizing::for_data(Some(20_000), 2);
    /// assert_eq!((s.hidden, s.depth, s.batch_size, s.steps), (128, 3, 256, 20_000));
    /// // A small table: at most 300 epochs (300 × 1,797 / 256), never fewer than 2,000 steps.
    /// assert_eq!(Sizing::for_data(Some(1_797), 64).steps, 2_106);
    /// assert_eq!(Sizing::for_data(Some(500), 2).steps, 2_000);
    /// ```
    pub fn for_data(rows: Option<usize>, dim: usize) -> Sizing {
        let (hidden, depth, batch, steps) = if dim <= 16 {
            (128, 3, 256, 20_000)
        } else if dim <= 256 {
            (256, 3, 256, 24_000)
        } else {
            (512, 4, 128, 8_000)
        };
        let batch_size = match rows {
            Some(n) if n >= 1 && n < batch => n,
            _ => batch,
        };
        let steps = match rows {
            Some(n) => steps
                .min((MAX_EPOCHS * n).div_ceil(batch_size))
                .max(MIN_STEPS),
            None => steps,
        };
        Sizing {
            hidden,
            depth,
            batch_size,
            steps,
        }
    }
}

impl fmt::Display for Sizing {
    /// `hidden H, depth L, batch B, S steps`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hidden {}, depth {}, batch {}, {} steps",
            self.hidden, self.depth, self.batch_size, self.steps
        )
    }
}
