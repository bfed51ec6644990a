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
    /// half types). A custom grid ignores `steps`.
    ///
    /// ```
    /// use flow_matching::Schedule;
    /// let g = Schedule::Uniform.grid(4, candle_core::DType::F32).unwrap();
    /// assert_eq!(g, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    /// ```
    pub fn grid(&self, steps: usize, dtype: DType) -> Result<Vec<f64>> {
        self.validate()?;
        if steps == 0 && !matches!(self, Schedule::Custom(_)) {
            return Err(Error::ZeroSteps);
        }
        // Beyond 2^24 steps a float32 grid's neighbouring times near t = 1 coincide (its
        // spacing there is 2^-24): refuse before building a grid that cannot be valid.
        if dtype != DType::F64 && steps > MAX_F32_STEPS && !matches!(self, Schedule::Custom(_)) {
            return Err(Error::invalid(
                "steps",
                steps,
                format!(
                    "at most {MAX_F32_STEPS} in {dtype:?} precision: beyond that, neighbouring times near t = 1 coincide"
                ),
            ));
        }
        // The grid is materialised (8 bytes a time, twice while mapped): refuse a step count
        // whose grid cannot fit rather than abort half way.
        if !matches!(self, Schedule::Custom(_)) {
            crate::limits::check_memory(
                &format!("the time grid of {steps} steps"),
                crate::limits::checked_bytes(&[steps, 2], 8).and_then(|b| b.checked_add(16)),
            )?;
        }
        let uniform = linspace(steps, dtype);
        let round = |t: f64| {
            if dtype == DType::F64 {
                t
            } else {
                t as f32 as f64
            }
        };
        let grid = match self {
            // s = 1 is the identity map; skip it so the grid equals the uniform one bit for bit.
            Schedule::Uniform => uniform,
            Schedule::Shift(s) if *s == 1.0 => uniform,
            Schedule::Shift(s) => uniform
                .iter()
                .map(|&t| round(t / (t + s * (1.0 - t))))
                .collect(),
            Schedule::Cosine => uniform
                .iter()
                .map(|&u| round(0.5 * (1.0 - (std::f64::consts::PI * u).cos())))
                .collect(),
            Schedule::Custom(g) => g.iter().map(|&t| round(t)).collect(),
        };
        // Rounding to f32 can merge two close times of a custom grid into one.
        if let Some(w) = grid
            .windows(2)
            .find(|w| w[1].partial_cmp(&w[0]) != Some(std::cmp::Ordering::Greater))
        {
            return Err(Error::invalid(
                "time grid",
                crate::limits::excerpt_list(&grid),
                format!(
                    "strictly increasing times in {dtype:?} precision ({} and {} coincide)",
                    w[0], w[1]
                ),
            ));
        }
        Ok(grid)
    }
}

/// `torch.linspace(0, 1, steps + 1)` in the given precision, bit for bit: `i * step` for the
/// first half and `1 - (steps - i) * step` (fused) for the rest.
pub fn linspace(steps: usize, dtype: DType) -> Vec<f64> {
    let n = steps + 1;
    let half = n / 2;
    if dtype == DType::F64 {
        let step = 1.0 / steps as f64;
        (0..n)
            .map(|i| {
                if i < half {
                    i as f64 * step
                } else {
                    (-((steps - i) as f64)).mul_add(step, 1.0)
                }
            })
            .collect()
    } else {
        let step = 1.0f32 / steps as f32;
        (0..n)
            .map(|i| {
                let v = if i < half {
                    i as f32 * step
                } else {
                    (-((steps - i) as f32)).mul_add(step, 1.0)
                };
                v as f64
            })
            .collect()
    }
}
