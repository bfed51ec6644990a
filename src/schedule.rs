//! Time grids from noise (t = 0) to data (t = 1).

use candle_core::DType;

use crate::error::{Error, Result};

/// A time grid: where the fixed-step solvers evaluate the field.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Schedule {
    /// `linspace(0, 1, T + 1)`, the seed's grid.
    #[default]
    Uniform,
    /// The uniform grid warped by `t' = t / (t + s (1 - t))`; `s > 1` spends more steps near
    /// the noise, `s = 1` is uniform.
    Shift(f64),
    /// `t = (1 - cos(pi u)) / 2` over a uniform `u`: small steps at both ends.
    Cosine,
    /// A user-given grid, increasing from 0 to 1 (its length fixes the step count).
    Custom(Vec<f64>),
}

/// The most steps of a grid in float32 (or half) precision: `2^24`, where the spacing of
/// float32 numbers just below 1 is reached.
pub const MAX_F32_STEPS: usize = 1 << 24;

/// The names [`Schedule`] parses from (`shift:S` takes a number).
pub const SCHEDULE_NAMES: [&str; 3] = ["uniform", "shift:S", "cosine"];

impl std::str::FromStr for Schedule {
    type Err = Error;

    /// Parses `uniform`, `cosine`, `shift:3` or a comma-separated grid `0,0.3,1`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        if lower == "uniform" || lower == "linear" {
            return Ok(Schedule::Uniform);
        }
        if lower == "cosine" {
            return Ok(Schedule::Cosine);
        }
        if let Some(v) = lower.strip_prefix("shift:") {
            let shift: f64 = v.parse().map_err(|_| {
                Error::invalid(
                    "schedule shift",
                    crate::limits::excerpt(v),
                    "a number greater than 0, as in shift:3",
                )
            })?;
            let sched = Schedule::Shift(shift);
            sched.validate()?;
            return Ok(sched);
        }
        if s.contains(',') {
            let grid = s
                .split(',')
                .map(|p| p.trim().parse::<f64>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| {
                    Error::invalid(
                        "time grid",
                        crate::limits::excerpt(s),
                        "comma-separated numbers from 0 to 1",
                    )
                })?;
            let sched = Schedule::Custom(grid);
            sched.validate()?;
            return Ok(sched);
        }
        Err(Error::UnknownName {
            kind: "time schedule",
            name: crate::limits::excerpt(s),
            known: format!("{}, or a grid such as 0,0.5,1", SCHEDULE_NAMES.join(", ")),
        })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Uniform => f.write_str("uniform"),
            Schedule::Shift(s) => write!(f, "shift:{s}"),
            Schedule::Cosine => f.write_str("cosine"),
            Schedule::Custom(g) => write!(f, "custom({} steps)", g.len().saturating_sub(1)),
        }
    }
}

