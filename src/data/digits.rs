//! The 8×8 handwritten digits (UCI optdigits test set, as shipped by scikit-learn), embedded.

use std::io::Read;
use std::path::Path;

use super::file::parse_csv_text;
use super::Dataset;
use crate::error::{Error, Result};

/// The gzip-compressed CSV (1797 rows of 64 pixels in 0..=16 and a label); see data/README.md.
static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// Number of images.
pub const DIGITS_ROWS: usize = 1797;

/// Loads the digits: x `[1797, 64]` in [-1, 1] (`pixel / 8 - 1`, row-major 8×8, top row first),
/// labels 0..=9, 10 classes.
///
/// ```
/// let d = flow_matching::data::digits().unwrap();
/// assert_eq!((d.len(), d.x_dims(), d.num_classes), (1797, &[64][..], 10));
/// ```
pub fn digits() -> Result<Dataset> {
    let name = Path::new("digits.csv.gz (embedded)");
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::DataFile {
            path: name.to_path_buf(),
            reason: format!("cannot decompress: {e}"),
        })?;
    let raw = parse_csv_text(&text, name, Some(64))?;
    let x = ((raw.x / 8.0)? - 1.0)?;
    Dataset::new(x, raw.labels, raw.num_classes)
}
