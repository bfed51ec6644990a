//! Helpers shared by the command-line tests: run the binary, find fixtures, compare arrays.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Tensor};

/// A fixture under the repository's tests/data/golden.
pub fn golden(path: &str) -> PathBuf {
    golden_dir().join(path)
}

/// The repository's tests/data/golden.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden")
}

/// A fixture path as a string, for argument lists.
pub fn golden_str(path: &str) -> String {
    golden(path).to_string_lossy().into_owned()
}

/// A path in this test binary's own temporary directory.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fm-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs `flow-matching` with `args`.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow-matching"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `flow-matching` with `args`: whether it succeeded, its stdout and its stderr.
pub fn run_text(args: &[&str]) -> (bool, String, String) {
    let out = run(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
