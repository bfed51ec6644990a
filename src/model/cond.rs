//! What a conditional model is conditioned on: class labels or continuous features, with a
//! per-row mask that swaps in the model's learned null condition (classifier-free guidance).

use candle_core::{DType, Device, Tensor};

use crate::diffusion::XDims;
use crate::error::{Error, Result};

/// The condition of every row of a batch.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Class labels `[B]` (u32); the label `num_classes` is the null class.
    Labels(Tensor),
    /// Continuous features `[B, *c_dims]` (any float dtype); rows whose `keep` entry is 0 use
    /// the model's learned null condition instead (`keep` `[B]`, 1.0 or 0.0; `None` keeps all).
    Features {
        /// The features `[B, *c_dims]`.
        values: Tensor,
        /// Per-row 1.0 (use the features) or 0.0 (use the null condition).
        keep: Option<Tensor>,
    },
}

impl Condition {
    /// Continuous features for every row, none dropped.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let c = flow_matching::model::Condition::features(Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu)?);
    /// assert_eq!(c.batch()?, 3);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn features(values: Tensor) -> Self {
        Condition::Features { values, keep: None }
    }

    /// Class labels `[B]` from a slice.
    pub fn labels(labels: &[u32], device: &Device) -> Result<Self> {
        Ok(Condition::Labels(Tensor::from_vec(
            labels.to_vec(),
            labels.len(),
            device,
        )?))
    }

    /// The number of rows.
    pub fn batch(&self) -> Result<usize> {
        Ok(match self {
            Condition::Labels(l) => l.dim(0)?,
            Condition::Features { values, .. } => values.dim(0)?,
        })
    }

    /// The condition with every row doubled and the second half set to the null condition:
    /// the rows of one batched classifier-free-guidance call (`null_label` for labels).
    pub fn with_null_half(&self, null_label: u32) -> Result<Self> {
        let b = self.batch()?;
        Ok(match self {
            Condition::Labels(l) => {
                let nulls = Tensor::full(null_label, b, l.device())?;
                Condition::Labels(Tensor::cat(&[&l.to_dtype(DType::U32)?, &nulls], 0)?)
            }
            Condition::Features { values, keep } => {
                let dev = values.device();
                let keep = match keep {
                    Some(k) => k.to_dtype(DType::F32)?,
                    None => Tensor::ones(b, DType::F32, dev)?,
                };
                Condition::Features {
                    values: Tensor::cat(&[values, values], 0)?,
                    keep: Some(Tensor::cat(
                        &[&keep, &Tensor::zeros(b, DType::F32, dev)?],
                        0,
                    )?),
                }
            }
        })
    }

    /// Every row set to the null condition (`null_label` for labels).
    pub fn all_null(&self, null_label: u32) -> Result<Self> {
        let b = self.batch()?;
        Ok(match self {
            Condition::Labels(l) => Condition::Labels(Tensor::full(null_label, b, l.device())?),
            Condition::Features { values, .. } => Condition::Features {
                values: values.clone(),
                keep: Some(Tensor::zeros(b, DType::F32, values.device())?),
            },
        })
    }

    /// The rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Condition::Labels(l) => Condition::Labels(l.narrow(0, start, len)?),
            Condition::Features { values, keep } => Condition::Features {
                values: values.narrow(0, start, len)?,
                keep: keep.as_ref().map(|k| k.narrow(0, start, len)).transpose()?,
            },
        })
    }

    /// Drops the rows whose `drop_mask` entry is 1 (labels become `null_label`, features get a
    /// 0 in `keep`), as training does for classifier-free guidance.
    pub fn dropped(&self, drop_mask: &Tensor, null_label: u32) -> Result<Self> {
        let mask = drop_mask.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let b = self.batch()?;
        if mask.len() != b {
            return Err(Error::Shape {
                what: "condition drop mask".into(),
                expected: format!("[{b}], one entry per row"),
                got: drop_mask.dims().to_vec(),
            });
        }
        Ok(match self {
            Condition::Labels(l) => {
                let v = l.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let kept = crate::train::drop_labels(&v, drop_mask, null_label as usize)?;
                Condition::Labels(Tensor::from_vec(kept, b, l.device())?)
            }
            Condition::Features { values, keep } => {
                let old = match keep {
                    Some(k) => k.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    None => vec![1.0; b],
                };
                let k: Vec<f32> = old
                    .iter()
                    .zip(&mask)
                    .map(|(&o, &m)| if m > 0.5 { 0.0 } else { o })
                    .collect();
                Condition::Features {
                    values: values.clone(),
                    keep: Some(Tensor::from_vec(k, b, values.device())?),
                }
            }
        })
    }

    /// The same condition on another device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            Condition::Labels(l) => Condition::Labels(l.to_device(device)?),
            Condition::Features { values, keep } => Condition::Features {
                values: values.to_device(device)?,
                keep: keep.as_ref().map(|k| k.to_device(device)).transpose()?,
            },
        })
    }
}

