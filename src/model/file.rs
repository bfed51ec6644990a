//! Checked reading of model files (safetensors with `format`/`version` metadata): the header
//! and metadata parsed and every implied shape compared with the header before a tensor is
//! built. Shared by the velocity-mlp's and the waypoint transformer's readers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::cond::CondNorm;

/// The key of the first tensor holding NaN or infinity, if any.
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> Result<Option<String>> {
    for (k, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        // A finite sum proves every element finite; only otherwise look at the elements,
        // since a sum of large finite values can overflow.
        let sum = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if sum.is_finite() {
            continue;
        }
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Ok(Some(k.clone()));
        }
    }
    Ok(None)
}

/// Why `bytes` are not a safetensors file, naming the format they are in when it is one this
/// project knows (an ONNX model, a `.npy` array): "header too large" says nothing to someone
/// who gave `encode` an `.onnx` file.
pub(crate) fn not_safetensors(bytes: &[u8], path: &Path, e: impl std::fmt::Display) -> String {
    let onnx_ext = path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("onnx"));
    // An ONNX file is a protobuf ModelProto; exporters write `ir_version` (field 1, a varint:
    // byte 0x08) first.
    if onnx_ext
        || (bytes.first() == Some(&0x08) && bytes.windows(4).take(4096).any(|w| w == b"onnx"))
    {
        return "is an ONNX model, not a safetensors file: this command takes a velocity-mlp or \
                waypoint-transformer safetensors file (ONNX models run with sample and eval \
                --model F.onnx)"
            .into();
    }
    if bytes.starts_with(crate::io::NPY_MAGIC) {
        return "is a .npy array, not a safetensors model file".into();
    }
    format!("not a valid safetensors file ({e})")
}

/// A metadata entry as a size, with the file named and the value quoted briefly on error.
pub(crate) fn meta_usize(meta: &HashMap<String, String>, key: &str, path: &Path) -> Result<usize> {
    let v = meta.get(key).ok_or_else(|| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("metadata has no {key:?} entry"),
    })?;
    v.trim().parse().map_err(|_| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!(
            "metadata {key:?} is {:?}, expected a non-negative integer that fits in 64 bits",
            crate::limits::excerpt(v)
        ),
    })
}

/// Parses a model file's safetensors header and checks its `format` and `version` metadata;
/// returns the file and its metadata (nothing allocated beyond the header).
pub(crate) fn open_header<'a>(
    bytes: &'a [u8],
    format: &str,
    path: &Path,
) -> Result<(safetensors::SafeTensors<'a>, HashMap<String, String>)> {
    let bad = |reason: String| Error::ModelFile {
        path: PathBuf::from(path),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(not_safetensors(bytes, path, e)))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(not_safetensors(bytes, path, e)))?;
    let meta = header.metadata().clone().ok_or_else(|| {
        bad(format!(
            "no __metadata__ header; expected format = {format}"
        ))
    })?;
    let quote = |key: &str| meta.get(key).map(|v| crate::limits::excerpt(v));
    if meta.get("format").map(String::as_str) != Some(format) {
        return Err(bad(format!(
            "metadata format is {:?}, expected {format:?}",
            quote("format")
        )));
    }
    if meta.get("version").map(String::as_str) != Some("1") {
        return Err(bad(format!(
            "metadata version is {:?}, expected \"1\"",
            quote("version")
        )));
    }
    Ok((st, meta))
}

/// Checks every `expected` key and shape against the header's `shapes` (before anything is
/// allocated), then makes the file's float32 tensors and, for a conditioned model, its
/// condition normalisation. Shared by both model formats' readers.
pub(crate) fn load_checked(
    st: &safetensors::SafeTensors<'_>,
    shapes: &HashMap<String, Vec<usize>>,
    expected: Vec<(String, Vec<usize>)>,
    conditioned: bool,
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Option<CondNorm>)> {
    let bad = |reason: String| Error::ModelFile {
        path: PathBuf::from(path),
        reason,
    };
    for (key, shape) in expected {
        match shapes.get(&key) {
            None => {
                return Err(bad(format!(
                    "missing tensor {key:?} (expected shape {shape:?})"
                )))
            }
            Some(got) if *got != shape => {
                return Err(Error::ModelTensorShape {
                    path: path.to_path_buf(),
                    key,
                    expected: shape,
                    got: got.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "tensor {:?} has dtype {:?}, expected F32",
                crate::limits::excerpt(&name),
                view.dtype()
            )));
        }
        let t = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), device)?;
        tensors.insert(name, t);
    }
    let cond_norm = if conditioned {
        let vec_of = |key: &str| -> Result<Vec<f32>> {
            Ok(tensors
                .get(key)
                .ok_or_else(|| bad(format!("missing tensor {key:?}")))?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        Some(CondNorm {
            mean: vec_of("cond_norm.mean")?,
            std: vec_of("cond_norm.std")?,
        })
    } else {
        None
    };
    Ok((tensors, cond_norm))
}
