//! Writes a user-style trajectory dataset that is NOT the built-in driving generator, for
//! checking that `train --data X.npy --cond C.npy` with default settings works on users'
//! files: 20,000 highway futures `[64, 2]` (normalised acceleration and curvature at 0.1 s)
//! with a 5-number condition, plus 500 held-out scenes with their true futures and the
//! oracle (6 fresh futures of the same process per held-out scene).
//!
//! ```text
//! cargo run --release --example highway_files -- OUT_DIR
//! ```
//!
//! writes `OUT_DIR/{X,C,test_X,test_C,test_v0,oracle}.npy`. Actions are normalised as
//! acceleration / 2 m/s² and curvature / 0.005 1/m (score with those scales).
//!
//! The process: a car on a curved multi-lane highway at 15–30 m/s keeps its lane (following
//! the road's curvature, easing off behind a slower car), changes lane left or right (a
//! sine-shaped curvature doublet of 3–5 s starting within 0–2 s, 3.5 m to the side), or brakes
//! hard behind a close slow car. Which lanes exist and the gap ahead set the probabilities.
//!
//! | condition | meaning |
//! | ---: | --- |
//! | 0 | `(v0 - 22.5) / 4` (speed, m/s) |
//! | 1 | `+1` when a lane exists on the left, else `-1` |
//! | 2 | `+1` when a lane exists on the right, else `-1` |
//! | 3 | `(gap - 45) / 20` (gap to the slower car ahead, m, 10–80) |
//! | 4 | `road curvature / 0.005` (1/m, within ±0.01) |

use std::f64::consts::PI;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use flow_matching::io::write_npy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const T: usize = 64;
const DT: f64 = 0.1;
const ACCEL_STD: f64 = 2.0;
const CURV_STD: f64 = 0.005;

#[derive(Clone, Copy)]
struct Scene {
    v0: f64,
    left: bool,
    right: bool,
    gap: f64,
    road: f64,
}

impl Scene {
    fn draw(rng: &mut StdRng) -> Scene {
        Scene {
            v0: rng.random_range(15.0..30.0),
            left: rng.random_bool(0.5),
            right: rng.random_bool(0.5),
            gap: rng.random_range(10.0..80.0),
            road: rng.random_range(-0.01..0.01),
        }
    }

    fn cond(&self) -> [f32; 5] {
        let pm = |b: bool| if b { 1.0 } else { -1.0 };
        [
            ((self.v0 - 22.5) / 4.0) as f32,
            pm(self.left),
            pm(self.right),
            ((self.gap - 45.0) / 20.0) as f32,
            (self.road / CURV_STD) as f32,
        ]
    }

    /// One future: normalised (a, κ) for 64 steps.
    fn future(&self, rng: &mut StdRng) -> Vec<f32> {
        // Closer slow cars make the driver leave the lane or brake.
        let urgency = ((60.0 - self.gap) / 50.0).clamp(0.0, 1.0);
        let w = [
            1.0 - 0.6 * urgency,                                // keep
            if self.left { 0.3 + urgency } else { 0.0 },        // left
            if self.right { 0.2 + 0.6 * urgency } else { 0.0 }, // right
            0.05 + 0.8 * urgency * urgency,                     // brake
        ];
        let total: f64 = w.iter().sum();
        let mut u = rng.random::<f64>() * total;
        let mut mode = 0;
        for (i, wi) in w.iter().enumerate() {
            if u < *wi {
                mode = i;
                break;
            }
            u -= wi;
        }
        let start = rng.random_range(0.0..2.0);
        let dur = rng.random_range(3.0..5.0);
        let lead = self.v0 * rng.random_range(0.6..0.9);
        let brake = rng.random_range(2.0..5.0);
        let jitter = rng.random_range(-0.0005..0.0005);
        let mut v = self.v0;
        let mut out = Vec::with_capacity(2 * T);
        for k in 0..T {
            let t = k as f64 * DT;
            let mut kappa = self.road + jitter;
            let mut a = match mode {
                3 => {
                    if t > 0.3 * start {
                        -brake
                    } else {
                        0.0
                    }
                }
                0 => (0.3 * (lead - v) * urgency).clamp(-3.0, 1.0),
                _ => 0.3,
            };
            if mode == 1 || mode == 2 {
                let s = (t - start) / dur;
                if (0.0..1.0).contains(&s) {
                    // Lateral y = L (s - sin(2πs) / 2π): y'' = L 2π sin(2πs) / dur², κ ≈ y'' / v².
                    let side = if mode == 1 { 1.0 } else { -1.0 };
                    kappa += side * 3.5 * 2.0 * PI * (2.0 * PI * s).sin() / (dur * dur * v * v);
                }
            }
            a = a.max(-v / DT);
            out.push((a / ACCEL_STD) as f32);
            out.push((kappa / CURV_STD) as f32);
            v += a * DT;
        }
        out
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "highway".into()));
    std::fs::create_dir_all(&dir)?;
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(2024);
    let (n, n_test, k) = (20_000, 500, 6);
    let (mut x, mut c) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let s = Scene::draw(&mut rng);
        x.extend(s.future(&mut rng));
        c.extend(s.cond());
    }
    write_npy(dir.join("X.npy"), &Tensor::from_vec(x, (n, T, 2), &dev)?)?;
    write_npy(dir.join("C.npy"), &Tensor::from_vec(c, (n, 5), &dev)?)?;
    let (mut tx, mut tc, mut tv, mut oracle) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n_test {
        let s = Scene::draw(&mut rng);
        tx.extend(s.future(&mut rng));
        tc.extend(s.cond());
        tv.push(s.v0 as f32);
        for _ in 0..k {
            oracle.extend(s.future(&mut rng));
        }
    }
    write_npy(
        dir.join("test_X.npy"),
        &Tensor::from_vec(tx, (n_test, T, 2), &dev)?,
    )?;
    write_npy(
        dir.join("test_C.npy"),
        &Tensor::from_vec(tc, (n_test, 5), &dev)?,
    )?;
    write_npy(
        dir.join("test_v0.npy"),
        &Tensor::from_vec(tv, n_test, &dev)?,
    )?;
    write_npy(
        dir.join("oracle.npy"),
        &Tensor::from_vec(oracle, (n_test * k, T, 2), &dev)?,
    )?;
    println!(
        "wrote {}/{{X,C,test_X,test_C,test_v0,oracle}}.npy: {n} training futures, {n_test} held-out scenes, {k} oracle draws each",
        dir.display()
    );
    Ok(())
}
