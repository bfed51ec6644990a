//! Bounds on what a file or a flag may make the program allocate, and short quotes of values.
//!
//! Every size read from a file or a flag goes through checked arithmetic ([`checked_bytes`])
//! and, before anything large is allocated, through [`check_memory`], which refuses a request
//! above the memory the machine has free, naming both figures.

use std::path::Path;

pub use crate::describe::{
    excerpt, excerpt_path, excerpt_text, human_bytes, EXCERPT_CHARS, TEXT_CHARS,
};
use crate::error::{Error, Result};

/// Environment variable that overrides the available-memory figure (bytes), for tests and
/// for users who want a lower ceiling than the machine's.
pub const MEMORY_LIMIT_ENV: &str = "FLOW_MATCHING_MEMORY_LIMIT";

/// The figure used when the platform does not say how much memory is free (4 GiB).
pub const FALLBACK_MEMORY: u64 = 4 << 30;

/// The memory a single run may ask for, in bytes: [`MEMORY_LIMIT_ENV`] when set, else the
/// smaller of Linux's `MemAvailable` and the cgroup limit, else [`FALLBACK_MEMORY`]. A value
/// of [`MEMORY_LIMIT_ENV`] that is not a number of bytes counts as unset here; [`memory_limit`]
/// (what every check uses) refuses it.
///
/// ```
/// assert!(flow_matching::limits::available_memory() > 0);
/// ```
pub fn available_memory() -> u64 {
    memory_limit().unwrap_or_else(|_| machine_memory())
}

/// [`available_memory`], refusing a [`MEMORY_LIMIT_ENV`] that is set but not a whole number
/// of bytes: a typo there must not silently lift the ceiling the user meant to set.
pub fn memory_limit() -> Result<u64> {
    match std::env::var(MEMORY_LIMIT_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(machine_memory()),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::invalid(
            MEMORY_LIMIT_ENV,
            excerpt(&v.to_string_lossy()),
            "a whole number of bytes, such as 2147483648",
        )),
        Ok(v) => v.trim().parse::<u64>().map(|v| v.max(1)).map_err(|_| {
            Error::invalid(
                MEMORY_LIMIT_ENV,
                format!("{:?}", excerpt(&v)),
                "a whole number of bytes, such as 2147483648",
            )
        }),
    }
}

/// The machine's figure: `MemAvailable`, capped by the cgroup limit.
fn machine_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo(&s));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => FALLBACK_MEMORY,
    }
}

/// `MemAvailable` (bytes) from the text of `/proc/meminfo`.
fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The bytes of `elem_bytes`-byte elements in a buffer of shape `dims`; `None` on overflow.
///
/// ```
/// use flow_matching::limits::checked_bytes;
/// assert_eq!(checked_bytes(&[3, 4], 4), Some(48));
/// assert_eq!(checked_bytes(&[usize::MAX, 2], 4), None);
/// ```
pub fn checked_bytes(dims: &[usize], elem_bytes: usize) -> Option<u64> {
    dims.iter()
        .try_fold(elem_bytes as u64, |acc, &d| acc.checked_mul(d as u64))
}

/// The sum of several byte counts; `None` when any is `None` or the sum overflows.
pub fn checked_sum(parts: &[Option<u64>]) -> Option<u64> {
    parts
        .iter()
        .try_fold(0u64, |acc, p| p.and_then(|p| acc.checked_add(p)))
}

/// Refuses a request of `bytes` (`None`: it overflowed 64 bits) that exceeds
/// [`available_memory`]; `what` names the buffers and the flag or file behind them.
///
/// ```
/// use flow_matching::limits::check_memory;
/// assert!(check_memory("a small buffer", Some(1024)).is_ok());
/// let e = check_memory("--batch 10^18 samples", None).unwrap_err().to_string();
/// assert!(e.contains("--batch"), "{e}");
/// ```
pub fn check_memory(what: &str, bytes: Option<u64>) -> Result<()> {
    let available = memory_limit()?;
    match bytes {
        Some(b) if b <= available => Ok(()),
        needed => Err(Error::TooLarge {
            what: what.to_string(),
            needed,
            available,
        }),
    }
}

/// A debug-style excerpt of a list of numbers (a time grid, a shape), as [`excerpt`].
pub fn excerpt_list<T: std::fmt::Debug>(values: &[T]) -> String {
    const SHOWN: usize = 8;
    if values.len() <= SHOWN {
        return format!("{values:?}");
    }
    let head: Vec<String> = values[..SHOWN / 2]
        .iter()
        .map(|v| format!("{v:?}"))
        .collect();
    let tail: Vec<String> = values[values.len() - SHOWN / 2..]
        .iter()
        .map(|v| format!("{v:?}"))
        .collect();
    format!(
        "[{}, … {} more …, {}] ({} values)",
        head.join(", "),
        values.len() - SHOWN,
        tail.join(", "),
        values.len()
    )
}

/// The length of a regular file, refusing devices, pipes and directories: reading
/// `/dev/zero` as a model or data file would never end.
pub fn input_len(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{}: expected a regular file",
                    crate::describe::file_kind(&meta)
                ),
            ),
        ));
    }
    Ok(meta.len())
}

/// Reads a whole regular input file, never more bytes than its length when opened (a file
/// that grows while read is cut there).
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let len = input_len(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let cap = usize::try_from(len).map_err(|_| {
        Error::io(
            path,
            std::io::Error::other("file larger than this platform's address space"),
        )
    })?;
    check_memory(&format!("reading {}", path.display()), Some(len))?;
    let mut bytes = Vec::with_capacity(cap);
    file.take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       16000000 kB\nMemAvailable:    1000 kB\n";
        assert_eq!(parse_meminfo(text), Some(1_024_000));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn excerpt_cuts_on_char_boundaries() {
        let s = "é".repeat(200);
        let e = excerpt(&s);
        assert!(e.starts_with(&"é".repeat(EXCERPT_CHARS)));
        assert!(e.contains("200 characters"));
        assert_eq!(excerpt_list(&[1, 2, 3]), "[1, 2, 3]");
        let long: Vec<usize> = (0..100).collect();
        assert_eq!(
            excerpt_list(&long),
            "[0, 1, 2, 3, … 92 more …, 96, 97, 98, 99] (100 values)"
        );
    }
}
