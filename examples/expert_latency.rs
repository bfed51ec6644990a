//! One action-expert call at the issue's shape, timed: a Qwen3-style decoder (width 256,
//! 4 layers, 4/2 heads, head_dim 64, MLP 512) with the seed's in-projection, 6 futures of
//! 64 tokens, a 1,024-token prefix cache, 10 Euler steps, a fresh cache every call (random
//! weights: the arithmetic does not depend on them).
//!
//! `cargo run --release --example expert_latency [-- CALLS [PREFIX]]`

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flow_matching::model::expert::{ActionExpert, ExpertConfig, PrefixCache};
use flow_matching::{Diffusion, FlowMatching, SampleOptions};

const CONFIG: &str = r#"{"format": "flow-expert", "version": 1, "action_dims": [64, 2],
  "time_convention": "noise_at_0", "non_causal": true,
  "expert": {"family": "qwen3", "hidden_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "intermediate_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
  "action_in_proj": {"kind": "alpamayo_per_waypoint_v2", "hidden_size": 256,
    "num_enc_layers": 2, "max_freq": 100.0, "num_fourier_feats": 20},
  "action_out_proj": {"kind": "linear"}}"#;

fn main() -> flow_matching::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let calls: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(9);
    let prefix: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let dev = Device::Cpu;
    let cfg = ExpertConfig::parse(CONFIG, "config.json".as_ref())?;
    let mut map = HashMap::new();
    for (name, shape) in cfg.expected_shapes() {
        let t = (Tensor::randn(0f32, 0.05, shape.as_slice(), &dev)?
            + if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            })?;
        map.insert(name, t);
    }
    let dir = std::env::temp_dir().join(format!("fm-expert-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| flow_matching::Error::io(&dir, e))?;
    std::fs::write(dir.join("config.json"), CONFIG)
        .map_err(|e| flow_matching::Error::io(&dir, e))?;
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let mut expert = ActionExpert::load(&dir, &dev)?;
    let fm = FlowMatching::new(expert.x_dims())?.with_steps(10)?;
    let mut times = Vec::new();
    for call in 0..calls + 1 {
        // A fresh cache every call, made before the clock starts (the VLM's work).
        let kv: Vec<Tensor> = (0..8)
            .map(|_| Tensor::randn(0f32, 1.0, (1, 2, prefix, 64), &dev))
            .collect::<candle_core::Result<_>>()?;
        let (k, v): (Vec<_>, Vec<_>) = kv.chunks(2).map(|c| (c[0].clone(), c[1].clone())).unzip();
        let cache = PrefixCache::from_tensors(&k, &v, None, None)?;
        let t0 = Instant::now();
        expert.set_condition(cache)?;
        let s = fm.sample(6, &mut expert, &dev, &SampleOptions::seeded(call as u64))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(s.x.dims(), &[6, 64, 2]);
        if call > 0 {
            times.push(ms);
        }
    }
    // The same context again and again (the cache set once, outside the clock): what a new
    // context per call is compared against.
    let mut same = Vec::new();
    for call in 0..calls {
        let t0 = Instant::now();
        let s = fm.sample(6, &mut expert, &dev, &SampleOptions::seeded(call as u64))?;
        same.push(t0.elapsed().as_secs_f64() * 1e3);
        assert_eq!(s.x.dims(), &[6, 64, 2]);
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (med, lo, hi) = stats(times);
    let (smed, slo, shi) = stats(same);
    println!(
        "expert_b6_p{prefix}: a new cache every call: median {med:.1} ms over {calls} calls (min {lo:.1}, max {hi:.1}); \
         the same cache: median {smed:.1} ms (min {slo:.1}, max {shi:.1}); {} threads",
        flow_matching::kernel::available_threads()
    );
    let gflop = cfg.step_flops(6, prefix) * 10.0 / 1e9;
    let peak = flow_matching::kernel::peak::fma_peak_gflops();
    println!(
        "{gflop:.1} GFLOP a call: {:.0} GFLOP/s with a new cache, {:.0}% of the measured FMA peak ({peak:.0} GFLOP/s)",
        gflop / med * 1e3,
        100.0 * gflop / med * 1e3 / peak
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
