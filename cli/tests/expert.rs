//! `sample --model DIR --cond kv.safetensors`: an action expert over a prefix KV cache, in
//! both time conventions, against the PyTorch reference cases.

mod support;

use candle_core::Tensor;
use support::{golden, golden_str, run_text, tmp};

fn read(path: &std::path::Path) -> Vec<f32> {
    Tensor::read_npy(path)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn sample_runs_an_expert_over_its_cache_in_either_convention() {
    for case in ["expert-qwen3", "expert-qwen2-noise1"] {
        let out = tmp(&format!("{case}-out.npy"));
        let (ok, _, err) = run_text(&[
            "sample",
            "--model",
            &golden_str(&format!("{case}/model")),
            "--cond",
            &golden_str(&format!("{case}/kv.safetensors")),
            "--x-init",
            &golden_str(&format!("{case}/x_init.npy")),
            "--steps",
            "10",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{case}: {err}");
        let got = read(&out);
        let want = read(&golden(&format!("{case}/expected_final.npy")));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 + 1e-3 * w.abs(),
                "{case} [{i}]: {g} vs {w}"
            );
        }
        let _ = std::fs::remove_file(&out);
    }
}

#[test]
fn per_cond_draws_k_samples_for_the_cache_row_and_bad_input_is_one_line() {
    let model = golden_str("expert-qwen3/model");
    let kv = golden_str("expert-qwen3/kv.safetensors");
    let out = tmp("expert-per-cond.npy");
    let o = out.to_str().unwrap();
    let (ok, _, err) = run_text(&[
        "sample",
        "--model",
        &model,
        "--cond",
        &kv,
        "--per-cond",
        "3",
        "--steps",
        "2",
        "--out",
        o,
    ]);
    assert!(ok, "{err}");
    assert_eq!(Tensor::read_npy(&out).unwrap().dims(), &[3, 64, 2]);
    let _ = std::fs::remove_file(&out);
    // A cache of another expert (2 layers, not 4).
    let other = golden_str("expert-qwen2-noise1/kv.safetensors");
    let (ok, _, err) = run_text(&["sample", "--model", &model, "--cond", &other, "--out", o]);
    assert!(!ok);
    assert!(err.contains("layer count is 2, expected 4"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, _, err) = run_text(&["sample", "--model", &model, "--out", o]);
    assert!(!ok);
    assert!(err.contains("--cond kv.safetensors"), "{err}");
}
