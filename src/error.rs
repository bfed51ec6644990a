//! The crate's one error type.

use std::path::PathBuf;

/// Every failure the library reports; messages name the value and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sample shape that is empty or has a zero dimension.
    #[error("invalid x_dims {dims:?}: {reason}")]
    InvalidXDims {
        /// The shape that was given.
        dims: Vec<usize>,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A batch size of zero.
    #[error("batch size must be at least 1, got 0")]
    ZeroBatch,

    /// A step count of zero.
    #[error("number of inference steps must be at least 1, got 0")]
    ZeroSteps,

    /// A name (method, schedule, dataset, ...) that is not known.
    #[error(
        "unknown {kind} {:?}; expected one of: {}",
        crate::describe::excerpt(name),
        crate::describe::excerpt_text(known)
    )]
    UnknownName {
        /// What kind of name it was ("integration method", "dataset", ...).
        kind: &'static str,
        /// The name that was given.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },

    /// A step function returned a tensor of the wrong shape.
    #[error("step function returned shape {got:?}, expected {expected:?} (the shape of x)")]
    StepShape {
        /// The shape of `x`.
        expected: Vec<usize>,
        /// The shape returned.
        got: Vec<usize>,
    },

    /// A step function returned a tensor of the wrong dtype.
    #[error("step function returned dtype {got:?}, expected {expected:?} (the dtype of x)")]
    StepDType {
        /// The dtype of `x`.
        expected: candle_core::DType,
        /// The dtype returned.
        got: candle_core::DType,
    },

    /// A step function returned a tensor on another device.
    #[error("step function returned a tensor on {got}, expected {expected} (the device of x)")]
    StepDevice {
        /// The device of `x`.
        expected: String,
        /// The device returned.
        got: String,
    },

    /// The state held NaN or infinity after a step.
    #[error("non-finite value (NaN or infinity) in the state after step {step} (t = {t:.6})")]
    NonFinite {
        /// The 1-based index of the step that produced it.
        step: usize,
        /// The time reached by that step.
        t: f64,
    },

    /// A shape that does not fit what the operation needs.
    #[error(
        "{}: expected shape {}, got {got:?}",
        crate::describe::excerpt_text(what),
        crate::describe::excerpt_text(expected)
    )]
    Shape {
        /// What was being checked.
        what: String,
        /// The expected shape, in words or numbers.
        expected: String,
        /// The shape found.
        got: Vec<usize>,
    },

    /// A value inside an input (a file or an argument) that cannot be used: where it is and
    /// what was expected, e.g. a NaN pose or a matrix that is not a rotation.
    #[error(
        "{}: {}",
        crate::describe::excerpt_text(what),
        crate::describe::excerpt_text(reason)
    )]
    BadValue {
        /// The input and the place in it (`--fut-xyz F.npy at [3, 12]`).
        what: String,
        /// What was found and what was expected.
        reason: String,
    },

    /// An argument outside its allowed range.
    #[error(
        "invalid {name} {}: {}",
        crate::describe::excerpt(value),
        crate::describe::excerpt_text(expected)
    )]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// The value given, as text.
        value: String,
        /// What is allowed.
        expected: String,
    },

    /// A model file that cannot be used.
    #[error(
        "model file {}: {}",
        crate::describe::excerpt_path(path),
        crate::describe::excerpt_text(reason)
    )]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A model tensor whose shape disagrees with the metadata.
    #[error(
        "model file {}: tensor {key:?} has shape {got:?}, expected {expected:?}",
        crate::describe::excerpt_path(path)
    )]
    ModelTensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The shape implied by the metadata.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },

    /// A data file (CSV, .npy) that cannot be read.
    #[error(
        "data file {}: {}",
        crate::describe::excerpt_path(path),
        crate::describe::excerpt_text(reason)
    )]
    DataFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where there is one.
        reason: String,
    },

    /// An operating-system error on a file.
    #[error("{}: {source}", crate::describe::excerpt_path(path))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A training run that diverged or was misconfigured.
    #[error("training: {0}")]
    Training(String),

    /// The adaptive solver hit its step cap before reaching the end time.
    #[error("adaptive solver stopped after {steps} steps at t = {t:.6} (max_steps reached before t = {t_end})")]
    MaxStepsReached {
        /// Steps taken.
        steps: usize,
        /// Time reached.
        t: f64,
        /// Time that was to be reached.
        t_end: f64,
    },

    /// An error from candle's tensor operations.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    // --- onnx ---
    /// An ONNX model file that cannot be read or run.
    #[error(
        "ONNX model {}: {}",
        crate::describe::excerpt_path(path),
        crate::describe::excerpt_text(reason)
    )]
    Onnx {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An ONNX model that uses an operator the runtime does not implement.
    #[error(
        "ONNX model {}: operator {op} (node {node:?}) is not supported by the runtime",
        crate::describe::excerpt_path(path)
    )]
    OnnxUnsupportedOp {
        /// The file.
        path: PathBuf,
        /// The operator type (with its domain when not the default one).
        op: String,
        /// The node's name.
        node: String,
    },

    /// An ONNX model input that no condition gives.
    #[error("the ONNX model needs its input {name:?} {shape}, and no value was given for it (--cond {name}=FILE.npy)")]
    OnnxMissingInput {
        /// The input's name.
        name: String,
        /// Its declared shape.
        shape: String,
    },

    /// A condition for an input the ONNX model does not have.
    #[error("the ONNX model has no input {name:?}; its condition inputs: {known}")]
    OnnxUnknownInput {
        /// The name given.
        name: String,
        /// The model's condition inputs with their shapes.
        known: String,
    },

    /// An ONNX model exported with a fixed batch asked to run at another batch.
    #[error("ONNX model {}: exported with a fixed batch of {fixed}, it runs only at that batch, not {asked}; re-export it with a dynamic batch (torch.onnx.export(..., dynamic_axes={{\"x\": {{0: \"batch\"}}, ...}}))", crate::describe::excerpt_path(path))]
    OnnxFixedBatch {
        /// The file.
        path: PathBuf,
        /// The batch the file fixes.
        fixed: usize,
        /// The batch asked for.
        asked: usize,
    },

    /// The ONNX Runtime shared library (runtime `ort`) missing, unloadable or too old.
    #[error("ONNX Runtime library {library}: {reason}; expected the onnxruntime shared library, version 1.17 or later (e.g. the `onnxruntime` Python wheel's onnxruntime/capi/libonnxruntime.so.<version>), given with --ort-lib PATH or ORT_DYLIB_PATH")]
    OnnxRuntimeLibrary {
        /// The path given (or how it was looked for).
        library: String,
        /// What went wrong.
        reason: String,
    },

    // --- robustness (issue 11): outputs, locks, memory bounds, non-finite weights ---
    /// An output path refused before any work starts (missing or unwritable directory, a
    /// special file, a path shared by two roles or with an input).
    #[error(
        "{role} {}: {}",
        crate::describe::excerpt_path(path),
        crate::describe::excerpt_text(reason)
    )]
    OutputPath {
        /// The flag or role of the output (`--out`, `--loss-plot`, ...).
        role: String,
        /// The path given.
        path: std::path::PathBuf,
        /// Why it cannot be written.
        reason: String,
    },

    /// Another process (or another writer in this one) holds the output's advisory lock.
    #[error("{}: another run is writing this file (lock {} is held); wait for it to finish or choose another path", crate::describe::excerpt_path(path), crate::describe::excerpt_path(lock))]
    Locked {
        /// The output.
        path: std::path::PathBuf,
        /// The lock file beside it.
        lock: std::path::PathBuf,
    },

    /// A request for more memory than is available, refused before allocating.
    #[error("{}: needs {}, more than the {} of memory available (set FLOW_MATCHING_MEMORY_LIMIT to change the ceiling)", crate::describe::excerpt_text(what), crate::describe::human_bytes(*needed), crate::describe::human_bytes(Some(*available)))]
    TooLarge {
        /// What would be allocated, naming the flag or file behind it.
        what: String,
        /// Bytes needed; `None` when the count overflows 64 bits.
        needed: Option<u64>,
        /// Bytes available.
        available: u64,
    },

    /// Weights holding NaN or infinity, refused instead of written or resumed.
    #[error("{what}: tensor {key:?} holds non-finite values (NaN or infinity); {action}")]
    NonFiniteWeights {
        /// The model, file or checkpoint.
        what: String,
        /// The first tensor found with a non-finite value.
        key: String,
        /// What was refused and what is left untouched.
        action: String,
    },

    // --- action experts (issue 20) ---
    /// A prefix KV cache that disagrees with the expert's config or with itself.
    #[error("prefix cache: {what} is {got}, expected {expected}")]
    PrefixCache {
        /// What was compared (layer count, kv heads, head_dim, batch, a tensor's shape).
        what: String,
        /// What the config (or the rest of the cache) implies.
        expected: String,
        /// What the cache holds.
        got: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidArgument`] for `name = value`, with what was expected.
    pub fn invalid(name: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            // Bounded here once, so no caller can echo a 100 KB flag value.
            value: crate::describe::excerpt(&value.to_string()),
            expected: expected.into(),
        }
    }

    /// An [`Error::Io`] for a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
