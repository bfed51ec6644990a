//! Files: atomic writes and NumPy `.npy` arrays.
//!
//! The `.npy` reader checks the header before allocating: the shape's product (checked
//! arithmetic) times the item size must equal the bytes actually present, so a lying header
//! is an error, never a huge allocation or a wrapped size. The values become at most four
//! times the file's size (one-byte integers to float32).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::output::{commit, stage, stage_bytes, Staged};

/// The first bytes of every `.npy` file.
pub const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// The longest `.npy` header accepted (NumPy itself refuses more than 10,000 bytes by
/// default; version 2 headers may declare up to 4 GB).
pub const MAX_NPY_HEADER: usize = 1 << 20;

/// The largest rank accepted in a `.npy` shape (NumPy's own limit is 64).
pub const MAX_NPY_RANK: usize = 64;

/// Writes `bytes` to `path` atomically: an exclusive temporary file beside it, fsynced,
/// renamed over `path`, directory fsynced (see [`crate::output`]). A crash never leaves a
/// half-written file where a good one was.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    commit(vec![stage_bytes(path, bytes)?])
}

/// Runs `write` on the path of an exclusively created, empty temporary file beside `path`,
/// then fsyncs and renames it into place; the temporary file is removed if `write` fails.
/// For writers that only take a path (prefer [`crate::output::stage`]).
pub fn with_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staged = stage(path, |_| Ok(()))?;
    let tmp = staged.temp_path().to_path_buf();
    write(&tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    commit(vec![staged])
}

/// The `.npy` (version 1.0, little-endian float32, C order) header for `shape`.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    npy_header_of(shape, "<f4")
}

/// The `.npy` (version 1.0, C order) header for `shape` and a dtype string such as `<f8`.
fn npy_header_of(shape: &[usize], descr: &str) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + dict + newline, padded to a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes a tensor as float32 `.npy` into its temporary file; [`commit`] puts it in place.
/// Lets a command stage every output before renaming any.
pub fn stage_npy(path: impl AsRef<Path>, t: &Tensor) -> Result<Staged> {
    let path = path.as_ref();
    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    stage(path, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(&npy_header(t.dims())).map_err(io)?;
        for chunk in values.chunks(1 << 14) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })
}

/// Writes `values` (C order) of `shape` as float64 `.npy` into its temporary file; [`commit`]
/// puts it in place. Poses and actions keep their full precision this way (a float32 position
/// 60 m out is only good to 4 µm).
pub fn stage_npy_f64(path: impl AsRef<Path>, shape: &[usize], values: &[f64]) -> Result<Staged> {
    let path = path.as_ref();
    let count: usize = shape.iter().product();
    if count != values.len() {
        return Err(Error::Shape {
            what: format!("values written to {}", path.display()),
            expected: format!("{count} values for the shape"),
            got: vec![values.len()],
        });
    }
    stage(path, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(&npy_header_of(shape, "<f8")).map_err(io)?;
        for chunk in values.chunks(1 << 13) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })
}

/// Reads a `.npy` file (float, integer or boolean; C order) as its shape and float64 values,
/// without the float32 rounding of [`read_npy`].
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("x.npy");
/// let staged = flow_matching::io::stage_npy_f64(&p, &[2], &[0.1, 1e-300]).unwrap();
/// flow_matching::output::commit(vec![staged]).unwrap();
/// let (shape, v) = flow_matching::io::read_npy_f64(&p).unwrap();
/// assert_eq!((shape, v), (vec![2], vec![0.1, 1e-300]));
/// ```
pub fn read_npy_f64(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f64>)> {
    let path = path.as_ref();
    let bytes = crate::limits::read_input(path)?;
    decode_npy_f64(&bytes).map_err(|reason| Error::DataFile {
        path: path.to_path_buf(),
        reason: format!("not a readable .npy array: {reason}"),
    })
}

