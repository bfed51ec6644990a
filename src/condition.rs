//! Conditions for conditional sampling: one row per sample, one row shared by all samples,
//! or K samples drawn for each condition row.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::limits::{check_memory, checked_bytes};

/// Refuses to materialise a condition of `shape` beyond the memory limit: the rows a flag asks
/// for (`--per-cond 2^40`) must be an error, not an abort inside the allocator.
fn check_rows(what: &str, shape: &[usize], cond: &Tensor) -> Result<()> {
    check_memory(
        &format!(
            "{what} repeated to {} rows",
            shape.first().copied().unwrap_or(0)
        ),
        checked_bytes(shape, cond.dtype().size_in_bytes()),
    )
}

/// A condition `[1, ...]` repeated to `[batch, ...]`; one of `[batch, ...]` is returned as is.
/// `what` names the condition (a flag or a file) in the error for any other first dimension.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::condition::expand_rows;
/// let one = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// assert_eq!(expand_rows(&one, 3, "--cond")?.dims(), &[3, 2]);
/// assert!(expand_rows(&Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?, 3, "--cond").is_err());
/// # Ok::<(), flow_matching::Error>(())
/// ```
pub fn expand_rows(cond: &Tensor, batch: usize, what: &str) -> Result<Tensor> {
    let dims = cond.dims();
    match dims.first() {
        Some(&n) if n == batch => Ok(cond.clone()),
        Some(1) => {
            let mut shape = dims.to_vec();
            shape[0] = batch;
            check_rows(what, &shape, cond)?;
            Ok(cond.broadcast_as(shape)?.contiguous()?)
        }
        _ => Err(Error::Shape {
            what: what.to_string(),
            expected: format!("[{batch}, ...] (one row per sample) or [1, ...] (one row for all)"),
            got: dims.to_vec(),
        }),
    }
}

/// `[N, ...]` → `[N * k, ...]`, condition-major: row `n * k + j` is `cond[n]`, so K samples are
/// drawn for each condition row.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::condition::repeat_per_cond;
/// let c = Tensor::new(&[[1f32], [2.0]], &Device::Cpu)?;
/// let r = repeat_per_cond(&c, 3)?;
/// assert_eq!(r.flatten_all()?.to_vec1::<f32>()?, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
/// # Ok::<(), flow_matching::Error>(())
/// ```
pub fn repeat_per_cond(cond: &Tensor, k: usize) -> Result<Tensor> {
    if k == 0 {
        return Err(Error::invalid(
            "--per-cond",
            0,
            "at least 1 sample per condition",
        ));
    }
    let dims = cond.dims();
    let n = *dims.first().ok_or_else(|| Error::Shape {
        what: "condition".into(),
        expected: "[N, ...] with a row per condition".into(),
        got: Vec::new(),
    })?;
    let rows = n.checked_mul(k).ok_or_else(|| {
        Error::invalid(
            "--per-cond",
            k,
            format!("a count whose product with {n} rows fits in memory"),
        )
    })?;
    let mut expanded = vec![n, k];
    expanded.extend_from_slice(&dims[1..]);
    let mut out = vec![rows];
    out.extend_from_slice(&dims[1..]);
    check_rows(&format!("condition with --per-cond {k}"), &out, cond)?;
    Ok(cond
        .unsqueeze(1)?
        .broadcast_as(expanded)?
        .contiguous()?
        .reshape(out)?)
}
