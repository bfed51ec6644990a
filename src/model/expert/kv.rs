//! The prefix KV cache an action expert attends to: the VLM's keys and values of the prompt,
//! computed once per scene, in transformers' cache layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The key of layer `i`'s cached keys in `kv.safetensors`.
pub fn key_name(i: usize) -> String {
    format!("past_key_values.{i}.key")
}

/// The key of layer `i`'s cached values in `kv.safetensors`.
pub fn value_name(i: usize) -> String {
    format!("past_key_values.{i}.value")
}

/// A prefix cache: per layer, keys and values `[batch, kv_heads, len, head_dim]` (row-major
/// f32), the position of the first action token, and an optional mask of valid prefix tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixCache {
    batch: usize,
    kv_heads: usize,
    len: usize,
    head_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    position_offset: usize,
    /// `[1 or batch, len]`, 1 for a token to attend to, 0 for padding.
    mask: Option<(usize, Vec<f32>)>,
}

fn cache_err(what: impl Into<String>, expected: impl ToString, got: impl ToString) -> Error {
    Error::PrefixCache {
        what: what.into(),
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl PrefixCache {
    /// Builds a cache from per-layer keys and values `[1 or B, kv_heads, P, head_dim]` (any
    /// float dtype), the position of the first action token (`None`: P) and an optional
    /// prefix mask `[1 or B, P]` (nonzero: attend).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use flow_matching::model::expert::PrefixCache;
    /// let k = Tensor::zeros((1, 2, 8, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    /// let cache = PrefixCache::from_tensors(&[k.clone()], &[k], None, None).unwrap();
    /// assert_eq!((cache.len(), cache.position_offset()), (8, 8));
    /// ```
    pub fn from_tensors(
        keys: &[Tensor],
        values: &[Tensor],
        position_offset: Option<usize>,
        prefix_mask: Option<&Tensor>,
    ) -> Result<Self> {
        if keys.is_empty() || keys.len() != values.len() {
            return Err(cache_err(
                "layer count of the values",
                format!("{} (one per layer of keys, at least one)", keys.len()),
                values.len(),
            ));
        }
        let first = keys[0].dims().to_vec();
        let [batch, kv_heads, len, head_dim] = match first.as_slice() {
            &[b, h, p, d] if b > 0 && h > 0 && d > 0 => [b, h, p, d],
            _ => {
                return Err(cache_err(
                    format!("{} shape", key_name(0)),
                    "[batch, kv_heads, prefix, head_dim] with nonzero batch, heads, head_dim",
                    format!("{first:?}"),
                ))
            }
        };
        let mut k = Vec::with_capacity(keys.len());
        let mut v = Vec::with_capacity(keys.len());
        for (i, (kt, vt)) in keys.iter().zip(values).enumerate() {
            for (name, t) in [(key_name(i), kt), (value_name(i), vt)] {
                if t.dims() != first.as_slice() {
                    return Err(cache_err(
                        format!("{name} shape"),
                        format!("{first:?} (the shape of {})", key_name(0)),
                        format!("{:?}", t.dims()),
                    ));
                }
            }
            k.push(f32_vec(kt)?);
            v.push(f32_vec(vt)?);
        }
        let mask = match prefix_mask {
            None => None,
            Some(m) => {
                let rows = match m.dims() {
                    &[r, p] if p == len && (r == 1 || r == batch) => r,
                    d => {
                        return Err(cache_err(
                            "prefix_mask shape",
                            format!("[1 or {batch}, {len}] (the cache's batch and prefix)"),
                            format!("{d:?}"),
                        ))
                    }
                };
                let m = f32_vec(m)?
                    .into_iter()
                    .map(|x| if x != 0.0 { 1.0 } else { 0.0 })
                    .collect();
                Some((rows, m))
            }
        };
        Ok(PrefixCache {
            batch,
            kv_heads,
            len,
            head_dim,
            keys: k,
            values: v,
            position_offset: position_offset.unwrap_or(len),
            mask,
        })
    }

    /// Reads a `kv.safetensors` file: `past_key_values.{i}.key` / `.value` for i = 0, 1, ...,
    /// metadata `position_offset` (default: the prefix length), optional `prefix_mask`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::limits::read_input(path)?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Self::load`] from the file's bytes (`path` names it in errors).
    ///
    /// ```
    /// let e = flow_matching::model::expert::PrefixCache::from_bytes(b"junk", "kv.safetensors".as_ref())
    ///     .unwrap_err();
    /// assert!(e.to_string().contains("not a valid safetensors file"), "{e}");
    /// ```
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let mut keys = Vec::new();
        let mut values = Vec::new();
        while let Some(k) = tensors.get(&key_name(keys.len())) {
            let i = keys.len();
            let v = tensors
                .get(&value_name(i))
                .ok_or_else(|| bad(format!("missing tensor {:?}", value_name(i))))?;
            keys.push(k.clone());
            values.push(v.clone());
        }
        if keys.is_empty() {
            return Err(bad(format!(
                "missing tensor {:?} (a prefix cache holds past_key_values.{{i}}.key and .value)",
                key_name(0)
            )));
        }
        let offset = match meta.get("position_offset") {
            None => None,
            Some(s) => Some(s.trim().parse::<usize>().map_err(|_| {
                bad(format!(
                    "metadata position_offset {s:?}: expected a non-negative integer"
                ))
            })?),
        };
        Self::from_tensors(&keys, &values, offset, tensors.get("prefix_mask"))
            .map_err(|e| bad(e.to_string()))
    }

    /// Cache rows (scenes); one row is broadcast to every sample.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Layers cached.
    pub fn layers(&self) -> usize {
        self.keys.len()
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Prefix tokens P.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the prefix has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The position id of the first action token.
    pub fn position_offset(&self) -> usize {
        self.position_offset
    }

    /// Layer `i`'s keys `[batch, kv_heads, len, head_dim]`.
    pub fn keys(&self, i: usize) -> &[f32] {
        &self.keys[i]
    }

    /// Layer `i`'s values `[batch, kv_heads, len, head_dim]`.
    pub fn values(&self, i: usize) -> &[f32] {
        &self.values[i]
    }

    /// The prefix mask of cache row `row` (`None`: every token is attended to).
    pub fn mask_row(&self, row: usize) -> Option<&[f32]> {
        self.mask.as_ref().map(|(rows, m)| {
            let r = if *rows == 1 { 0 } else { row };
            &m[r * self.len..(r + 1) * self.len]
        })
    }

    /// Layer `i`'s keys or values as a tensor `[batch, kv_heads, len, head_dim]`.
    pub(crate) fn tensor(&self, i: usize, values: bool, device: &Device) -> Result<Tensor> {
        let data = if values {
            &self.values[i]
        } else {
            &self.keys[i]
        };
        Ok(Tensor::from_slice(
            data,
            (self.batch, self.kv_heads, self.len, self.head_dim),
            device,
        )?)
    }
}
