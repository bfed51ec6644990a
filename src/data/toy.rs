//! Two-dimensional toy distributions, drawn fresh from a seeded generator.

use std::f32::consts::PI;
use std::fmt;

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// A 2-D toy distribution; every one fits roughly in the box [-3, 3]².
///
/// | name | shape | extent (noise aside); per-coordinate std |
/// | --- | --- | --- |
/// | `moons` | two interleaved half circles of radius 2, noise std 0.1; labels 0 (upper), 1 (lower) | x in [-3, 3], y in [-1.5, 1.5]; std 1.73, 0.99 |
/// | `8gaussians` | eight Gaussians (std 0.2) at radius 2, every 45 degrees | [-2, 2]²; std 1.43 |
/// | `checkerboard` | uniform on 8 of the 16 cells of a 4×4 board over [-3, 3]² | [-3, 3]²; std 1.73 |
/// | `circles` | circles of radius 2 and 1 (half the points each), noise std 0.1 | [-2, 2]²; std 1.12 |
/// | `swissroll` | spiral of radius t/5 at angle t, t in [1.5π, 4.5π], shifted by -0.4 in x to centre it, noise std 0.1 | x in [-2.6, 2.4], y in [-2.5, 3.1]; std 1.33, 1.39 |
///
/// All means are within 0.05 of the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Toy {
    /// Two interleaved half circles, labelled 0 (upper) and 1 (lower).
    Moons,
    /// Eight Gaussians on a circle.
    EightGaussians,
    /// A checkerboard of uniform squares.
    Checkerboard,
    /// Two concentric noisy circles.
    Circles,
    /// A noisy 2-D swiss roll (spiral).
    SwissRoll,
}

impl Toy {
    /// Every toy, in the order their names are listed in messages.
    pub const ALL: [Toy; 5] = [
        Toy::Moons,
        Toy::EightGaussians,
        Toy::Checkerboard,
        Toy::Circles,
        Toy::SwissRoll,
    ];

    /// The toy's name as parsed by [`Toy::from_name`].
    pub fn name(self) -> &'static str {
        match self {
            Toy::Moons => "moons",
            Toy::EightGaussians => "8gaussians",
            Toy::Checkerboard => "checkerboard",
            Toy::Circles => "circles",
            Toy::SwissRoll => "swissroll",
        }
    }

    /// The toy with this name, or `None`.
    pub fn from_name(name: &str) -> Option<Toy> {
        Toy::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The number of classes its labels take (2 for `moons`, 0 for the unlabelled toys).
    pub fn num_classes(self) -> usize {
        match self {
            Toy::Moons => 2,
            _ => 0,
        }
    }

    /// Draws `n` points as an f32 tensor `[n, 2]` on the CPU.
    ///
    /// ```
    /// use flow_matching::data::Toy;
    /// use rand::{rngs::StdRng, SeedableRng};
    /// let x = Toy::Moons.sample(100, &mut StdRng::seed_from_u64(0)).unwrap();
    /// assert_eq!(x.dims(), &[100, 2]);
    /// ```
    pub fn sample<R: Rng + ?Sized>(self, n: usize, rng: &mut R) -> Result<Tensor> {
        Ok(self.sample_labeled(n, rng)?.0)
    }

    /// Draws `n` points `[n, 2]` with their class labels (`Some` only for `moons`).
    pub fn sample_labeled<R: Rng + ?Sized>(
        self,
        n: usize,
        rng: &mut R,
    ) -> Result<(Tensor, Option<Vec<u32>>)> {
        if n == 0 {
            return Err(Error::ZeroBatch);
        }
        let mut xy = Vec::with_capacity(2 * n);
        let mut labels = Vec::new();
        for _ in 0..n {
            let (p, label) = self.point(rng);
            xy.extend_from_slice(&p);
            if let Some(l) = label {
                labels.push(l);
            }
        }
        let x = Tensor::from_vec(xy, (n, 2), &Device::Cpu)?;
        Ok((x, (self.num_classes() > 0).then_some(labels)))
    }

    /// One point and, for labelled toys, its class.
    fn point<R: Rng + ?Sized>(self, rng: &mut R) -> ([f32; 2], Option<u32>) {
        let mut normal = || -> f32 { StandardNormal.sample(rng) };
        match self {
            Toy::Moons => {
                // sklearn's make_moons (outer arc centred at the origin, inner arc shifted by
                // (1, -0.5)), centred on (0.5, 0.25) and doubled to span [-3, 3].
                let (n1, n2) = (normal(), normal());
                let upper = rng.random_bool(0.5);
                let t = rng.random_range(0.0..PI);
                let (x, y) = if upper {
                    (t.cos(), t.sin())
                } else {
                    (1.0 - t.cos(), 0.5 - t.sin())
                };
                (
                    [2.0 * (x - 0.5) + 0.1 * n1, 2.0 * (y - 0.25) + 0.1 * n2],
                    Some(u32::from(!upper)),
                )
            }
            Toy::EightGaussians => {
                let (n1, n2) = (normal(), normal());
                let k = rng.random_range(0..8u32) as f32;
                let a = k * PI / 4.0;
                ([2.0 * a.cos() + 0.2 * n1, 2.0 * a.sin() + 0.2 * n2], None)
            }
            Toy::Checkerboard => {
                // Cell (i, j) of the 4×4 board is filled when i + j is even.
                let i = rng.random_range(0..4u32);
                let j = 2 * rng.random_range(0..2u32) + (i % 2);
                let u: f32 = rng.random();
                let v: f32 = rng.random();
                let cell = 1.5;
                (
                    [-3.0 + cell * (i as f32 + u), -3.0 + cell * (j as f32 + v)],
                    None,
                )
            }
            Toy::Circles => {
                let (n1, n2) = (normal(), normal());
                let r = if rng.random_bool(0.5) { 2.0 } else { 1.0 };
                let a = rng.random_range(0.0..2.0 * PI);
                ([r * a.cos() + 0.1 * n1, r * a.sin() + 0.1 * n2], None)
            }
            Toy::SwissRoll => {
                let (n1, n2) = (normal(), normal());
                // sklearn's make_swiss_roll (x, z) plane, divided by 5 and centred.
                let t = 1.5 * PI * (1.0 + 2.0 * rng.random::<f32>());
                (
                    [
                        t * t.cos() / 5.0 - 0.4 + 0.1 * n1,
                        t * t.sin() / 5.0 + 0.1 * n2,
                    ],
                    None,
                )
            }
        }
    }
}

impl fmt::Display for Toy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
