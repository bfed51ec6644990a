//! Writes a 2-D data set that is not among the built-ins, for checking the training defaults
//! on "user" data: a two-armed spiral inside a ring (thin arms, noise std 0.06).
//!
//! `cargo run --release --example user_data -- OUT.npy ROWS SEED` (defaults: user.npy, 20000, 0).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn main() -> flow_matching::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).map_or("user.npy", String::as_str);
    let rows: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(2 * rows);
    for _ in 0..rows {
        let (x, y) = if rng.random::<f64>() < 0.65 {
            // Spiral arm: radius grows with the angle; the second arm is the first rotated by π.
            let s: f64 = rng.random::<f64>().sqrt();
            let a = 0.5 + 3.0 * std::f64::consts::PI * s;
            let r = 0.25 + 0.7 * a / std::f64::consts::PI;
            let flip = if rng.random::<bool>() { 1.0 } else { -1.0 };
            (flip * r * a.cos(), flip * r * a.sin())
        } else {
            // The ring around it.
            let a = rng.random::<f64>() * 2.0 * std::f64::consts::PI;
            (3.0 * a.cos(), 3.0 * a.sin())
        };
        // Two standard normals by Box–Muller.
        let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
        let r = (-2.0 * u1.ln()).sqrt();
        let (nx, ny) = (
            r * (2.0 * std::f64::consts::PI * u2).cos(),
            r * (2.0 * std::f64::consts::PI * u2).sin(),
        );
        v.push((x + 0.06 * nx) as f32);
        v.push((y + 0.06 * ny) as f32);
    }
    let t = Tensor::from_vec(v, (rows, 2), &Device::Cpu)?;
    flow_matching::io::write_npy(out, &t)?;
    eprintln!("wrote {rows} rows to {out}");
    Ok(())
}
