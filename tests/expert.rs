//! Action experts (a decoder over a prefix KV cache) against the PyTorch reference cases in
//! tests/data/golden/expert-* (transformers' Qwen3/Qwen2 modules, the seed's in-projection
//! and sampler), on every kernel path; the fused CPU path against the candle reference path;
//! and the errors of bad caches and configs. Its own binary: the kernel path is process-wide.

#[path = "support/golden.rs"]
mod golden_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flow_matching::kernel::{set_kernel_path, KernelPath};
use flow_matching::model::expert::{ActionExpert, ExpertConfig, PrefixCache};
use flow_matching::{Diffusion, FlowMatching, SampleOptions};
use golden_support::{assert_close, golden_dir, Case};

const CASES: [&str; 3] = [
    "expert-qwen3",
    "expert-qwen3-freq100",
    "expert-qwen2-noise1",
];

fn sample(expert: &mut ActionExpert, x0: &Tensor, steps: usize) -> Tensor {
    let fm = FlowMatching::new(expert.x_dims())
        .unwrap()
        .with_steps(steps)
        .unwrap();
    let opts = SampleOptions {
        x_init: Some(x0.clone()),
        ..Default::default()
    };
    fm.sample(x0.dim(0).unwrap(), expert, &Device::Cpu, &opts)
        .unwrap()
        .x
}

fn checked_steps(case: &Case) -> Vec<usize> {
    case.json["checked_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

fn expected(case: &Case, steps: usize) -> Tensor {
    case.npy(if steps == 1 {
        "expected_final_1step.npy"
    } else {
        "expected_final.npy"
    })
}

#[test]
fn golden_cases_match_on_every_kernel_path_and_on_the_reference_path() {
    for name in CASES {
        let case = Case::load(&golden_dir().join(name));
        let mut expert = ActionExpert::load(case.dir.join("model"), &Device::Cpu).unwrap();
        assert_eq!(
            expert.time_convention().name(),
            case.json["convention"].as_str().unwrap()
        );
        expert
            .set_condition(PrefixCache::load(case.dir.join("kv.safetensors")).unwrap())
            .unwrap();
        let x0 = case.npy("x_init.npy");
        for steps in checked_steps(&case) {
            let want = expected(&case, steps);
            for path in KernelPath::supported() {
                set_kernel_path(path).unwrap();
                let got = sample(&mut expert, &x0, steps);
                assert_close(
                    &format!("{name} {steps} steps {path:?}"),
                    &got,
                    &want,
                    case.tol(),
                );
            }
            expert.set_fast_path(false);
            let got = sample(&mut expert, &x0, steps);
            assert_close(
                &format!("{name} {steps} steps reference"),
                &got,
                &want,
                case.tol(),
            );
            expert.set_fast_path(true);
        }
    }
}

/// A deterministic pseudo-random tensor of `shape` with entries in about [-s, s].
fn pseudo(shape: &[usize], seed: u64, s: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * s
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fm-expert-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small synthetic expert: `family`, `convention`, `in_proj` kind, causal or not, written to
/// a fresh directory with random weights.
fn synthetic(tag: &str, family: &str, convention: &str, in_proj: &str, causal: bool) -> PathBuf {
    let in_proj_json = match in_proj {
        "linear" => r#"{"kind": "linear"}"#.to_string(),
        _ => r#"{"kind": "alpamayo_per_waypoint_v2", "hidden_size": 48, "num_enc_layers": 3,
                 "max_freq": 10.0, "num_fourier_feats": 8}"#
            .to_string(),
    };
    let config = format!(
        r#"{{"format": "flow-expert", "version": 1, "action_dims": [5, 3],
            "time_convention": "{convention}", "non_causal": {},
            "expert": {{"family": "{family}", "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
              "intermediate_size": 40, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}},
            "action_in_proj": {in_proj_json}, "action_out_proj": {{"kind": "linear"}}}}"#,
        !causal
    );
    let dir = tmp(tag);
    std::fs::write(dir.join("config.json"), &config).unwrap();
    let cfg = ExpertConfig::parse(&config, Path::new("config.json")).unwrap();
    let mut map = HashMap::new();
    for (i, (name, shape)) in cfg.expected_shapes().into_iter().enumerate() {
        let scale = if name.contains("norm") { 0.1 } else { 0.25 };
        let mut t = pseudo(&shape, i as u64 + 1, scale);
        if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            t = (t + 1.0).unwrap();
        }
        map.insert(name, t);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    dir
}

