//! Run an ONNX velocity network as the step function, with a new condition every call.
//!
//! ```text
//! cargo run --release --features onnx --example onnx_step -- [NET.onnx] [COND.npy]
//! ```
//!
//! Without arguments it runs the repository's test network `tests/data/onnx/traj.onnx` (a
//! small waypoint transformer with cross-attention to a `ctx` input `[B, 16, 32]`, exported by
//! `tests/data/onnx/nets.py`) on `tests/data/onnx/traj_ctx.npy`. A network with one condition
//! input takes `COND.npy` for it (one row, broadcast to the 6 samples); a network without one
//! samples unconditionally. Every call sets the condition anew, as a control loop does.

use std::time::Instant;

use candle_core::Device;
use flow_matching::onnx::OnnxStep;
use flow_matching::{Diffusion, FlowMatching, SampleOptions};

fn main() -> flow_matching::Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let args: Vec<String> = std::env::args().collect();
    let net = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| format!("{root}/tests/data/onnx/traj.onnx"));
    let cond_file = args
        .get(2)
        .cloned()
        .or_else(|| (args.len() < 2).then(|| format!("{root}/tests/data/onnx/traj_ctx.npy")));
    let dev = Device::Cpu;
    let mut v = OnnxStep::load(&net)?;
    let cond_name = v.condition_inputs().first().map(|i| i.name.clone());
    let cond = match (&cond_name, &cond_file) {
        (Some(_), Some(f)) => Some(flow_matching::io::read_npy(f, &dev)?),
        _ => None,
    };
    let fm = FlowMatching::new(v.x_dims())?; // 10 Euler steps
    for tick in 0..5u64 {
        let start = Instant::now();
        if let (Some(name), Some(c)) = (&cond_name, &cond) {
            // A new context each tick (here the same values scaled, to show the call).
            let c = (c * (1.0 + 0.1 * tick as f64))?;
            v.set_condition(name, &c)?;
        }
        let s = fm.sample(6, &mut v, &dev, &SampleOptions::seeded(tick))?;
        println!(
            "tick {tick}: {:?} in {:.2} ms",
            s.x.dims(),
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
