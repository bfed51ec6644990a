//! Bounds on the numeric flags: every count is at least 1 and the buffers it asks for,
//! computed with checked arithmetic, fit in the memory available
//! ([`flow_matching::limits::available_memory`]), so a flag can neither wrap a size nor abort
//! the process half way through a run.
//!
//! Reusable by every subcommand: [`at_least_one`], [`memory`], [`floats`] and
//! [`non_negative`]; outputs go through [`flow_matching::output::prepare_outputs`].

use flow_matching::limits::{check_memory, checked_bytes, checked_sum};
use flow_matching::model::TransformerConfig;
use flow_matching::{Error, Result, VelocityMlpConfig};

/// Refuses a count of zero for `flag`.
pub fn at_least_one(flag: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::invalid(flag, 0, "at least 1"));
    }
    Ok(())
}

/// Refuses a negative or non-finite value for `flag` (`what_zero_means` goes in the message).
pub fn non_negative(flag: &'static str, value: f64, what_zero_means: &str) -> Result<()> {
    if !(value >= 0.0 && value.is_finite()) {
        return Err(Error::invalid(
            flag,
            value,
            format!("a finite number >= 0 ({what_zero_means})"),
        ));
    }
    Ok(())
}

/// The bytes of `count` float32 values whose count is the product of `dims` (checked).
pub fn floats(dims: &[usize]) -> Option<u64> {
    checked_bytes(dims, 4)
}

/// Refuses buffers of `bytes` (the sum of the parts, checked) above the available memory;
/// `what` names the flags behind them with their values.
pub fn memory(what: String, parts: &[Option<u64>]) -> Result<()> {
    check_memory(&what, checked_sum(parts))
}

/// The memory a training run needs beyond its data: six copies of the weights (weights,
/// gradients, two AdamW moments, the EMA and the checkpoint being written), the batch's
/// activations, and the loss history.
pub fn training(config: &VelocityMlpConfig, batch: usize, steps: usize) -> Result<()> {
    let params = config.num_params();
    let d = config.x_dims.numel();
    // Per row: the input, two buffers per hidden layer (pre- and post-activation) for the
    // backward pass and four of the sample's size (x0, x1, noisy x, target).
    let per_row = params.and_then(|_| {
        config
            .hidden
            .checked_mul(config.depth.checked_mul(2)?)?
            .checked_add(d.checked_mul(4)?)?
            .checked_add(config.num_freqs.checked_mul(2)?)?
            .checked_add(d)
    });
    memory(
        format!(
            "training with --batch {batch}, --hidden {}, --depth {}, --freqs {}, --steps {steps}",
            config.hidden, config.depth, config.num_freqs
        ),
        &[
            params.and_then(|p| floats(&[p, 6])),
            per_row.and_then(|r| floats(&[r, batch, 2])),
            checked_bytes(&[steps], 24),
        ],
    )
}

/// [`training`] for the waypoint transformer: six copies of the weights, and per row of the
/// batch the activations the backward pass keeps (per token and block: about 12 vectors of
/// the width, two of the MLP's hidden width and the attention weights of every head), twice.
pub fn training_transformer(config: &TransformerConfig, batch: usize, steps: usize) -> Result<()> {
    let params = config
        .expected_shapes()
        .iter()
        .try_fold(0usize, |acc, (_, s)| {
            acc.checked_add(s.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?)
        });
    let (l, w) = (config.len(), config.width);
    let per_row = (|| {
        let per_token = w
            .checked_mul(12)?
            .checked_add(config.mlp_hidden.checked_mul(2)?)?
            .checked_add(config.heads.checked_mul(l)?)?;
        l.checked_mul(per_token.checked_mul(config.depth)?)?
            .checked_add(l.checked_mul(config.channels().checked_mul(config.per_value())?)?)
    })();
    memory(
        format!(
            "training the transformer with --batch {batch}, --width {w}, --depth {}, --heads {}, --mlp-hidden {}, --freqs {}, --steps {steps}",
            config.depth, config.heads, config.mlp_hidden, config.num_freqs
        ),
        &[
            params.and_then(|p| floats(&[p, 6])),
            per_row.and_then(|r| floats(&[r, batch, 2])),
            checked_bytes(&[steps], 24),
        ],
    )
}

/// The batch a sampling command's flags imply, in checked arithmetic, before anything is
/// expanded to it (every subcommand and model kind uses this one rule, as `--help` states it):
/// the rows of `--x-init` when given; else the condition rows N (1 when every condition has
/// one row) times `--per-cond K`; else N when a condition has N > 1 rows; else `--batch`, to
/// which a one-row condition is broadcast.
pub fn implied_batch(
    batch: usize,
    x_init_rows: Option<usize>,
    cond_rows: Option<usize>,
    per_cond: Option<usize>,
) -> Result<usize> {
    if let Some(k) = per_cond {
        at_least_one("--per-cond", k)?;
    }
    let n = cond_rows.unwrap_or(1);
    let b = match (x_init_rows, per_cond, cond_rows) {
        (Some(b), _, _) => b,
        (None, Some(k), _) => n.checked_mul(k).ok_or_else(|| Error::TooLarge {
            what: format!("sampling --per-cond {k} samples for each of {n} condition rows"),
            needed: None,
            available: flow_matching::limits::available_memory(),
        })?,
        (None, None, Some(r)) if r > 1 => r,
        (None, None, _) => {
            at_least_one("--batch", batch)?;
            batch
        }
    };
    at_least_one("--x-init rows", b)?;
    Ok(b)
}