fn cache(rows: usize, layers: usize, heads: usize, p: usize, hd: usize, seed: u64) -> Vec<Tensor> {
    (0..2 * layers)
        .map(|i| pseudo(&[rows, heads, p, hd], seed * 100 + i as u64, 1.5))
        .collect()
}

fn prefix(rows: usize, p: usize, seed: u64, offset: Option<usize>, masked: bool) -> PrefixCache {
    let kv = cache(rows, 2, 2, p, 12, seed);
    let (k, v): (Vec<_>, Vec<_>) = kv.chunks(2).map(|c| (c[0].clone(), c[1].clone())).unzip();
    let mask = masked.then(|| {
        let m: Vec<f32> = (0..rows * p)
            .map(|i| if i % 4 == 3 { 0.0 } else { 1.0 })
            .collect();
        Tensor::from_vec(m, (rows, p), &Device::Cpu).unwrap()
    });
    PrefixCache::from_tensors(&k, &v, offset, mask.as_ref()).unwrap()
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn fused_path_equals_the_reference_path_over_families_projections_masks_and_batches() {
    let variants = [
        (
            "a",
            "qwen3",
            "noise_at_0",
            "alpamayo",
            false,
            1,
            37,
            None,
            false,
        ),
        (
            "b",
            "qwen2",
            "noise_at_1",
            "linear",
            true,
            2,
            16,
            Some(40),
            true,
        ),
        (
            "c",
            "qwen3",
            "noise_at_1",
            "alpamayo",
            true,
            3,
            5,
            Some(7),
            true,
        ),
        (
            "d",
            "qwen2",
            "noise_at_0",
            "alpamayo",
            false,
            1,
            0,
            None,
            false,
        ),
    ];
    for (tag, family, conv, inp, causal, rows, p, offset, masked) in variants {
        let dir = synthetic(tag, family, conv, inp, causal);
        let mut expert = ActionExpert::load(&dir, &Device::Cpu).unwrap();
        expert
            .set_condition(prefix(rows, p, 7, offset, masked))
            .unwrap();
        let b = rows * 2;
        let x0 = pseudo(&[b, 5, 3], 99, 1.0);
        for method in ["euler", "heun"] {
            let fm = FlowMatching::new(expert.x_dims())
                .unwrap()
                .with_method(method)
                .unwrap()
                .with_steps(2)
                .unwrap();
            let opts = SampleOptions {
                x_init: Some(x0.clone()),
                ..Default::default()
            };
            let fast = fm.sample(b, &mut expert, &Device::Cpu, &opts).unwrap().x;
            expert.set_fast_path(false);
            let reference = fm.sample(b, &mut expert, &Device::Cpu, &opts).unwrap().x;
            expert.set_fast_path(true);
            let (f, r) = (vec(&fast), vec(&reference));
            assert!(f.iter().all(|v| v.is_finite()), "{tag}");
            for (i, (a, e)) in f.iter().zip(&r).enumerate() {
                assert!(
                    (a - e).abs() <= 2e-5 + 2e-4 * e.abs(),
                    "variant {tag} {method} at {i}: fused {a}, reference {e}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_new_cache_of_the_same_shape_gives_what_a_fresh_expert_gives() {
    let dir = synthetic("reuse", "qwen3", "noise_at_0", "alpamayo", false);
    let x0 = pseudo(&[4, 5, 3], 5, 1.0);
    let mut reused = ActionExpert::load(&dir, &Device::Cpu).unwrap();
    reused.set_condition(prefix(2, 21, 1, None, true)).unwrap();
    let first = sample(&mut reused, &x0, 3);
    reused.set_condition(prefix(2, 21, 2, None, false)).unwrap();
    let second = sample(&mut reused, &x0, 3);
    let mut fresh = ActionExpert::load(&dir, &Device::Cpu).unwrap();
    fresh.set_condition(prefix(2, 21, 2, None, false)).unwrap();
    let want = sample(&mut fresh, &x0, 3);
    assert_eq!(vec(&second), vec(&want));
    assert_ne!(vec(&first), vec(&second));
    let _ = std::fs::remove_dir_all(&dir);
}

fn err_text<T: std::fmt::Debug>(r: flow_matching::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn caches_that_disagree_with_the_config_are_refused_naming_expected_and_got() {
    let qwen3 = golden_dir().join("expert-qwen3");
    let mut expert = ActionExpert::load(qwen3.join("model"), &Device::Cpu).unwrap();
    // Layers: the Qwen2 case's cache has 2, the Qwen3 expert 4.
    let two = PrefixCache::load(golden_dir().join("expert-qwen2-noise1/kv.safetensors")).unwrap();
    let e = err_text(expert.set_condition(two));
    assert!(e.contains("layer count is 2, expected 4"), "{e}");
    let mk = |heads: usize, hd: usize, rows: usize| {
        let t = Tensor::zeros((rows, heads, 8, hd), DType::F32, &Device::Cpu).unwrap();
        PrefixCache::from_tensors(&vec![t.clone(); 4], &vec![t; 4], None, None).unwrap()
    };
    let e = err_text(expert.set_condition(mk(3, 64, 1)));
    assert!(e.contains("kv heads is 3, expected 2"), "{e}");
    let e = err_text(expert.set_condition(mk(2, 32, 1)));
    assert!(e.contains("head_dim is 32, expected 64"), "{e}");
    // Batch: 4 cache rows cannot serve 6 samples.
    expert.set_condition(mk(2, 64, 4)).unwrap();
    let x0 = Tensor::zeros((6, 64, 2), DType::F32, &Device::Cpu).unwrap();
    let fm = FlowMatching::new(expert.x_dims()).unwrap();
    let opts = SampleOptions {
        x_init: Some(x0),
        ..Default::default()
    };
    for fast in [true, false] {
        expert.set_fast_path(fast);
        let e = err_text(fm.sample(6, &mut expert, &Device::Cpu, &opts));
        assert!(
            e.contains("batch (cache rows) is 4, expected 1 or a divisor of the 6"),
            "{e}"
        );
    }
    // Keys and values of different batches within one cache.
    let k = Tensor::zeros((2, 2, 8, 64), DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::zeros((1, 2, 8, 64), DType::F32, &Device::Cpu).unwrap();
    let e = err_text(PrefixCache::from_tensors(
        std::slice::from_ref(&k),
        &[v],
        None,
        None,
    ));
    assert!(
        e.contains("past_key_values.0.value shape is [1, 2, 8, 64], expected [2, 2, 8, 64]"),
        "{e}"
    );
    let m = Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap();
    let e = err_text(PrefixCache::from_tensors(
        std::slice::from_ref(&k),
        std::slice::from_ref(&k),
        None,
        Some(&m),
    ));
    assert!(
        e.contains("prefix_mask shape is [3, 8], expected [1 or 2, 8]"),
        "{e}"
    );
}

#[test]
fn missing_tensors_and_unknown_names_are_refused_naming_them() {
    let dir = synthetic("missing", "qwen2", "noise_at_0", "alpamayo", false);
    let st = dir.join("model.safetensors");
    let mut map = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    map.remove("expert.layers.1.self_attn.k_proj.bias");
    candle_core::safetensors::save(&map, &st).unwrap();
    let e = err_text(ActionExpert::load(&dir, &Device::Cpu));
    assert!(
        e.contains("missing tensor \"expert.layers.1.self_attn.k_proj.bias\""),
        "{e}"
    );
    // A cache without a layer's values.
    let kv = dir.join("kv.safetensors");
    let k = Tensor::zeros((1, 2, 4, 12), DType::F32, &Device::Cpu).unwrap();
    let cache: HashMap<String, Tensor> = [("past_key_values.0.key".to_string(), k)].into();
    candle_core::safetensors::save(&cache, &kv).unwrap();
    let e = err_text(PrefixCache::load(&kv));
    assert!(
        e.contains("missing tensor \"past_key_values.0.value\""),
        "{e}"
    );
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    for (from, to, want) in [
        (
            "\"qwen2\"",
            "\"gemma\"",
            "unknown decoder family \"gemma\"; expected one of: qwen3, qwen2",
        ),
        (
            "\"noise_at_0\"",
            "\"noise_at_half\"",
            "unknown time convention \"noise_at_half\"; expected one of: noise_at_0, noise_at_1",
        ),
        (
            "\"alpamayo_per_waypoint_v2\"",
            "\"mlp\"",
            "expected one of: alpamayo_per_waypoint_v2, linear",
        ),
        (
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 3",
            "does not divide",
        ),
    ] {
        let text = config.replace(from, to);
        assert_ne!(text, config, "{from}");
        let e = err_text(ExpertConfig::parse(&text, Path::new("config.json")));
        assert!(e.contains(want), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
