//! Sample-quality metrics between a real set and a generated set of points.
//!
//! Each takes two tensors `[N, *x_dims]` and `[M, *x_dims]` (any float dtype, any device;
//! samples are flattened to D = prod(x_dims) and computed in f64 on the CPU). MMD and the
//! energy distance look at all pairs (O((N + M)² D), through blocked matrix products, so
//! 2000 × 2000 points stay fast); the sliced Wasserstein distance is O(P (N + M) (D + log N))
//! for P projections. Non-finite samples give NaN rather than an error, so a diverged model
//! still gets a report.

use std::fmt;

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// Rows of `a` per block in the pairwise computations; bounds memory at 1024 × M doubles.
const BLOCK: usize = 1024;

/// Points kept (evenly strided) from the pooled sets for the median heuristic.
const MEDIAN_POINTS: usize = 1000;

/// The sliced 2-Wasserstein distance: sqrt of the mean over `projections` random unit
/// directions θ (drawn with `seed`) of W2²(θ·a, θ·b), the exact squared 2-Wasserstein
/// distance between the projected 1-D empirical distributions (sets may differ in size).
///
/// Two point masses x and y give `|x - y| / sqrt(D)` in expectation over directions
/// (exactly `|x - y|` when D = 1).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[[0f32], [1.0]], &Device::Cpu).unwrap();
/// let b = (&a + 3.0).unwrap();
/// let sw = flow_matching::metrics::sliced_wasserstein(&a, &b, 16, 0).unwrap();
/// assert!((sw - 3.0).abs() < 1e-9);
/// ```
pub fn sliced_wasserstein(a: &Tensor, b: &Tensor, projections: usize, seed: u64) -> Result<f64> {
    let (a, b) = pair(a, b)?;
    if projections == 0 {
        return Err(Error::invalid(
            "projections",
            0,
            "at least 1 random direction",
        ));
    }
    let d = a.dims()[1];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dirs = vec![0f64; d * projections];
    for p in 0..projections {
        // A standard normal vector, normalised, is uniform on the sphere; redraw the
        // (practically impossible) zero vector.
        loop {
            let v: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-12 {
                for (k, x) in v.iter().enumerate() {
                    dirs[k * projections + p] = x / norm;
                }
                break;
            }
        }
    }
    let dirs = Tensor::from_vec(dirs, (d, projections), &Device::Cpu)?;
    let pa = a.matmul(&dirs)?.t()?.contiguous()?.to_vec2::<f64>()?;
    let pb = b.matmul(&dirs)?.t()?.contiguous()?.to_vec2::<f64>()?;
    let mut total = 0.0;
    for (mut u, mut v) in pa.into_iter().zip(pb) {
        u.sort_unstable_by(f64::total_cmp);
        v.sort_unstable_by(f64::total_cmp);
        total += w2_squared_sorted(&u, &v);
    }
    Ok((total / projections as f64).sqrt())
}

/// W2² between two sorted 1-D samples: the integral over u in (0, 1) of the squared gap
/// between their quantile functions, which are step functions stepping at i/n and j/m.
fn w2_squared_sorted(u: &[f64], v: &[f64]) -> f64 {
    let (n, m) = (u.len(), v.len());
    let (mut i, mut j, mut prev, mut acc) = (0, 0, 0.0, 0.0);
    while i < n && j < m {
        // Compare (i + 1) / n with (j + 1) / m exactly, in integers.
        let (ei, ej) = ((i + 1) * m, (j + 1) * n);
        let next = ei.min(ej) as f64 / (n * m) as f64;
        acc += (next - prev) * (u[i] - v[j]).powi(2);
        prev = next;
        if ei <= ej {
            i += 1;
        }
        if ej <= ei {
            j += 1;
        }
    }
    acc
}

/// The bandwidth σ of the RBF kernel `k(x, y) = exp(-|x - y|² / (2σ²))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bandwidth {
    /// A given σ > 0.
    Fixed(f64),
    /// σ = the median pairwise distance in the pooled sets (see [`median_bandwidth`]).
    Median,
}

/// Which estimate of MMD² to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmdEstimator {
    /// The V-statistic: means over all pairs, self-pairs included; ≥ 0, exactly 0 for
    /// identical sets, biased upwards by O(1/N).
    Biased,
    /// The U-statistic: self-pairs left out of the within-set means; unbiased, so it can be
    /// slightly negative when the distributions agree. Needs at least 2 points per set.
    Unbiased,
}