/// [`sampling`] with the condition expanded to the batch: `cond_values` numbers per sample
/// (0 without a condition, counted twice: the file's rows expanded and the model's copy), and
/// `--per-cond K` named in the message when given.
pub fn sampling_with_cond(
    batch: usize,
    d: usize,
    cond_values: usize,
    per_cond: Option<usize>,
    steps: usize,
    trajectory: bool,
) -> Result<()> {
    // The command line samples in float32, whose grids stop at 2^24 steps.
    if steps > flow_matching::schedule::MAX_F32_STEPS {
        return Err(Error::invalid(
            "--steps",
            steps,
            format!(
                "at most {} (float32 sampling: beyond that, neighbouring times near t = 1 coincide)",
                flow_matching::schedule::MAX_F32_STEPS
            ),
        ));
    }
    let states = steps.checked_add(1);
    memory(
        format!(
            "sampling --batch {batch}{} samples of {d} values{} with --steps {steps}{}",
            per_cond.map_or(String::new(), |k| format!(" (--per-cond {k})")),
            if cond_values > 0 {
                format!(" and a condition of {cond_values} values each")
            } else {
                String::new()
            },
            if trajectory { " and --trajectory" } else { "" }
        ),
        &[
            floats(&[batch, d, 10]),
            floats(&[batch, cond_values, 2]),
            if trajectory {
                states.and_then(|s| floats(&[batch, s, d, 2]))
            } else {
                Some(0)
            },
        ],
    )
}

/// The memory sampling needs: the state and the solver's stages (up to 7 for dopri5) for
/// `batch` samples of `d` values, the trajectory `[batch, steps + 1, d]` twice (the tensor
/// and the file being written) when asked for (the time grid is computed, not stored).
pub fn sampling(batch: usize, d: usize, steps: usize, trajectory: bool) -> Result<()> {
    sampling_with_cond(batch, d, 0, None, steps, trajectory)
}

/// A wall-clock duration for `flag`: a number of seconds, or parts with units `h`, `m`, `s`
/// (`90s`, `10m`, `1h30m`, `2.5m`); more than zero and at most a year.
pub fn duration(flag: &'static str, text: &str) -> Result<std::time::Duration> {
    let bad = || {
        Error::invalid(
            flag,
            text,
            "a duration such as 600, 90s, 10m or 1h30m (more than zero, at most a year)",
        )
    };
    let s = text.trim();
    let mut secs = 0.0f64;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        match c {
            '0'..='9' | '.' => num.push(c),
            'h' | 'm' | 's' => {
                let v: f64 = num.parse().map_err(|_| bad())?;
                secs += v * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                num.clear();
                any = true;
            }
            _ => return Err(bad()),
        }
    }
    if !num.is_empty() {
        // A bare number is seconds; after units it would be ambiguous ("1m30").
        if any {
            return Err(bad());
        }
        secs = num.parse().map_err(|_| bad())?;
    } else if !any {
        return Err(bad());
    }
    if !(secs > 0.0 && secs <= 365.0 * 86_400.0) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest_by_flag() {
        let d = |s| duration("--time-budget", s).map(|d| d.as_secs_f64());
        assert_eq!(d("600").unwrap(), 600.0);
        assert_eq!(d("10m").unwrap(), 600.0);
        assert_eq!(d("1h30m").unwrap(), 5400.0);
        assert_eq!(d("2.5m").unwrap(), 150.0);
        assert_eq!(d("90s").unwrap(), 90.0);
        for bad in [
            "",
            "0",
            "0s",
            "-5m",
            "10 minutes",
            "1m30",
            "m",
            "1..5s",
            "400d",
            "1e9",
        ] {
            let e = d(bad).unwrap_err().to_string();
            assert!(
                e.contains("--time-budget") && e.contains("a duration such as"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn bounds_refuse_wrapping_and_huge_requests() {
        assert!(sampling(16, 2, 10, true).is_ok());
        let e = sampling(1 << 63, 2, 10, false).unwrap_err().to_string();
        assert!(e.contains("--batch 9223372036854775808"), "{e}");
        assert!(e.contains("more than 2^64 bytes"), "{e}");
        assert!(sampling(4, 2, usize::MAX, true).is_err());
        assert!(non_negative("--clip", -1.0, "0: no clipping").is_err());
        assert!(non_negative("--clip", f64::NAN, "0: no clipping").is_err());
        assert!(at_least_one("--n", 0).is_err());
        assert_eq!(implied_batch(16, None, Some(1), None).unwrap(), 16);
        assert_eq!(implied_batch(16, None, Some(3), Some(2)).unwrap(), 6);
        assert_eq!(implied_batch(16, Some(5), Some(1), None).unwrap(), 5);
        let e = implied_batch(16, None, Some(4), Some(usize::MAX)).unwrap_err();
        assert!(e.to_string().contains("--per-cond"), "{e}");
    }
}