/// Decodes a whole `.npy` file into its shape and float64 values; a reason on error.
pub fn decode_npy_f64(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f64>), String> {
    let h = parse_npy_header(bytes)?;
    let data = &bytes[h.data_offset..];
    let conv = |c: &[u8]| -> f64 {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        if h.big_endian {
            b[..c.len()].reverse();
        }
        match (h.kind, c.len()) {
            (Kind::Float, 4) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (Kind::Float, _) => f64::from_le_bytes(b),
            (Kind::Bool, _) => f64::from(u8::from(b[0] != 0)),
            (Kind::Uint, _) => u64::from_le_bytes(b) as f64,
            (Kind::Int, n) => {
                // Sign-extend from n bytes.
                let shift = 64 - 8 * n as u32;
                ((i64::from_le_bytes(b) << shift) >> shift) as f64
            }
        }
    };
    let values = data.chunks_exact(h.item_size).map(conv).collect();
    Ok((h.shape, values))
}

/// Writes a tensor as a float32 `.npy` file, atomically.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("x.npy");
/// let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
/// flow_matching::io::write_npy(&p, &t).unwrap();
/// let back = flow_matching::io::read_npy(&p, &Device::Cpu).unwrap();
/// assert_eq!(back.to_vec2::<f32>().unwrap(), vec![vec![1., 2.], vec![3., 4.]]);
/// ```
pub fn write_npy(path: impl AsRef<Path>, t: &Tensor) -> Result<()> {
    commit(vec![stage_npy(path, t)?])
}

/// Reads a `.npy` file (float, integer or boolean; C order) as a float32 tensor on `device`.
pub fn read_npy(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = crate::limits::read_input(path)?;
    let (shape, values) = decode_npy(&bytes).map_err(|reason| Error::DataFile {
        path: path.to_path_buf(),
        reason: format!("not a readable .npy array: {reason}"),
    })?;
    drop(bytes);
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
}

/// The element types the reader accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Float,
    Int,
    Uint,
    Bool,
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// The shape, as declared.
    pub shape: Vec<usize>,
    /// Bytes per element.
    pub item_size: usize,
    /// Where the data starts.
    pub data_offset: usize,
    kind: Kind,
    big_endian: bool,
}

/// Parses and checks a `.npy` header against the bytes present; returns a reason on error.
pub fn parse_npy_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    if !bytes.starts_with(NPY_MAGIC) {
        return Err("missing the \\x93NUMPY magic bytes".into());
    }
    let (major, minor) = match bytes.get(6..8) {
        Some(&[a, b]) => (a, b),
        _ => return Err("truncated before the format version".into()),
    };
    let (len, start) = match major {
        1 => match bytes.get(8..10) {
            Some(&[a, b]) => (u16::from_le_bytes([a, b]) as usize, 10),
            _ => return Err("truncated before the header length".into()),
        },
        2 | 3 => match bytes.get(8..12) {
            Some(&[a, b, c, d]) => (u32::from_le_bytes([a, b, c, d]) as usize, 12),
            _ => return Err("truncated before the header length".into()),
        },
        _ => return Err(format!("unsupported format version {major}.{minor}")),
    };
    if len > MAX_NPY_HEADER {
        return Err(format!(
            "header of {len} bytes, more than the {MAX_NPY_HEADER} accepted"
        ));
    }
    let data_offset = start + len;
    let text = bytes
        .get(start..data_offset)
        .ok_or_else(|| format!("header declares {len} bytes but the file ends before them"))?;
    let text = std::str::from_utf8(text).map_err(|_| "header is not text".to_string())?;
    let dict = parse_dict(text)?;
    let descr = dict.descr.ok_or("header has no 'descr'")?;
    let shape = dict.shape.ok_or("header has no 'shape'")?;
    if dict.fortran_order.ok_or("header has no 'fortran_order'")? {
        return Err(
            "Fortran-order array: save it in C order (numpy.ascontiguousarray) first".into(),
        );
    }
    let (kind, item_size, big_endian) = parse_descr(&descr)?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {} overflows", crate::limits::excerpt_list(&shape)))?;
    let need = count
        .checked_mul(item_size)
        .ok_or_else(|| format!("shape {} overflows", crate::limits::excerpt_list(&shape)))?;
    let have = bytes.len() - data_offset.min(bytes.len());
    if need != have {
        return Err(format!(
            "header declares shape {} of {descr} ({need} bytes) but {have} bytes of data follow",
            crate::limits::excerpt_list(&shape)
        ));
    }
    Ok(NpyHeader {
        shape,
        item_size,
        data_offset,
        kind,
        big_endian,
    })
}

