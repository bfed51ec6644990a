//! The ONNX Runtime engine of [`crate::onnx::OnnxStep`] (feature `ort`): the `ort` crate with
//! `load-dynamic`, the shared library loaded at run time from a path the user gives.
//!
//! One ONNX Runtime library and one environment serve the whole process (ONNX Runtime allows
//! one environment per process): the first successful load fixes the library; asking for another
//! path afterwards is an error, asking for the same one reuses it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};
use tract_onnx::prelude as tp;

use crate::error::{Error, Result};

/// The loaded library and the process's ONNX Runtime environment.
struct Loaded {
    library: PathBuf,
    env: Environment,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

fn lib_err(library: &Path, reason: impl Into<String>) -> Error {
    Error::OnnxRuntimeLibrary {
        library: library.display().to_string(),
        reason: reason.into(),
    }
}

/// The library path: the one given, else `ORT_DYLIB_PATH`.
fn library_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(Error::OnnxRuntimeLibrary {
            library: "(none given)".into(),
            reason: "the ort runtime loads ONNX Runtime at run time and no library was named"
                .into(),
        }),
    }
}

/// Loads the library once per process (and the environment with it).
fn environment(given: Option<&Path>) -> Result<&'static Environment> {
    let path = library_path(given)?;
    // A missing or non-file path is refused before dlopen, whatever was loaded before.
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(lib_err(&path, "not a file")),
        Err(e) => return Err(lib_err(&path, format!("cannot be read ({e})"))),
    }
    let _guard = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = LOADED.get() {
        let same = l.library == path
            || std::fs::canonicalize(&l.library).ok() == std::fs::canonicalize(&path).ok();
        if !same {
            return Err(lib_err(
                &path,
                format!(
                    "this process already loaded ONNX Runtime from {} (one library per process)",
                    l.library.display()
                ),
            ));
        }
        return Ok(&l.env);
    }
    let builder = ort::init_from(&path).map_err(|e| lib_err(&path, e.to_string()))?;
    // The library never prints: ONNX Runtime's own log goes nowhere.
    let env = builder
        .with_name("flow-matching")
        .with_telemetry(false)
        .with_logger(Arc::new(|_, _, _, _, _| {}))
        .build()
        .map_err(|e| lib_err(&path, format!("cannot create the environment: {e}")))?;
    let _ = LOADED.set(Loaded { library: path, env });
    LOADED
        .get()
        .map(|l| &l.env)
        .ok_or_else(|| Error::invalid("ONNX Runtime", "environment", "a loaded environment"))
}

/// An ONNX Runtime session over one model file.
pub(crate) struct OrtEngine {
    session: Session,
    /// The scope of the declared dimensions' symbols (they name themselves through it).
    _symbols: tp::SymbolScope,
}

/// The declared inputs as tract facts (names, dimensions with symbols, element types), in the
/// session's input order.
pub(crate) type Declared = Vec<(String, Vec<tp::TDim>, tp::DatumType)>;

fn datum_of(t: TensorElementType) -> Option<tp::DatumType> {
    Some(match t {
        TensorElementType::Float32 => tp::DatumType::F32,
        TensorElementType::Float64 => tp::DatumType::F64,
        TensorElementType::Int64 => tp::DatumType::I64,
        TensorElementType::Int32 => tp::DatumType::I32,
        TensorElementType::Bool => tp::DatumType::Bool,
        _ => return None,
    })
}

impl OrtEngine {
    /// Opens `path` with the options' library (or `ORT_DYLIB_PATH`), intra-op threads and
    /// spinning, all graph optimisations; returns the engine and the declared inputs.
    pub(crate) fn open(path: &Path, o: &super::options::OrtOptions) -> Result<(Self, Declared)> {
        let env = environment(o.library.as_deref())?;
        let err = |what: &str, e: ort::Error| Error::Onnx {
            path: path.to_path_buf(),
            reason: format!("{what}: {}", e.to_string().replace('\n', " ")),
        };
        let opts = |e: ort::Error<ort::session::builder::SessionBuilder>| {
            err("ONNX Runtime session options", e.into())
        };
        let session = Session::builder(env)
            .map_err(|e| err("ONNX Runtime session", e))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(opts)?
            .with_intra_threads(o.threads.max(1))
            .map_err(opts)?
            .with_inter_threads(1)
            .map_err(opts)?
            .with_intra_op_spinning(o.spin)
            .map_err(opts)?
            .commit_from_file(path)
            .map_err(|e| err("ONNX Runtime cannot load the model", e))?;
        if session.outputs().is_empty() {
            return Err(Error::Onnx {
                path: path.to_path_buf(),
                reason: "the model has no output".into(),
            });
        }
        let scope = tp::SymbolScope::default();
        let mut declared = Vec::with_capacity(session.inputs().len());
        for (i, input) in session.inputs().iter().enumerate() {
            let name = input.name().to_string();
            let (ty, shape, symbols) = match input.dtype() {
                ValueType::Tensor {
                    ty,
                    shape,
                    dimension_symbols,
                } => (ty, shape, dimension_symbols),
                other => {
                    return Err(Error::Onnx {
                        path: path.to_path_buf(),
                        reason: format!("input {name:?} is a {other:?}; expected a tensor"),
                    })
                }
            };
            let datum = datum_of(*ty).ok_or_else(|| Error::Onnx {
                path: path.to_path_buf(),
                reason: format!(
                    "input {name:?} has type {ty:?}; expected f32, f64, i64, i32 or bool"
                ),
            })?;
            let dims = shape
                .iter()
                .enumerate()
                .map(|(d, &n)| {
                    if n >= 0 {
                        tp::TDim::Val(n)
                    } else {
                        let s = symbols.get(d).map(String::as_str).unwrap_or("");
                        let s = if s.is_empty() {
                            format!("unk__{i}_{d}")
                        } else {
                            s.to_string()
                        };
                        tp::TDim::Sym(scope.sym(&s))
                    }
                })
                .collect();
            declared.push((name, dims, datum));
        }
        Ok((
            OrtEngine {
                session,
                _symbols: scope,
            },
            declared,
        ))
    }