impl Schedule {
    /// Checks the parameters: a positive finite shift; a custom grid increasing from 0 to 1.
    pub fn validate(&self) -> Result<()> {
        match self {
            Schedule::Shift(s) if !(s.is_finite() && *s > 0.0) => Err(Error::invalid(
                "schedule shift",
                s,
                "a finite number greater than 0",
            )),
            Schedule::Custom(g) => {
                if g.len() < 2 {
                    return Err(Error::invalid(
                        "time grid",
                        crate::limits::excerpt_list(g),
                        "at least two times, from 0 to 1",
                    ));
                }
                if g[0] != 0.0 || g[g.len() - 1] != 1.0 {
                    return Err(Error::invalid(
                        "time grid",
                        crate::limits::excerpt_list(g),
                        "a grid that starts at 0 and ends at 1",
                    ));
                }
                if g.windows(2)
                    .any(|w| w[1].partial_cmp(&w[0]) != Some(std::cmp::Ordering::Greater))
                {
                    return Err(Error::invalid(
                        "time grid",
                        crate::limits::excerpt_list(g),
                        "strictly increasing times",
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The grid of `steps + 1` times from 0 to 1, rounded to `dtype`'s precision (f32 for the
    /// half types), as a vector. A custom grid ignores `steps`. Solvers take the unstored
    /// [`TimeGrid`] of [`Schedule::time_grid`] instead, which long runs need.
    ///
    /// ```
    /// use flow_matching::Schedule;
    /// let g = Schedule::Uniform.grid(4, candle_core::DType::F32).unwrap();
    /// assert_eq!(g, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    /// ```
    pub fn grid(&self, steps: usize, dtype: DType) -> Result<Vec<f64>> {
        // A stored grid is 8 bytes a time: refuse one that cannot fit rather than abort.
        if !matches!(self, Schedule::Custom(_)) {
            crate::limits::check_memory(
                &format!("the time grid of {steps} steps"),
                steps
                    .checked_add(1)
                    .and_then(|n| crate::limits::checked_bytes(&[n], 8)),
            )?;
        }
        Ok(self.time_grid(steps, dtype)?.to_vec())
    }

    /// The grid of `steps + 1` times from 0 to 1 in `dtype`'s precision, computed on demand
    /// (a billion-step run stores no 8 GB grid). Every time is checked once, in order, to be
    /// strictly increasing after rounding; a custom grid ignores `steps`.
    ///
    /// ```
    /// use flow_matching::Schedule;
    /// let g = Schedule::Uniform.time_grid(100_000_000, candle_core::DType::F64).unwrap();
    /// assert_eq!(g.len(), 100_000_001);
    /// assert_eq!((g.get(0), g.get(50_000_000), g.last()), (Some(0.0), Some(0.5), Some(1.0)));
    /// ```
    pub fn time_grid(&self, steps: usize, dtype: DType) -> Result<TimeGrid> {
        self.validate()?;
        let f64_times = dtype == DType::F64;
        let points = match self {
            Schedule::Custom(g) => {
                let round = |t: f64| if f64_times { t } else { t as f32 as f64 };
                Points::Stored(g.iter().map(|&t| round(t)).collect())
            }
            formula => {
                if steps == 0 {
                    return Err(Error::ZeroSteps);
                }
                // Beyond 2^24 steps a float32 grid's neighbouring times near t = 1 coincide
                // (its spacing there is 2^-24): refuse before any work.
                if !f64_times && steps > MAX_F32_STEPS {
                    return Err(Error::invalid(
                        "steps",
                        steps,
                        format!(
                            "at most {MAX_F32_STEPS} in {dtype:?} precision: beyond that, neighbouring times near t = 1 coincide"
                        ),
                    ));
                }
                if steps == usize::MAX {
                    return Err(Error::invalid("steps", steps, "fewer than 2^64 - 1"));
                }
                Points::Formula {
                    schedule: formula.clone(),
                    steps,
                    f64_times,
                }
            }
        };
        let grid = TimeGrid {
            points,
            reverse: false,
        };
        // Rounding can merge two close times (of a custom grid, or of a shifted grid at
        // many steps): one pass in order, storing nothing.
        if let Some((i, a, b)) = grid
            .windows()
            .enumerate()
            .find(|(_, (a, b))| b.partial_cmp(a) != Some(std::cmp::Ordering::Greater))
            .map(|(i, (a, b))| (i, a, b))
        {
            return Err(Error::invalid(
                "time grid",
                format!("{}: times {i} and {} are {a} and {b}", self, i + 1),
                format!("strictly increasing times in {dtype:?} precision"),
            ));
        }
        Ok(grid)
    }
}

/// A time grid whose times are computed when asked rather than stored: the uniform, shifted
/// and cosine grids by formula (bit for bit what [`Schedule::grid`] returns), a custom grid
/// from its points. It may run backwards ([`TimeGrid::reversed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TimeGrid {
    points: Points,
    reverse: bool,
}

/// Where a [`TimeGrid`]'s times come from.
#[derive(Debug, Clone, PartialEq)]
enum Points {
    Formula {
        schedule: Schedule,
        steps: usize,
        f64_times: bool,
    },
    Stored(Vec<f64>),
}

impl TimeGrid {
    /// The number of times (steps + 1).
    pub fn len(&self) -> usize {
        match &self.points {
            Points::Formula { steps, .. } => steps + 1,
            Points::Stored(v) => v.len(),
        }
    }

    /// Whether the grid holds no time at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of steps (intervals): `len() - 1`, or 0 for fewer than two times.
    pub fn steps(&self) -> usize {
        self.len().saturating_sub(1)
    }

    /// Time `i` (counted in the grid's direction), or `None` past the end.
    pub fn get(&self, i: usize) -> Option<f64> {
        let n = self.len();
        if i >= n {
            return None;
        }
        let j = if self.reverse { n - 1 - i } else { i };
        Some(match &self.points {
            Points::Stored(v) => v[j],
            Points::Formula {
                schedule,
                steps,
                f64_times,
            } => formula_time(schedule, j, *steps, *f64_times),
        })
    }

    /// The first time.
    pub fn first(&self) -> Option<f64> {
        self.get(0)
    }

    /// The last time.
    pub fn last(&self) -> Option<f64> {
        self.len().checked_sub(1).and_then(|i| self.get(i))
    }

    /// Every time, in order.
    pub fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        (0..self.len()).filter_map(move |i| self.get(i))
    }

    /// Every step's `(t0, t1)`, in order.
    pub fn windows(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        let mut prev = self.first();
        (1..self.len()).filter_map(move |i| {
            let t1 = self.get(i)?;
            let t0 = prev.replace(t1)?;
            Some((t0, t1))
        })
    }

    /// The same times in the opposite order (from 1 to 0 for a sampling grid).
    pub fn reversed(mut self) -> Self {
        self.reverse = !self.reverse;
        self
    }

    /// The times as a vector (for short grids and recorded runs).
    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = Vec::with_capacity(self.len());
        v.extend(self.iter());
        v
    }
}

impl From<Vec<f64>> for TimeGrid {
    /// A grid of these times as they are (no validation: solvers check their step count).
    fn from(times: Vec<f64>) -> Self {
        TimeGrid {
            points: Points::Stored(times),
            reverse: false,
        }
    }
}

impl From<&[f64]> for TimeGrid {
    /// A grid of these times as they are.
    fn from(times: &[f64]) -> Self {
        TimeGrid::from(times.to_vec())
    }
}

/// Time `i` of a formula grid of `steps` steps, rounded as [`Schedule::grid`] rounds it.
fn formula_time(schedule: &Schedule, i: usize, steps: usize, f64_times: bool) -> f64 {
    let u = linspace_at(i, steps, f64_times);
    let round = |t: f64| if f64_times { t } else { t as f32 as f64 };
    match schedule {
        // s = 1 is the identity map; skip it so the grid equals the uniform one bit for bit.
        Schedule::Shift(s) if *s != 1.0 => round(u / (u + s * (1.0 - u))),
        Schedule::Cosine => round(0.5 * (1.0 - (std::f64::consts::PI * u).cos())),
        _ => u,
    }
}

/// Element `i` of [`linspace`]`(steps, ..)` without building the rest.
fn linspace_at(i: usize, steps: usize, f64_times: bool) -> f64 {
    let half = steps.div_ceil(2);
    if f64_times {
        let step = 1.0 / steps as f64;
        if i < half {
            i as f64 * step
        } else {
            (-((steps - i) as f64)).mul_add(step, 1.0)
        }
    } else {
        let step = 1.0f32 / steps as f32;
        let v = if i < half {
            i as f32 * step
        } else {
            (-((steps - i) as f32)).mul_add(step, 1.0)
        };
        v as f64
    }
}

/// `torch.linspace(0, 1, steps + 1)` in the given precision, bit for bit: `i * step` for the
/// first half and `1 - (steps - i) * step` (fused) for the rest.
pub fn linspace(steps: usize, dtype: DType) -> Vec<f64> {
    (0..=steps)
        .map(|i| linspace_at(i, steps, dtype == DType::F64))
        .collect()
}