/// Decodes a whole `.npy` file into its shape and float32 values; a reason on error.
///
/// ```
/// let mut f = b"\x93NUMPY\x01\x00".to_vec();
/// let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 2), }\n";
/// f.extend_from_slice(&(h.len() as u16).to_le_bytes());
/// f.extend_from_slice(h.as_bytes());
/// let e = flow_matching::io::decode_npy(&f).unwrap_err();
/// assert!(e.contains("but 0 bytes of data follow"), "{e}");
/// ```
pub fn decode_npy(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let h = parse_npy_header(bytes)?;
    let data = &bytes[h.data_offset..];
    let conv = |c: &[u8]| -> f32 {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        if h.big_endian {
            b[..c.len()].reverse();
        }
        match (h.kind, c.len()) {
            (Kind::Float, 4) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            (Kind::Float, _) => f64::from_le_bytes(b) as f32,
            (Kind::Bool, _) => f32::from(b[0] != 0),
            (Kind::Uint, _) => u64::from_le_bytes(b) as f32,
            (Kind::Int, n) => {
                // Sign-extend from n bytes.
                let shift = 64 - 8 * n as u32;
                ((i64::from_le_bytes(b) << shift) >> shift) as f32
            }
        }
    };
    let values = data.chunks_exact(h.item_size).map(conv).collect();
    Ok((h.shape, values))
}

/// `(kind, item size, big-endian)` of a dtype string such as `<f4`.
fn parse_descr(d: &str) -> std::result::Result<(Kind, usize, bool), String> {
    let bad = || {
        format!(
            "dtype {:?} is not supported: expected float32/64, (unsigned) integers or bool",
            crate::limits::excerpt(d)
        )
    };
    let mut chars = d.chars();
    let order = chars.next().ok_or_else(bad)?;
    let big_endian = match order {
        '<' | '|' | '=' => false,
        '>' => true,
        _ => return Err(bad()),
    };
    let kind = match chars.next() {
        Some('f') => Kind::Float,
        Some('i') => Kind::Int,
        Some('u') => Kind::Uint,
        Some('b') => Kind::Bool,
        _ => return Err(bad()),
    };
    let size: usize = chars.as_str().parse().map_err(|_| bad())?;
    let ok = match kind {
        Kind::Float => matches!(size, 4 | 8),
        Kind::Int | Kind::Uint => matches!(size, 1 | 2 | 4 | 8),
        Kind::Bool => size == 1,
    };
    if !ok {
        return Err(bad());
    }
    Ok((kind, size, big_endian))
}

/// The three entries of a `.npy` header dictionary.
#[derive(Default)]
struct Dict {
    descr: Option<String>,
    fortran_order: Option<bool>,
    shape: Option<Vec<usize>>,
}