/// The squared maximum mean discrepancy MMD² with an RBF kernel:
/// `mean k(a, a') + mean k(b, b') - 2 mean k(a, b)`, the within-set means taken as `estimator`
/// says.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::metrics::{mmd2_rbf, Bandwidth, MmdEstimator};
/// let a = Tensor::new(&[[0f32], [1.0]], &Device::Cpu).unwrap();
/// let m = mmd2_rbf(&a, &a, Bandwidth::Median, MmdEstimator::Biased).unwrap();
/// assert!(m.abs() < 1e-12);
/// ```
pub fn mmd2_rbf(
    a: &Tensor,
    b: &Tensor,
    bandwidth: Bandwidth,
    estimator: MmdEstimator,
) -> Result<f64> {
    let (a, b) = pair(a, b)?;
    let sigma = match bandwidth {
        Bandwidth::Fixed(s) if s > 0.0 && s.is_finite() => s,
        Bandwidth::Fixed(s) => {
            return Err(Error::invalid(
                "bandwidth",
                s,
                "a finite kernel width greater than 0",
            ))
        }
        Bandwidth::Median => median_of_rows(&a, &b)?,
    };
    let unbiased = estimator == MmdEstimator::Unbiased;
    if unbiased && (a.dims()[0] < 2 || b.dims()[0] < 2) {
        return Err(Error::invalid(
            "points",
            format!("{} and {}", a.dims()[0], b.dims()[0]),
            "at least 2 points in each set for the unbiased MMD estimate",
        ));
    }
    let gamma = 1.0 / (2.0 * sigma * sigma);
    let k = |d2: f64| (-gamma * d2).exp();
    let kaa = pair_mean(&a, &a, true, unbiased, k)?;
    let kbb = pair_mean(&b, &b, true, unbiased, k)?;
    let kab = pair_mean(&a, &b, false, false, k)?;
    Ok(kaa + kbb - 2.0 * kab)
}

/// The median heuristic's bandwidth: the median Euclidean distance between distinct points of
/// the pooled sets (over at most 1000 evenly strided points, to stay fast).
pub fn median_bandwidth(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = pair(a, b)?;
    median_of_rows(&a, &b)
}

fn median_of_rows(a: &Tensor, b: &Tensor) -> Result<f64> {
    let pooled = Tensor::cat(&[a, b], 0)?;
    let n = pooled.dims()[0];
    let stride = n.div_ceil(MEDIAN_POINTS);
    let rows = pooled.to_vec2::<f64>()?;
    let pts: Vec<&Vec<f64>> = rows.iter().step_by(stride).collect();
    let mut d2 = Vec::with_capacity(pts.len() * (pts.len().saturating_sub(1)) / 2);
    for (i, p) in pts.iter().enumerate() {
        for q in &pts[i + 1..] {
            d2.push(
                p.iter()
                    .zip(q.iter())
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f64>(),
            );
        }
    }
    if d2.is_empty() {
        return Err(Error::invalid(
            "points",
            n,
            "at least 2 points in all for the median bandwidth",
        ));
    }
    let mid = d2.len() / 2;
    let (_, m, _) = d2.select_nth_unstable_by(mid, f64::total_cmp);
    let sigma = m.sqrt();
    if sigma > 0.0 && sigma.is_finite() {
        Ok(sigma)
    } else {
        Err(Error::invalid(
            "bandwidth",
            sigma,
            "a median pairwise distance above 0 (are the points all equal?); give a fixed bandwidth",
        ))
    }
}

/// The energy distance `2 E|a - b| - E|a - a'| - E|b - b'|` (Euclidean norms; Székely's
/// squared form, not its square root as scipy returns in 1-D), as a V-statistic (all pairs,
/// self-pairs included), so it is ≥ 0 and exactly 0 for identical sets.
///
/// Point masses at x and y give `2|x - y|`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[[0f32, 0.0]], &Device::Cpu).unwrap();
/// let b = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
/// let e = flow_matching::metrics::energy_distance(&a, &b).unwrap();
/// assert!((e - 10.0).abs() < 1e-9);
/// ```
pub fn energy_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = pair(a, b)?;
    let dist = |d2: f64| d2.sqrt();
    let ab = pair_mean(&a, &b, false, false, dist)?;
    let aa = pair_mean(&a, &a, true, false, dist)?;
    let bb = pair_mean(&b, &b, true, false, dist)?;
    Ok(2.0 * ab - aa - bb)
}

/// The mean of `g(|x_i - y_j|²)` over pairs; for a set with itself (`same`), the diagonal is
/// exactly 0 and left out when `skip_diag`.
fn pair_mean(
    x: &Tensor,
    y: &Tensor,
    same: bool,
    skip_diag: bool,
    g: impl Fn(f64) -> f64,
) -> Result<f64> {
    let (n, m) = (x.dims()[0], y.dims()[0]);
    let nx = x.sqr()?.sum(D::Minus1)?.to_vec1::<f64>()?;
    let ny = y.sqr()?.sum(D::Minus1)?.to_vec1::<f64>()?;
    let yt = y.t()?.contiguous()?;
    let mut total = 0.0;
    for i0 in (0..n).step_by(BLOCK) {
        let r = BLOCK.min(n - i0);
        let gram = x
            .narrow(0, i0, r)?
            .matmul(&yt)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        for (di, row) in gram.chunks(m).enumerate() {
            let i = i0 + di;
            if same {
                // Symmetric: each pair above the diagonal counts twice; the diagonal is 0.
                if !skip_diag {
                    total += g(0.0);
                }
                for (j, &xy) in row.iter().enumerate().skip(i + 1) {
                    total += 2.0 * g((nx[i] + ny[j] - 2.0 * xy).max(0.0));
                }
            } else {
                for (j, &xy) in row.iter().enumerate() {
                    total += g((nx[i] + ny[j] - 2.0 * xy).max(0.0));
                }
            }
        }
    }
    let pairs = if skip_diag { n * (m - 1) } else { n * m };
    Ok(total / pairs as f64)
}

