//! Train a velocity-mlp on a `.npy` file from the library, save it, sample it back.
//!
//! ```text
//! cargo run --release --example train_npy [DATA.npy] [OUT.safetensors]
//! ```
//!
//! `DATA.npy` is `[N, *x_dims]` (float32/64 or integers). Without one, the example writes 4,000
//! points of a noisy ring to a temporary folder and trains on those. The sizes come from the
//! data (`Sizing::for_data`, what `flow-matching train` uses), reduced to 1,000 steps so the
//! example finishes in seconds; progress goes to a callback, never to the terminal by the
//! library itself.

use candle_core::{Device, Tensor};
use flow_matching::data::load_npy;
use flow_matching::train::{Sizing, TrainConfig, Trainer};
use flow_matching::{Diffusion, Error, FlowMatching, SampleOptions, VelocityMlpConfig, XDims};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn main() -> flow_matching::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let data_path = match args.get(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let mut rng = StdRng::seed_from_u64(0);
            let ring: Vec<f32> = (0..4000)
                .flat_map(|_| {
                    let a = rng.random::<f32>() * std::f32::consts::TAU;
                    let r = 2.0 + 0.1 * (rng.random::<f32>() - 0.5);
                    [r * a.cos(), r * a.sin()]
                })
                .collect();
            let path = tmp.path().join("ring.npy");
            flow_matching::io::write_npy(&path, &Tensor::from_vec(ring, (4000, 2), &dev)?)?;
            path
        }
    };
    let out_path = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("model.safetensors"));

    let data = load_npy(&data_path, None)?;
    let sizing = Sizing::for_data(Some(data.len()), data.x_dims().iter().product());
    let mut model = VelocityMlpConfig::new(XDims::new(data.x_dims().to_vec())?);
    (model.hidden, model.depth) = (sizing.hidden, sizing.depth);
    let config = TrainConfig {
        steps: sizing.steps.min(1000),
        batch_size: sizing.batch_size,
        ..TrainConfig::default()
    };
    // The library reports progress to a callback; the application decides what to show.
    let mut trainer = Trainer::new(model, config, &dev)?.with_progress(|p| {
        if p.done % 250 == 0 {
            eprintln!("step {}/{}: loss {:?}", p.done, p.total, p.loss);
        }
    });
    let out = trainer.train(|rng, b| data.random_batch(rng, b))?;
    out.model.save(&out_path)?;
    let (step, loss) = out.history.last().copied().unwrap_or((0, f32::NAN));
    println!(
        "trained {step} steps, last loss {loss:.4}, wrote {}",
        out_path.display()
    );

    let fm = FlowMatching::new(data.x_dims().to_vec())?;
    let mut v = out.model;
    let s = fm.sample(1000, &mut v, &dev, &SampleOptions::seeded(1))?;
    println!("sampled {:?}", s.x.dims());
    Ok(())
}
