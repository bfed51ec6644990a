//! User data files: CSV text and NumPy `.npy` arrays, with an optional label column.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::Dataset;
use crate::error::{Error, Result};

/// The largest class label a file may hold; guards against a non-label column making a
/// model with millions of classes.
pub const MAX_LABEL: u32 = 9_999;

use crate::io::NPY_MAGIC;

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
    let bytes = crate::limits::read_input(path)?;
    if bytes.starts_with(NPY_MAGIC) {
        return npy_table(&bytes, path, label_column);
    }
    let raw = parse_csv_bytes(&bytes, path, label_column)?;
    Dataset::new(raw.x, raw.labels, raw.num_classes)
}

/// Loads a CSV file of numbers (RFC 4180 through the `csv` crate: quoted fields, CRLF line
/// ends and a UTF-8 byte-order mark are accepted), one sample per line, all lines with the
/// same number of values. A first line that does not parse as numbers is taken as a header
/// and skipped; blank lines are skipped. See [`load_file`] for `label_column`.
pub fn load_csv(path: impl AsRef<Path>, label_column: Option<usize>) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = crate::limits::read_input(path)?;
    let raw = parse_csv_bytes(&bytes, path, label_column)?;
    Dataset::new(raw.x, raw.labels, raw.num_classes)
}

/// Loads a 2-D `.npy` array `[rows, columns]` (f32, f64 or integers; C order). See
/// [`load_file`] for `label_column`.
pub fn load_npy(path: impl AsRef<Path>, label_column: Option<usize>) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = crate::limits::read_input(path)?;
    npy_table(&bytes, path, label_column)
}

/// A dataset from the bytes of a `.npy` file (see [`load_npy`]).
fn npy_table(bytes: &[u8], path: &Path, label_column: Option<usize>) -> Result<Dataset> {
    let (shape, values) = crate::io::decode_npy(bytes)
        .map_err(|reason| data_err(path, format!("not a readable .npy array: {reason}")))?;
    let (rows, cols) = match *shape.as_slice() {
        [r, c] => (r, c),
        // Samples with a shape of their own ([N, 64, 2] futures): no label column there.
        [r, ref rest @ ..] if rest.len() >= 2 && label_column.is_none() && r > 0 && !rest.contains(&0) => {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                let d: usize = rest.iter().product();
                return Err(data_err(
                    path,
                    format!(
                        "row {}, element {}: expected a finite number, found {}",
                        i / d + 1,
                        i % d + 1,
                        values[i]
                    ),
                ));
            }
            let x = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?;
            return Dataset::new(x, None, 0);
        }
        ref other => {
            return Err(data_err(
                path,
                format!(
                    "expected a 2-D array [rows, columns] (or [rows, *x_dims] without a label column), found shape {}",
                    crate::limits::excerpt_list(other)
                ),
            ))
        }
    };
    if rows == 0 || cols == 0 {
        return Err(data_err(
            path,
            format!("empty array of shape [{rows}, {cols}]: expected at least one row and column"),
        ));
    }
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
    parse_csv_bytes(text.as_bytes(), path, label_column)
}

/// The UTF-8 byte-order mark some editors put first.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses the bytes of a CSV file (see [`load_csv`]) into a table of features and labels;
/// `path` only names the source in errors. Memory: the values, never more than about twice
/// the bytes given (each number takes at least two bytes: a digit and a separator).
///
/// ```
/// use std::path::Path;
/// let t = flow_matching::data::parse_csv(b"\xEF\xBB\xBF1,2\r\n\"3\",4\r\n", Path::new("x.csv"), None).unwrap();
/// assert_eq!(t.x.dims(), &[2, 2]); // the BOM does not hide the first row
/// ```
pub fn parse_csv(bytes: &[u8], path: &Path, label_column: Option<usize>) -> Result<Dataset> {
    let raw = parse_csv_bytes(bytes, path, label_column)?;
    Dataset::new(raw.x, raw.labels, raw.num_classes)
}

pub(crate) fn parse_csv_bytes(
    bytes: &[u8],
    path: &Path,
    label_column: Option<usize>,
) -> Result<RawData> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut record = csv::ByteRecord::new();
    let mut header_line: Option<u64> = None;
    let mut first: Option<(u64, usize)> = None;
    let mut table: Option<Table> = None;
    let mut rows = 0usize;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let at = e
                    .position()
                    .map(|p| format!("line {}: ", p.line()))
                    .unwrap_or_default();
                return Err(data_err(path, format!("{at}not valid CSV ({e})")));
            }
        }
        let no = record.position().map_or(0, |p| p.line());
        // A line of spaces reads as one empty field: blank, like an empty line.
        if record.len() == 1 && record[0].is_empty() {
            continue;
        }
        let Some(&(cols_from, cols)) = first.as_ref() else {
            let numeric = record.iter().all(|f| parse_field(f).is_some());
            if !numeric && header_line.is_none() {
                header_line = Some(no);
                continue;
            }
            first = Some((no, record.len()));
            table = Some(Table::new(path, record.len(), label_column)?);
            // Fall through to read this first data line with the table just made.
            push_row(table.as_mut(), &record, no, path, label_column)?;
            rows += 1;
            continue;
        };
        if record.len() != cols {
            return Err(data_err(
                path,
                format!(
                    "line {no}: expected {cols} comma-separated values (as on line {cols_from}), found {}",
                    record.len()
                ),
            ));
        }
        push_row(table.as_mut(), &record, no, path, label_column)?;
        rows += 1;
    }
    match table {
        Some(t) => t.finish(rows),
        None => Err(data_err(
            path,
            match header_line {
                Some(h) => {
                    format!("no data: line {h} looks like a header and no lines of numbers follow")
                }
                None => "empty file: expected lines of comma-separated numbers".to_string(),
            },
        )),
    }
}

/// A CSV field as a number (`None` when it is not UTF-8 or not a number).
fn parse_field(f: &[u8]) -> Option<f64> {
    std::str::from_utf8(f).ok()?.parse().ok()
}

/// Reads one data line into the table.
fn push_row(
    table: Option<&mut Table>,
    record: &csv::ByteRecord,
    no: u64,
    path: &Path,
    label_column: Option<usize>,
) -> Result<()> {
    let Some(table) = table else {
        return Ok(());
    };
    for (c, field) in record.iter().enumerate() {
        let at = || format!("line {no}, column {}", c + 1);
        let v = parse_field(field).ok_or_else(|| {
            data_err(
                path,
                format!(
                    "{}: expected a number, found {:?}",
                    at(),
                    crate::limits::excerpt(&String::from_utf8_lossy(field))
                ),
            )
        })?;
        let text = || crate::limits::excerpt(&String::from_utf8_lossy(field));
        if Some(c) == label_column {
            table.push_label(v, &text(), &at())?;
            continue;
        }
        let v32 = v as f32;
        if !v32.is_finite() {
            return Err(data_err(
                path,
                format!(
                    "{}: expected a finite number (within f32 range), found {:?}",
                    at(),
                    text()
                ),
            ));
        }
        table.x.push(v32);
    }
    Ok(())
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
