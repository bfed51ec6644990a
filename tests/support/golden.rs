//! The golden cases' loader and numpy.allclose-style comparison, shared by the library's and
//! the command line's tests (included with `#[path]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flow_matching::io::read_npy;
use serde_json::Value;

/// tests/data/golden of the repository, from the library's package or the command line's;
/// a test binary carried to another machine finds it under its working directory instead.
pub fn golden_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let own = here.join("tests/data/golden");
    let parent = here.join("../tests/data/golden");
    let cwd = Path::new("tests/data/golden");
    if own.is_dir() {
        own
    } else if parent.is_dir() || !cwd.is_dir() {
        parent
    } else {
        cwd.to_path_buf()
    }
}

/// The case directories, sorted.
pub fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").exists())
        // The waypoint transformer's and the action experts' cases have their own test files
        // (tests/transformer.rs, tests/expert.rs).
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            !name.starts_with("transformer-") && !name.starts_with("expert-")
        })
        .collect();
    v.sort();
    assert_eq!(v.len(), 4, "expected the four golden cases");
    v
}

/// One reference case: its directory and case.json.
pub struct Case {
    pub dir: PathBuf,
    pub json: Value,
}

impl Case {
    pub fn load(dir: &Path) -> Case {
        let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
        Case {
            dir: dir.to_path_buf(),
            json: serde_json::from_str(&text).unwrap(),
        }
    }
    pub fn npy(&self, name: &str) -> Tensor {
        read_npy(self.dir.join(name), &Device::Cpu).unwrap()
    }
    pub fn usize(&self, key: &str) -> usize {
        self.json[key].as_u64().unwrap() as usize
    }
    pub fn tol(&self) -> (f32, f32) {
        let t = &self.json["tolerance"];
        (
            t["abs"].as_f64().unwrap() as f32,
            t["rel"].as_f64().unwrap() as f32,
        )
    }
    pub fn labels(&self) -> Option<Vec<u32>> {
        self.json["labels"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as u32).collect())
    }
    pub fn x_dims(&self) -> Vec<usize> {
        self.json["x_dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }
}

/// numpy.allclose's rule, element by element, with the worst offender in the message.
pub fn assert_close(what: &str, got: &Tensor, expected: &Tensor, (abs, rel): (f32, f32)) {
    assert_eq!(got.dims(), expected.dims(), "{what}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (a, b)) in g.iter().zip(&e).enumerate() {
        assert!(
            (a - b).abs() <= abs + rel * b.abs(),
            "{what}: element {i} is {a}, expected {b} (tolerance {abs} + {rel} * |expected|)"
        );
    }
}
