//! Speed of the sample-quality metrics at the sizes the eval command uses (target: MMD and
//! energy distance on 2000 × 2000 points of 64 dims well under a second each).

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion};
use flow_matching::flow_matching::randn;
use flow_matching::metrics::{
    energy_distance, mmd2_rbf, sliced_wasserstein, Bandwidth, MmdEstimator,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn metrics(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut g = c.benchmark_group("metrics");
    g.sample_size(10);
    for (n, d) in [(2000, 2), (2000, 64)] {
        let a = randn(&mut rng, &[n, d], DType::F32, &Device::Cpu).unwrap();
        let b = randn(&mut rng, &[n, d], DType::F32, &Device::Cpu).unwrap();
        g.bench_function(format!("mmd2_median_unbiased_{n}x{d}"), |bench| {
            bench.iter(|| mmd2_rbf(&a, &b, Bandwidth::Median, MmdEstimator::Unbiased).unwrap())
        });
        g.bench_function(format!("energy_{n}x{d}"), |bench| {
            bench.iter(|| energy_distance(&a, &b).unwrap())
        });
        g.bench_function(format!("sliced_w2_128_{n}x{d}"), |bench| {
            bench.iter(|| sliced_wasserstein(&a, &b, 128, 0).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, metrics);
criterion_main!(benches);