/// What a batch from a training data function carries besides `x`: `Option<Vec<u32>>`
/// (nothing or labels, as before) or a [`Condition`]. There is deliberately no impl for
/// `Option<Condition>`, so a data function's plain `None` still means "no labels".
pub trait IntoCondition {
    /// The condition on `device`, if any.
    fn into_condition(self, device: &Device) -> Result<Option<Condition>>;
}

impl IntoCondition for Option<Vec<u32>> {
    fn into_condition(self, device: &Device) -> Result<Option<Condition>> {
        self.map(|l| Condition::labels(&l, device)).transpose()
    }
}

impl IntoCondition for Condition {
    fn into_condition(self, _device: &Device) -> Result<Option<Condition>> {
        Ok(Some(self))
    }
}

/// The fixed per-feature standardisation of a continuous condition, `(c - mean) / std`, kept in
/// the model file so users' raw condition files need no preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct CondNorm {
    /// Mean of each flattened feature.
    pub mean: Vec<f32>,
    /// Standard deviation of each flattened feature (at least a small floor).
    pub std: Vec<f32>,
}

impl CondNorm {
    /// No change: mean 0, std 1 for `n` features.
    pub fn identity(n: usize) -> Self {
        CondNorm {
            mean: vec![0.0; n],
            std: vec![1.0; n],
        }
    }

    /// The mean and standard deviation of every flattened feature of `c` `[N, *c_dims]`; a
    /// constant feature gets std 1 (so it maps to 0, not to infinity).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let c = Tensor::new(&[[1f32, 5.0], [3.0, 5.0]], &Device::Cpu)?;
    /// let n = flow_matching::model::CondNorm::from_rows(&c)?;
    /// assert_eq!((n.mean, n.std), (vec![2.0, 5.0], vec![1.0, 1.0]));
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn from_rows(c: &Tensor) -> Result<Self> {
        let n = c.dim(0)?;
        if n == 0 {
            return Err(Error::ZeroBatch);
        }
        let d = c.elem_count() / n;
        let v = c.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let mut mean = vec![0f64; d];
        for row in v.chunks(d) {
            for (m, x) in mean.iter_mut().zip(row) {
                *m += x / n as f64;
            }
        }
        let mut var = vec![0f64; d];
        for row in v.chunks(d) {
            for ((s, x), m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (x - m) * (x - m) / n as f64;
            }
        }
        Ok(CondNorm {
            mean: mean.iter().map(|&m| m as f32).collect(),
            std: var
                .iter()
                .map(|&s| {
                    if s.sqrt() > 1e-6 {
                        s.sqrt() as f32
                    } else {
                        1.0
                    }
                })
                .collect(),
        })
    }
}

/// Checks a continuous condition against a model's `c_dims` and returns it as `[B, C]` f32
/// with its keep mask `[B, 1]` (`None`: keep every row).
pub(crate) fn flat_features(
    values: &Tensor,
    keep: Option<&Tensor>,
    c_dims: &XDims,
    batch: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    if values.rank() < 1 || values.dims()[1..] != *c_dims.dims() || values.dim(0)? != batch {
        return Err(Error::Shape {
            what: "condition".into(),
            expected: format!("[{batch}, {c_dims}] (one row per sample, the model's c_dims)"),
            got: values.dims().to_vec(),
        });
    }
    let flat = values
        .reshape((batch, c_dims.numel()))?
        .to_dtype(DType::F32)?;
    let keep = match keep {
        None => None,
        Some(k) => {
            if k.elem_count() != batch {
                return Err(Error::Shape {
                    what: "condition keep mask".into(),
                    expected: format!("[{batch}]"),
                    got: k.dims().to_vec(),
                });
            }
            Some(k.reshape((batch, 1))?.to_dtype(DType::F32)?)
        }
    };
    Ok((flat, keep))
}