/// Parses the Python-literal dictionary of a `.npy` header (the subset NumPy writes).
fn parse_dict(text: &str) -> std::result::Result<Dict, String> {
    let body = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or("header is not a {...} dictionary")?;
    let mut dict = Dict::default();
    let mut rest = body.trim_start();
    while !rest.is_empty() {
        let (key, after) = quoted(rest).ok_or("header key is not a quoted string")?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or("header key without ':'")?
            .trim_start();
        let after = match key {
            "descr" => {
                let (v, a) = quoted(after).ok_or("'descr' is not a quoted string")?;
                dict.descr = Some(v.to_string());
                a
            }
            "fortran_order" => {
                if let Some(a) = after.strip_prefix("False") {
                    dict.fortran_order = Some(false);
                    a
                } else if let Some(a) = after.strip_prefix("True") {
                    dict.fortran_order = Some(true);
                    a
                } else {
                    return Err("'fortran_order' is not True or False".into());
                }
            }
            "shape" => {
                let inner = after.strip_prefix('(').ok_or("'shape' is not a tuple")?;
                let close = inner.find(')').ok_or("'shape' tuple is not closed")?;
                let mut shape = Vec::new();
                for p in inner[..close].split(',').map(str::trim) {
                    if p.is_empty() {
                        continue;
                    }
                    let p = p.strip_suffix('L').unwrap_or(p);
                    let d = p.parse::<usize>().map_err(|_| {
                        format!(
                            "shape entry {:?} is not a non-negative integer that fits in 64 bits",
                            crate::limits::excerpt(p)
                        )
                    })?;
                    shape.push(d);
                    if shape.len() > MAX_NPY_RANK {
                        return Err(format!("shape has more than {MAX_NPY_RANK} dimensions"));
                    }
                }
                dict.shape = Some(shape);
                &inner[close + 1..]
            }
            other => {
                return Err(format!(
                    "unknown header key {:?}",
                    crate::limits::excerpt(other)
                ))
            }
        };
        let after = after.trim_start();
        rest = match after.strip_prefix(',') {
            Some(a) => a.trim_start(),
            None if after.is_empty() => after,
            None => return Err("header entries are not separated by ','".into()),
        };
    }
    Ok(dict)
}

/// A `'...'` or `"..."` string at the start of `s`, and what follows it.
fn quoted(s: &str) -> Option<(&str, &str)> {
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let inner = &s[1..];
    let end = inner.find(q)?;
    Some((&inner[..end], &inner[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut f = NPY_MAGIC.to_vec();
        f.extend_from_slice(&[1, 0]);
        f.extend_from_slice(&(header.len() as u16).to_le_bytes());
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn header_round_trip_is_numpy_layout() {
        let h = npy_header(&[3, 2]);
        assert_eq!(h.len() % 64, 0);
        let mut f = h.clone();
        f.extend(std::iter::repeat_n(0u8, 24));
        let (shape, v) = decode_npy(&f).unwrap();
        assert_eq!((shape, v.len()), (vec![3, 2], 6));
        assert!(String::from_utf8_lossy(&npy_header(&[5])).contains("(5,)"));
    }

    #[test]
    fn lying_sizes_are_errors() {
        let huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775808, 2), }";
        assert!(decode_npy(&npy(huge, &[]))
            .unwrap_err()
            .contains("overflows"));
        let wraps = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }";
        assert!(decode_npy(&npy(wraps, &[]))
            .unwrap_err()
            .contains("overflows"));
        let short = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        assert!(decode_npy(&npy(short, &[0; 8]))
            .unwrap_err()
            .contains("12 bytes) but 8 bytes"));
        let fortran = "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }";
        assert!(decode_npy(&npy(fortran, &[0; 4]))
            .unwrap_err()
            .contains("Fortran"));
        let object = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }";
        assert!(decode_npy(&npy(object, &[0; 8]))
            .unwrap_err()
            .contains("dtype"));
    }

    #[test]
    fn integer_and_big_endian_types_decode() {
        let h = "{'descr': '>i2', 'fortran_order': False, 'shape': (2,), }";
        let (_, v) = decode_npy(&npy(h, &[0xff, 0xfe, 0x00, 0x07])).unwrap();
        assert_eq!(v, vec![-2.0, 7.0]);
        let h = "{'descr': '<f8', 'fortran_order': False, 'shape': (), }";
        let (s, v) = decode_npy(&npy(h, &1.5f64.to_le_bytes())).unwrap();
        assert_eq!((s, v), (vec![], vec![1.5]));
        let h = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2), }";
        assert_eq!(decode_npy(&npy(h, &[0, 255])).unwrap().1, vec![0.0, 255.0]);
    }
}