/// The fraction of generated samples whose nearest class centroid (class means of the real
/// samples, Euclidean distance) is the class they were generated for: a quick check that a
/// class-conditional model draws the class it is asked for.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let real = Tensor::new(&[[0f32], [2.0], [10.0], [12.0]], &Device::Cpu).unwrap();
/// let gen = Tensor::new(&[[1f32], [9.0], [3.0]], &Device::Cpu).unwrap();
/// let acc = flow_matching::metrics::nearest_centroid_accuracy(&real, &[0, 0, 1, 1], &gen, &[0, 1, 1])
///     .unwrap();
/// assert!((acc - 2.0 / 3.0).abs() < 1e-12);
/// ```
pub fn nearest_centroid_accuracy(
    real_x: &Tensor,
    real_labels: &[u32],
    gen_x: &Tensor,
    gen_labels: &[u32],
) -> Result<f64> {
    let (real, gen) = pair(real_x, gen_x)?;
    let (real, gen) = (real.to_vec2::<f64>()?, gen.to_vec2::<f64>()?);
    for (what, x, l) in [
        ("real labels", &real, real_labels),
        ("generated labels", &gen, gen_labels),
    ] {
        if l.len() != x.len() {
            return Err(Error::invalid(
                what,
                format!("{} labels", l.len()),
                format!("one label per sample ({})", x.len()),
            ));
        }
    }
    let k = real_labels.iter().max().map_or(0, |&m| m as usize + 1);
    let d = real[0].len();
    let mut sums = vec![vec![0f64; d]; k];
    let mut counts = vec![0usize; k];
    for (row, &c) in real.iter().zip(real_labels) {
        counts[c as usize] += 1;
        for (s, v) in sums[c as usize].iter_mut().zip(row) {
            *s += v;
        }
    }
    if let Some(&bad) = gen_labels
        .iter()
        .find(|&&c| c as usize >= k || counts[c as usize] == 0)
    {
        return Err(Error::invalid(
            "generated label",
            bad,
            "a class that occurs in the real labels (its centroid is needed)",
        ));
    }
    let centroids: Vec<Option<Vec<f64>>> = sums
        .into_iter()
        .zip(&counts)
        .map(|(s, &c)| (c > 0).then(|| s.into_iter().map(|v| v / c as f64).collect()))
        .collect();
    let mut hits = 0usize;
    for (row, &want) in gen.iter().zip(gen_labels) {
        let mut best = (f64::INFINITY, usize::MAX);
        for (c, cen) in centroids.iter().enumerate() {
            if let Some(cen) = cen {
                let d2: f64 = row.iter().zip(cen).map(|(x, y)| (x - y).powi(2)).sum();
                if d2 < best.0 {
                    best = (d2, c);
                }
            }
        }
        hits += usize::from(best.1 == want as usize);
    }
    Ok(hits as f64 / gen.len() as f64)
}

/// The distribution metrics of one comparison, for reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Sliced 2-Wasserstein distance ([`sliced_wasserstein`]).
    pub sliced_wasserstein: f64,
    /// Unbiased MMD² with the median-heuristic RBF kernel ([`mmd2_rbf`]).
    pub mmd2: f64,
    /// Energy distance ([`energy_distance`]).
    pub energy: f64,
}

/// Projections used by [`compare`].
pub const REPORT_PROJECTIONS: usize = 128;

/// Computes the three distribution metrics between `real` and `generated` (sliced Wasserstein
/// with [`REPORT_PROJECTIONS`] directions drawn with `seed`).
pub fn compare(real: &Tensor, generated: &Tensor, seed: u64) -> Result<Report> {
    Ok(Report {
        sliced_wasserstein: sliced_wasserstein(real, generated, REPORT_PROJECTIONS, seed)?,
        mmd2: mmd2_rbf(real, generated, Bandwidth::Median, MmdEstimator::Unbiased)?,
        energy: energy_distance(real, generated)?,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sliced W2 {:.4}  MMD² {:.5}  energy {:.4}",
            self.sliced_wasserstein, self.mmd2, self.energy
        )
    }
}

/// Both sets flattened to `[N, D]` f64 on the CPU, after checking they are non-empty and
/// share D.
fn pair(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let a = rows(a, "first set")?;
    let b = rows(b, "second set")?;
    if a.dims()[1] != b.dims()[1] {
        return Err(Error::Shape {
            what: "second set of points".into(),
            expected: format!("[M, {}] (the first set's sample size)", a.dims()[1]),
            got: b.dims().to_vec(),
        });
    }
    Ok((a, b))
}

fn rows(t: &Tensor, what: &str) -> Result<Tensor> {
    if t.rank() < 2 || t.dims().contains(&0) {
        return Err(Error::Shape {
            what: format!("metric input ({what})"),
            expected: "[N, *x_dims] with N >= 1".into(),
            got: t.dims().to_vec(),
        });
    }
    Ok(t.flatten_from(1)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .contiguous()?)
}
