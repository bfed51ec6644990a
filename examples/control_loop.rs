//! The control-loop shape: load a model file once, then every tick sample 6 futures for a new
//! condition, and time each tick.
//!
//! ```text
//! cargo run --release --example control_loop [MODEL.safetensors] [TICKS]
//! ```
//!
//! Without a model file it writes a freshly initialised conditional velocity-mlp (futures
//! `[64, 2]`, a 7-number condition, hidden 256, depth 3) to a temporary folder and loads that,
//! as a service loads the file training wrote. Each tick draws a new condition row, repeats it
//! for 6 samples (`repeat_per_cond`), and runs 10 Euler steps; the loop prints the median and
//! the slowest tick. The model's packed weights are built on the first tick and reused.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_matching::condition::repeat_per_cond;
use flow_matching::{
    Diffusion, Error, FlowMatching, SampleOptions, VelocityMlp, VelocityMlpConfig, XDims,
};

fn main() -> flow_matching::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let path = match args.get(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let mut config = VelocityMlpConfig::new(XDims::new([64, 2])?);
            config.cond_dims = Some(XDims::new(7)?);
            let path = tmp.path().join("policy.safetensors");
            VelocityMlp::init(config, &VarMap::new(), &dev, 0)?.save(&path)?;
            path
        }
    };
    let ticks: usize = match args.get(2) {
        Some(n) => n
            .parse()
            .map_err(|_| Error::invalid("TICKS", n, "a count of ticks"))?,
        None => 200,
    };
    let model = VelocityMlp::load(&path, &dev)?;
    let cond_len = model
        .config()
        .cond_dims
        .as_ref()
        .map(|c| c.numel())
        .ok_or_else(|| {
            Error::invalid(
                "MODEL",
                path.display(),
                "a model with a continuous condition",
            )
        })?;
    let fm = FlowMatching::new(&model.config().x_dims)?; // 10 Euler steps, the seed's default
    let mut times = Vec::with_capacity(ticks);
    for tick in 0..ticks {
        // A new scene every tick: in a service this is the sensor's latest state.
        let c: Vec<f32> = (0..cond_len)
            .map(|i| ((tick * 7 + i) as f32 * 0.37).sin())
            .collect();
        let start = Instant::now();
        let scene = Tensor::from_vec(c, (1, cond_len), &dev)?;
        let cond = repeat_per_cond(&scene, 6)?;
        let mut v = model.with_condition(&cond)?;
        let out = fm.sample(6, &mut v, &dev, &SampleOptions::seeded(tick as u64))?;
        let futures = out.x.to_dtype(DType::F32)?; // [6, 64, 2]: hand these to the planner
        times.push(start.elapsed().as_secs_f64() * 1e3);
        debug_assert_eq!(futures.dims(), &[6, 64, 2]);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{ticks} ticks of 6 futures, Euler 10 steps: median {:.3} ms, slowest {:.3} ms",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    Ok(())
}
