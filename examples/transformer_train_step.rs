//! One training step's loss and gradients of the default waypoint transformer (`[64, 2]`, a
//! 5-number condition, 10% of rows dropped) at a given batch, by the fused CPU pass and by
//! candle's autograd: a sanity check of the speed-up and of the agreement, not a benchmark
//! (`flow-matching bench --figures train_traj_b256` is that).
//!
//! ```sh
//! cargo run --release --example transformer_train_step -- 256         # both
//! cargo run --release --example transformer_train_step -- 256 fused   # the fused step only (for perf)
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_matching::model::{transformer_grad, Condition, TransformerConfig, WaypointTransformer};
use flow_matching::train::autograd_loss_and_grads;
use flow_matching::{Result, XDims};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn main() -> Result<()> {
    let batch: usize = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|_| flow_matching::Error::invalid("batch", s, "a positive integer"))?,
        None => 256,
    };
    let dev = Device::Cpu;
    let cfg = TransformerConfig {
        cond_dims: Some(XDims::new(5)?),
        ..TransformerConfig::new(XDims::new([64, 2])?)
    };
    let model = WaypointTransformer::init(cfg, &VarMap::new(), &dev, 3)?;
    let mut rng = StdRng::seed_from_u64(0);
    let randn = |rng: &mut StdRng, d: &[usize]| {
        flow_matching::flow_matching::randn(rng, d, DType::F32, &dev)
    };
    let (x, target) = (
        randn(&mut rng, &[batch, 64, 2])?,
        randn(&mut rng, &[batch, 64, 2])?,
    );
    let t: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
    let t = Tensor::from_vec(t, batch, &dev)?;
    let keep: Vec<f32> = (0..batch)
        .map(|_| (rng.random::<f64>() >= 0.1) as u8 as f32)
        .collect();
    let cond = Condition::Features {
        values: randn(&mut rng, &[batch, 5])?,
        keep: Some(Tensor::from_vec(keep, batch, &dev)?),
    };
    let time = |f: &mut dyn FnMut() -> Result<f32>, reps: usize| -> Result<(f64, f32)> {
        let loss = f()?;
        let t0 = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        Ok((t0.elapsed().as_secs_f64() * 1e3 / reps as f64, loss))
    };
    let (fused_ms, fused_loss) = time(
        &mut || Ok(transformer_grad::loss_and_grads(&model, &x, &t, Some(&cond), &target)?.0),
        3,
    )?;
    if std::env::args().nth(2).as_deref() == Some("fused") {
        println!("batch {batch}: fused {fused_ms:.1} ms a step (loss {fused_loss})");
        return Ok(());
    }
    let (auto_ms, auto_loss) = time(
        &mut || Ok(autograd_loss_and_grads(&model, &x, &t, Some(&cond), &target)?.0),
        1,
    )?;
    println!(
        "batch {batch}: fused {fused_ms:.1} ms a step (loss {fused_loss}), candle autograd {auto_ms:.1} ms (loss {auto_loss}): {:.1}x",
        auto_ms / fused_ms
    );
    Ok(())
}
