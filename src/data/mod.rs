//! Training data: 2-D toys drawn fresh each step, the embedded 8×8 digits, and user files.
//!
//! [`DataSource`] parses a dataset name or file path; [`DataSource::load`] gives a
//! [`Dataset`] (a fixed table of samples, with class labels where the source has them), and
//! [`DataSource::draw_batch`] draws a fresh batch from a toy, so training on a toy sees new
//! data every step. Labels are carried whenever a source has them (`moons`, `digits`, files
//! with a label column); whether to train a class-conditional model is the caller's choice.

mod digits;
mod file;
mod toy;

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

pub use digits::{digits, DIGITS_ROWS};
pub use file::{load_csv, load_file, load_npy, parse_csv, MAX_LABEL};
pub use toy::Toy;

/// A table of samples `x` `[N, *x_dims]` (f32), with optional class labels.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The samples, `[N, *x_dims]`, f32.
    pub x: Tensor,
    /// One class label per sample, each below `num_classes`; `None` when unlabelled.
    pub labels: Option<Vec<u32>>,
    /// The number of classes (0 when unlabelled).
    pub num_classes: usize,
}

/// A batch of samples `[B, *x_dims]` with their labels (when the data has labels).
pub type Batch = (Tensor, Option<Vec<u32>>);

impl Dataset {
    /// Checks and wraps a table: x is `[N, *x_dims]` with N ≥ 1 and no zero dimension, labels
    /// (if any) number N and are all below `num_classes`, and `num_classes` is 0 without labels.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::data::Dataset;
    /// let x = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    /// let d = Dataset::new(x, Some(vec![0, 1, 1]), 2).unwrap();
    /// assert_eq!((d.len(), d.x_dims()), (3, &[2][..]));
    /// ```
    pub fn new(x: Tensor, labels: Option<Vec<u32>>, num_classes: usize) -> Result<Self> {
        let dims = x.dims();
        if dims.len() < 2 || dims.contains(&0) {
            return Err(Error::Shape {
                what: "dataset x".into(),
                expected: "[N, *x_dims] with N >= 1 and no zero dimension".into(),
                got: dims.to_vec(),
            });
        }
        let x = x.to_dtype(DType::F32)?;
        match &labels {
            None if num_classes != 0 => {
                return Err(Error::invalid(
                    "num_classes",
                    num_classes,
                    "0 for a dataset without labels",
                ))
            }
            Some(l) if l.len() != dims[0] => {
                return Err(Error::invalid(
                    "labels",
                    format!("{} labels", l.len()),
                    format!("one label per sample ({})", dims[0]),
                ))
            }
            Some(l) => {
                if let Some(bad) = l.iter().find(|&&c| c as usize >= num_classes) {
                    return Err(Error::invalid(
                        "label",
                        bad,
                        format!("below num_classes = {num_classes}"),
                    ));
                }
            }
            None => {}
        }
        Ok(Dataset {
            x,
            labels,
            num_classes,
        })
    }

    /// The shape of one sample.
    pub fn x_dims(&self) -> &[usize] {
        &self.x.dims()[1..]
    }

    /// The number of samples N.
    pub fn len(&self) -> usize {
        self.x.dims()[0]
    }

    /// Whether the dataset has no samples (never true for a checked dataset).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same samples without labels, for unconditional training.
    pub fn without_labels(self) -> Self {
        Dataset {
            labels: None,
            num_classes: 0,
            ..self
        }
    }

    /// The number of samples of each class (empty when unlabelled).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &c in self.labels.iter().flatten() {
            counts[c as usize] += 1;
        }
        counts
    }

    /// The rows at `indices` (repeats allowed), as `[indices.len(), *x_dims]` with their labels.
    pub fn batch(&self, indices: &[usize]) -> Result<Batch> {
        if indices.is_empty() {
            return Err(Error::ZeroBatch);
        }
        let n = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            return Err(Error::invalid(
                "index",
                bad,
                format!("below the dataset size {n}"),
            ));
        }
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), self.x.device())?;
        let x = self.x.index_select(&idx, 0)?;
        let labels = self
            .labels
            .as_ref()
            .map(|l| indices.iter().map(|&i| l[i]).collect());
        Ok((x, labels))
    }

    /// `b` rows drawn uniformly with replacement.
    pub fn random_batch<R: Rng + ?Sized>(&self, rng: &mut R, b: usize) -> Result<Batch> {
        let n = self.len();
        let indices: Vec<usize> = (0..b).map(|_| rng.random_range(0..n)).collect();
        self.batch(&indices)
    }

    /// A random permutation of `0..N`, for epochs without replacement.
    pub fn shuffled_indices<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(rng);
        idx
    }

    /// One shuffled epoch split into batches of `b` rows (the last one may be smaller).
    pub fn epoch_batches<R: Rng + ?Sized>(&self, rng: &mut R, b: usize) -> Result<Vec<Batch>> {
        if b == 0 {
            return Err(Error::ZeroBatch);
        }
        self.shuffled_indices(rng)
            .chunks(b)
            .map(|c| self.batch(c))
            .collect()
    }

    /// The same dataset with x moved to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Dataset {
            x: self.x.to_device(device)?,
            ..self.clone()
        })
    }
}