    /// Runs the network: `x` and `t` as f32 (converted when the model declares f64), the
    /// condition values in `conds` at their input indices; writes the first output, which must
    /// have `expected` as shape, into `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &mut self,
        path: &Path,
        x: (usize, &[usize], &[f32], tp::DatumType),
        t: (usize, &[usize], &[f32], tp::DatumType),
        conds: &[(usize, &DynValue)],
        out: &mut [f32],
    ) -> Result<()> {
        let err = |what: &str, e: ort::Error| Error::Onnx {
            path: path.to_path_buf(),
            reason: format!("{what}: {}", e.to_string().replace('\n', " ")),
        };
        let n = self.session.inputs().len();
        let mut feeds: Vec<Option<SessionInputValue<'_>>> = (0..n).map(|_| None).collect();
        for (index, shape, values, datum) in [x, t] {
            let v: SessionInputValue<'_> = if datum == tp::DatumType::F64 {
                let w: Vec<f64> = values.iter().map(|&a| a as f64).collect();
                Tensor::from_array((shape.to_vec(), w))
                    .map_err(|e| err("input tensor", e))?
                    .into()
            } else {
                TensorRef::from_array_view((shape.to_vec(), values))
                    .map_err(|e| err("input tensor", e))?
                    .into()
            };
            feeds[index] = Some(v);
        }
        for &(index, value) in conds {
            feeds[index] = Some(value.into());
        }
        let feeds: Vec<SessionInputValue<'_>> = feeds.into_iter().flatten().collect();
        if feeds.len() != n {
            return Err(Error::Onnx {
                path: path.to_path_buf(),
                reason: format!("{} inputs fed, the model has {n}", feeds.len()),
            });
        }
        let outputs = self
            .session
            .run(feeds.as_slice())
            .map_err(|e| err("running the network failed", e))?;
        if outputs.len() == 0 {
            return Err(Error::Onnx {
                path: path.to_path_buf(),
                reason: "the network returned no output".into(),
            });
        }
        let v = &outputs[0];
        let expected = x.1;
        let check = |shape: &[i64]| -> Result<()> {
            if shape.len() != expected.len()
                || shape.iter().zip(expected).any(|(&a, &b)| a != b as i64)
            {
                return Err(Error::StepShape {
                    expected: expected.to_vec(),
                    got: shape.iter().map(|&a| a.max(0) as usize).collect(),
                });
            }
            Ok(())
        };
        if let Ok((shape, data)) = v.try_extract_tensor::<f32>() {
            check(shape)?;
            out.copy_from_slice(data);
        } else {
            let (shape, data) = v
                .try_extract_tensor::<f64>()
                .map_err(|e| err("the velocity output is neither f32 nor f64", e))?;
            check(shape)?;
            for (o, &a) in out.iter_mut().zip(data) {
                *o = a as f32;
            }
        }
        Ok(())
    }
}

/// A condition value (a tract tensor of a supported type) as an ONNX Runtime value.
pub(crate) fn to_ort(path: &Path, t: &tp::Tensor) -> Result<DynValue> {
    let shape: Vec<usize> = t.shape().to_vec();
    let err = |e: String| Error::Onnx {
        path: path.to_path_buf(),
        reason: format!("condition tensor: {e}"),
    };
    let te = |e: tp::TractError| err(format!("{e:#}"));
    let oe = |e: ort::Error| err(e.to_string());
    // One arm a supported element type: copy the tract tensor's values into an ORT tensor.
    macro_rules! value {
        ($ty:ty) => {
            Tensor::from_array((
                shape,
                t.to_plain_array_view::<$ty>()
                    .map_err(te)?
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>(),
            ))
            .map_err(oe)?
            .upcast()
            .into_dyn()
        };
    }
    Ok(match t.datum_type() {
        tp::DatumType::F32 => value!(f32),
        tp::DatumType::F64 => value!(f64),
        tp::DatumType::I64 => value!(i64),
        tp::DatumType::I32 => value!(i32),
        tp::DatumType::Bool => value!(bool),
        other => return Err(err(format!("element type {other:?} is not supported"))),
    })
}
