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
//!
//! [`Architecture::for_data`] picks the network: the waypoint transformer for tables of at
//! least 10,000 sequences `[L, C]` (L ≥ 32, C ≤ 8), trained [`TRANSFORMER_STEPS`] steps within
//! [`TRANSFORMER_BUDGET`]; the MLP above otherwise. On the two outside trajectory sources at
//! equal time (the MLP's 23,438 steps against 1,000 transformer steps) the MLP scored better
//! (highway-env 0.247 against 0.325 m, urban 0.425 against 0.504 m); at 3,000 transformer
//! steps (two to three times the MLP's time, 5-7.4 minutes on a 2-core Xeon) the transformer
//! scored better on each (docs/training.md, "Which network").

use std::fmt;
use std::time::Duration;

/// The velocity network the rule chooses for a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// The velocity-mlp, sized by [`Sizing::for_data`].
    Mlp,
    /// The waypoint transformer (rows `[L, C]`, one token per waypoint), trained for
    /// [`TRANSFORMER_STEPS`] steps within [`TRANSFORMER_BUDGET`].
    Transformer,
}

/// The steps of a waypoint transformer chosen by the rule (the measured point: 3,000 steps at
/// batch 256 took minADE_6 below the velocity-mlp's on both outside sources).
pub const TRANSFORMER_STEPS: usize = 3_000;
/// The wall-clock budget that caps [`TRANSFORMER_STEPS`] on a slower machine (they take 5.1
/// to 7.4 minutes on a quiet 2-core Xeon: 9.7 to 6.8 steps/s in `bench --figures
/// train_traj_b256`).
pub const TRANSFORMER_BUDGET: Duration = Duration::from_secs(9 * 60);
/// The fewest rows, waypoints and the most channels for which the rule takes the transformer.
pub const TRANSFORMER_MIN_ROWS: usize = 10_000;
/// See [`TRANSFORMER_MIN_ROWS`].
pub const TRANSFORMER_MIN_TOKENS: usize = 32;
/// See [`TRANSFORMER_MIN_ROWS`].
pub const TRANSFORMER_MAX_CHANNELS: usize = 8;

impl Architecture {
    /// The network for a finite table of `rows` rows of shape `x_dims` (`None`: endless
    /// data such as the built-in toys and driving scenes), without class labels: the
    /// transformer for tables of at least 10,000 sequences `[L, C]` with L ≥ 32 waypoints of
    /// C ≤ 8 values, the velocity-mlp otherwise.
    ///
    /// ```
    /// use flow_matching::train::Architecture;
    /// assert_eq!(Architecture::for_data(Some(20_000), &[64, 2]), Architecture::Transformer);
    /// assert_eq!(Architecture::for_data(Some(2_000), &[64, 2]), Architecture::Mlp);
    /// assert_eq!(Architecture::for_data(None, &[64, 2]), Architecture::Mlp);
    /// assert_eq!(Architecture::for_data(Some(20_000), &[128]), Architecture::Mlp);
    /// ```
    pub fn for_data(rows: Option<usize>, x_dims: &[usize]) -> Architecture {
        match (rows, x_dims) {
            (Some(n), &[l, c])
                if n >= TRANSFORMER_MIN_ROWS
                    && l >= TRANSFORMER_MIN_TOKENS
                    && c <= TRANSFORMER_MAX_CHANNELS =>
            {
                Architecture::Transformer
            }
            _ => Architecture::Mlp,
        }
    }
}

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