/// Where training data comes from: a toy, the embedded digits, or a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A 2-D toy, sampled afresh on demand.
    Toy(Toy),
    /// The embedded 8×8 digits (1797 images, 10 classes).
    Digits,
    /// A CSV or `.npy` file, with an optional 0-based label column.
    File {
        /// The file.
        path: PathBuf,
        /// The column holding class labels, if any.
        label_column: Option<usize>,
    },
}

impl DataSource {
    /// Parses a toy name, `digits`, or the path of an existing file (CSV or `.npy`, no label
    /// column; see [`DataSource::with_label_column`]).
    ///
    /// ```
    /// use flow_matching::data::{DataSource, Toy};
    /// assert_eq!(DataSource::parse("moons").unwrap(), DataSource::Toy(Toy::Moons));
    /// assert!(DataSource::parse("no-such-thing").unwrap_err().to_string().contains("8gaussians"));
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(t) = Toy::from_name(s) {
            return Ok(DataSource::Toy(t));
        }
        if s == "digits" {
            return Ok(DataSource::Digits);
        }
        if Path::new(s).is_file() {
            return Ok(DataSource::File {
                path: PathBuf::from(s),
                label_column: None,
            });
        }
        Err(Error::UnknownName {
            kind: "dataset",
            name: s.to_string(),
            known: Self::known_names(),
        })
    }

    /// The names [`DataSource::parse`] accepts, for messages and help text.
    pub fn known_names() -> String {
        let mut names: Vec<&str> = Toy::ALL.iter().map(|t| t.name()).collect();
        names.push("digits");
        format!(
            "{}, or the path of an existing .csv or .npy file",
            names.join(", ")
        )
    }

    /// Sets the label column of a file source; refused for toys and digits, whose labels are
    /// built in.
    pub fn with_label_column(self, column: Option<usize>) -> Result<Self> {
        match (self, column) {
            (DataSource::File { path, .. }, column) => Ok(DataSource::File {
                path,
                label_column: column,
            }),
            (other, None) => Ok(other),
            (other, Some(c)) => Err(Error::invalid(
                "label column",
                c,
                format!("only for data files; {other} has its labels built in"),
            )),
        }
    }

    /// Whether [`DataSource::draw_batch`] can draw endless fresh samples (true for toys).
    pub fn is_infinite(&self) -> bool {
        matches!(self, DataSource::Toy(_))
    }

    /// Loads the data: `n_toy` points drawn with `seed` for a toy; the whole table otherwise
    /// (`n_toy` and `seed` unused).
    ///
    /// ```
    /// use flow_matching::data::DataSource;
    /// let d = DataSource::parse("8gaussians").unwrap().load(500, 7).unwrap();
    /// assert_eq!(d.x.dims(), &[500, 2]);
    /// ```
    pub fn load(&self, n_toy: usize, seed: u64) -> Result<Dataset> {
        match self {
            DataSource::Toy(t) => {
                let (x, labels) = t.sample_labeled(n_toy, &mut StdRng::seed_from_u64(seed))?;
                Dataset::new(x, labels, t.num_classes())
            }
            DataSource::Digits => digits(),
            DataSource::File { path, label_column } => load_file(path, *label_column),
        }
    }

    /// A fresh batch of `b` toy points `[b, 2]` with labels (for `moons`), for training on
    /// endless data; an error for digits and files (load them and use
    /// [`Dataset::random_batch`]).
    pub fn draw_batch<R: Rng + ?Sized>(&self, rng: &mut R, b: usize) -> Result<Batch> {
        match self {
            DataSource::Toy(t) => t.sample_labeled(b, rng),
            other => Err(Error::invalid(
                "data source",
                other,
                "a toy distribution for fresh batches; load a finite dataset and use Dataset::random_batch",
            )),
        }
    }

    /// The shape of one sample, known without loading for toys and digits.
    pub fn x_dims(&self) -> Option<Vec<usize>> {
        match self {
            DataSource::Toy(_) => Some(vec![2]),
            DataSource::Digits => Some(vec![64]),
            DataSource::File { .. } => None,
        }
    }
}

impl std::str::FromStr for DataSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DataSource::parse(s)
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Toy(t) => write!(f, "{t}"),
            DataSource::Digits => f.write_str("digits"),
            DataSource::File { path, .. } => write!(f, "{}", path.display()),
        }
    }
}
