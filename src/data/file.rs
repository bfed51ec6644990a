//! User data files: CSV text and NumPy `.npy` arrays, with an optional label column.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::Dataset;
use crate::error::{Error, Result};

/// The largest class label a file may hold; guards against a non-label column making a
/// model with millions of classes.
pub const MAX_LABEL: u32 = 9_999;

/// The first bytes of every `.npy` file.
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Loads a data file: `.npy` when it starts with the NumPy magic bytes, CSV otherwise.
///
/// `label_column` (0-based) names a column of non-negative integer class labels, taken out of
/// x; `num_classes` is then the largest label + 1.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("fm-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("points.csv");
/// std::fs::write(&path, "x,y,class\n0.5,1.0,0\n-1,2,1\n").unwrap();
/// let d = flow_matching::data::load_file(&path, Some(2)).unwrap();
/// assert_eq!((d.len(), d.x_dims(), d.num_classes), (2, &[2][..], 2));
/// assert_eq!(d.labels, Some(vec![0, 1]));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn load_file(path: impl AsRef<Path>, label_column: Option<usize>) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.starts_with(NPY_MAGIC) {
        return load_npy(path, label_column);
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        data_err(
            path,
            format!(
                "not UTF-8 text (byte {}): expected a CSV file of numbers or a .npy array",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let raw = parse_csv_text(&text, path, label_column)?;
    Dataset::new(raw.x, raw.labels, raw.num_classes)
}

/// Loads a CSV file of numbers: comma-separated, one sample per line, all lines with the same
/// number of values. A first line that does not parse as numbers is taken as a header and
/// skipped; blank lines are skipped. See [`load_file`] for `label_column`.
pub fn load_csv(path: impl AsRef<Path>, label_column: Option<usize>) -> Result<Dataset> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let raw = parse_csv_text(&text, path, label_column)?;
    Dataset::new(raw.x, raw.labels, raw.num_classes)
}

/// Loads a 2-D `.npy` array `[rows, columns]` (f32, f64 or integers; C order). See
/// [`load_file`] for `label_column`.
pub fn load_npy(path: impl AsRef<Path>, label_column: Option<usize>) -> Result<Dataset> {
    let path = path.as_ref();
    let t = crate::io::read_npy(path, &Device::Cpu)?;
    let (rows, cols) = match *t.dims() {
        [r, c] => (r, c),
        ref other => {
            return Err(data_err(
                path,
                format!("expected a 2-D array [rows, columns], found shape {other:?}"),
            ))
        }
    };
    if rows == 0 || cols == 0 {
        return Err(data_err(
            path,
            format!("empty array of shape [{rows}, {cols}]: expected at least one row and column"),
        ));
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let mut table = Table::new(path, cols, label_column)?;
    for (r, row) in values.chunks(cols).enumerate() {
        let at = |c: usize| format!("row {}, column {}", r + 1, c + 1);
        for (c, &v) in row.iter().enumerate() {
            if Some(c) == label_column {
                table.push_label(v as f64, &v.to_string(), &at(c))?;
            } else if !v.is_finite() {
                return Err(data_err(
                    path,
                    format!("{}: expected a finite number, found {v}", at(c)),
                ));
            } else {
                table.x.push(v);
            }
        }
    }
    let raw = table.finish(rows)?;
    Dataset::new(raw.x, raw.labels, raw.num_classes)
}

/// Features and labels read from a file, before they become a [`Dataset`].
pub(crate) struct RawData {
    pub x: Tensor,
    pub labels: Option<Vec<u32>>,
    pub num_classes: usize,
}

/// Parses CSV text (see [`load_csv`]); `path` only names the source in errors.
pub(crate) fn parse_csv_text(
    text: &str,
    path: &Path,
    label_column: Option<usize>,
) -> Result<RawData> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .peekable();
    let Some(&(first_no, first)) = lines.peek() else {
        return Err(data_err(
            path,
            "empty file: expected lines of comma-separated numbers",
        ));
    };
    let header = first.split(',').any(|f| f.trim().parse::<f64>().is_err());
    if header {
        lines.next();
    }
    let Some(&(cols_from, data_first)) = lines.peek() else {
        return Err(data_err(
            path,
            format!("no data: line {first_no} looks like a header and no lines of numbers follow"),
        ));
    };
    let cols = data_first.split(',').count();
    let mut table = Table::new(path, cols, label_column)?;
    let mut rows = 0;
    for (no, line) in lines {
        let n = line.split(',').count();
        if n != cols {
            return Err(data_err(
                path,
                format!(
                    "line {no}: expected {cols} comma-separated values (as on line {cols_from}), found {n}"
                ),
            ));
        }
        for (c, field) in line.split(',').enumerate() {
            let field = field.trim();
            let at = format!("line {no}, column {}", c + 1);
            let v: f64 = field
                .parse()
                .map_err(|_| data_err(path, format!("{at}: expected a number, found {field:?}")))?;
            if Some(c) == label_column {
                table.push_label(v, field, &at)?;
                continue;
            }
            let v32 = v as f32;
            if !v32.is_finite() {
                return Err(data_err(
                    path,
                    format!("{at}: expected a finite number (within f32 range), found {field:?}"),
                ));
            }
            table.x.push(v32);
        }
        rows += 1;
    }
    table.finish(rows)
}

/// Accumulates the values of a table, splitting off the label column.
struct Table<'a> {
    path: &'a Path,
    cols: usize,
    labelled: bool,
    x: Vec<f32>,
    labels: Vec<u32>,
}

impl<'a> Table<'a> {
    fn new(path: &'a Path, cols: usize, label_column: Option<usize>) -> Result<Self> {
        if let Some(lc) = label_column {
            if lc >= cols {
                return Err(data_err(
                    path,
                    format!(
                        "label column {lc} (0-based) does not exist: rows have {cols} columns (0 to {})",
                        cols - 1
                    ),
                ));
            }
            if cols == 1 {
                return Err(data_err(
                    path,
                    "label column 0 is the only column: expected at least one feature column besides the labels",
                ));
            }
        }
        Ok(Table {
            path,
            cols,
            labelled: label_column.is_some(),
            x: Vec::new(),
            labels: Vec::new(),
        })
    }

    fn push_label(&mut self, v: f64, text: &str, at: &str) -> Result<()> {
        if !(v >= 0.0 && v.fract() == 0.0 && v <= MAX_LABEL as f64) {
            return Err(data_err(
                self.path,
                format!(
                    "{at} (label column): expected a class label, an integer from 0 to {MAX_LABEL}, found {text:?}"
                ),
            ));
        }
        self.labels.push(v as u32);
        Ok(())
    }

    fn finish(self, rows: usize) -> Result<RawData> {
        let d = self.cols - usize::from(self.labelled);
        let x = Tensor::from_vec(self.x, (rows, d), &Device::Cpu)?.to_dtype(DType::F32)?;
        if !self.labelled {
            return Ok(RawData {
                x,
                labels: None,
                num_classes: 0,
            });
        }
        let num_classes = self.labels.iter().max().map_or(0, |&m| m as usize + 1);
        Ok(RawData {
            x,
            labels: Some(self.labels),
            num_classes,
        })
    }
}

fn data_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::DataFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}
