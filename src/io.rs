//! Files: atomic writes and NumPy `.npy` arrays.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The temporary name a file is written under before it is renamed into place.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so a crash
/// never leaves a half-written file where a good one was.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    with_temp(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Runs `write` on a temporary path beside `path`, then renames the result into place; the
/// temporary file is removed if `write` fails.
pub fn with_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("directory {} does not exist", dir.display()),
                ),
            ));
        }
    }
    let tmp = temp_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes a tensor as a float32 `.npy` file, atomically.
pub fn write_npy(path: impl AsRef<Path>, t: &Tensor) -> Result<()> {
    let path = path.as_ref();
    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    with_temp(path, |tmp| {
        t.write_npy(tmp).map_err(|e| Error::DataFile {
            path: path.to_path_buf(),
            reason: format!("cannot write: {e}"),
        })
    })
}

/// Reads a `.npy` file (f32, f64 or integers) as a float32 tensor on `device`.
pub fn read_npy(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let t = Tensor::read_npy(path).map_err(|e| Error::DataFile {
        path: path.to_path_buf(),
        reason: format!("not a readable .npy array ({e})"),
    })?;
    Ok(t.to_dtype(DType::F32)?.to_device(device)?)
}
