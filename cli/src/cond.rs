//! Conditions from files: `--cond NAME=FILE.npy` (or `--cond FILE.npy` for a model's only
//! condition input) and `--per-cond K`, shared by the ONNX and the built-in models.

use std::path::PathBuf;

/// One `--cond` value: the input it binds (none: the model's only condition input) and the
/// `.npy` file holding it (its first dimension is the batch: one row per sample, or one row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CondArg {
    /// The model input's name, when given as `NAME=FILE.npy`.
    pub name: Option<String>,
    /// The `.npy` file.
    pub path: PathBuf,
}

impl std::str::FromStr for CondArg {
    type Err = String;

    /// Parses `NAME=FILE.npy` or `FILE.npy`; a `=` inside a path (after a `/`) is part of it.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected NAME=FILE.npy or FILE.npy, got an empty value".into());
        }
        match s.split_once('=') {
            Some((name, path)) if !name.contains('/') => {
                if name.is_empty() || path.is_empty() {
                    return Err(format!(
                        "expected NAME=FILE.npy (both parts non-empty), got {s:?}"
                    ));
                }
                Ok(CondArg {
                    name: Some(name.to_string()),
                    path: PathBuf::from(path),
                })
            }
            _ => Ok(CondArg {
                name: None,
                path: PathBuf::from(s),
            }),
        }
    }
}

/// The condition flags of `sample` (and `eval`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CondFlags {
    /// A condition as NAME=FILE.npy (FILE.npy alone for the model's only condition input); its
    /// first dimension is the batch: one row per sample, or one row for every sample.
    #[arg(long = "cond", value_name = "NAME=FILE.npy")]
    pub cond: Vec<CondArg>,
    /// Draw K samples for each condition row, condition-major (row n * K + k is condition n).
    #[arg(long, value_name = "K")]
    pub per_cond: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_and_bare_conditions() {
        let a: CondArg = "ctx=scene.npy".parse().unwrap();
        assert_eq!(a.name.as_deref(), Some("ctx"));
        assert_eq!(a.path, PathBuf::from("scene.npy"));
        let b: CondArg = "data/scene.npy".parse().unwrap();
        assert_eq!(b.name, None);
        let c: CondArg = "./a=b/scene.npy".parse().unwrap();
        assert_eq!(c.name, None, "a '=' inside a path is part of the path");
        assert!("=scene.npy".parse::<CondArg>().is_err());
        assert!("ctx=".parse::<CondArg>().is_err());
    }
}
