//! How an ONNX network runs: the runtime and ONNX Runtime's options. Below both the step
//! function (`onnx`) and the ONNX Runtime engine (`onnx::ort_engine`), which read them.

use std::path::PathBuf;

/// The runtime that executes the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Runtime {
    /// The pure-Rust tract runtime (feature `onnx`): an optimised plan per batch size.
    #[default]
    Tract,
    /// ONNX Runtime through the `ort` crate (feature `ort`), loaded at run time.
    Ort(OrtOptions),
}

/// How to load and run ONNX Runtime ([`Runtime::Ort`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtOptions {
    /// The ONNX Runtime shared library (`libonnxruntime.so.<version>`, 1.17 or later); `None`
    /// reads the `ORT_DYLIB_PATH` environment variable. One library serves the whole process.
    pub library: Option<PathBuf>,
    /// Intra-op threads (1 suits small batches in a control loop).
    pub threads: usize,
    /// Whether idle intra-op threads spin between ops (ONNX Runtime's own default, which
    /// Python's sessions use): lower latency with several threads, at the price of cores kept
    /// busy while waiting. Off by default, so a service's idle cores stay idle.
    pub spin: bool,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            library: None,
            threads: 1,
            spin: false,
        }
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Runtime::Tract => f.write_str("tract"),
            Runtime::Ort(_) => f.write_str("ort"),
        }
    }
}
