//! The FMA peak of this machine, measured: independent fused multiply-add chains on the chosen
//! kernel path, on every pool thread at once. Benchmarks report their GFLOP/s as a fraction of
//! it, so the figure means the same on a Zen 5 and on a Xeon.

use super::{kernel_path, KernelPath};

/// Independent accumulators: enough to cover the FMA latency on two ports.
const CHAINS: usize = 12;

/// FMA iterations per timed block.
const ITERS: usize = 1 << 20;

/// The portable path's rate: `CHAINS` chains of `ITERS` multiply-and-adds of `W` lanes; returns
/// a value that depends on every chain so nothing is optimised away.
fn chains<const W: usize>() -> f32 {
    let mut acc = [[1.0f32; W]; CHAINS];
    let (a, b) = (
        std::hint::black_box(0.999_9f32),
        std::hint::black_box(1e-4f32),
    );
    for _ in 0..ITERS {
        for c in acc.iter_mut() {
            for v in c.iter_mut() {
                // A multiply and an add, as the portable kernels do (mul_add without the FMA
                // instruction would call libm).
                *v = *v * a + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

/// One thread's FMA rate on `path` in GFLOP/s (2 FLOP per lane per FMA).
fn one_thread(path: KernelPath) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // Explicit vectors: the compiler does not keep 12 lane arrays of a generic loop in
        // registers.
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wider() -> f32 {
            let a = _mm512_set1_ps(std::hint::black_box(0.999_9));
            let b = _mm512_set1_ps(std::hint::black_box(1e-4));
            let mut acc = [_mm512_set1_ps(1.0); CHAINS];
            for _ in 0..ITERS {
                for c in acc.iter_mut() {
                    *c = _mm512_fmadd_ps(*c, a, b);
                }
            }
            acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide() -> f32 {
            let a = _mm256_set1_ps(std::hint::black_box(0.999_9));
            let b = _mm256_set1_ps(std::hint::black_box(1e-4));
            let mut acc = [_mm256_set1_ps(1.0); CHAINS];
            for _ in 0..ITERS {
                for c in acc.iter_mut() {
                    *c = _mm256_fmadd_ps(*c, a, b);
                }
            }
            let mut out = [0f32; 8];
            let mut sum = 0.0;
            for c in acc {
                _mm256_storeu_ps(out.as_mut_ptr(), c);
                sum += out.iter().sum::<f32>();
            }
            sum
        }
        let (lanes, run): (usize, fn() -> f32) = match path {
            // SAFETY: callers pass supported paths only.
            KernelPath::Avx512 => (16, || unsafe { wider() }),
            // SAFETY: as above.
            KernelPath::Avx2 => (8, || unsafe { wide() }),
            KernelPath::Portable => (4, chains::<4>),
        };
        return rate(lanes, run);
    }
    #[allow(unreachable_code)]
    rate(4, chains::<4>)
}

/// The best of three timed blocks, in GFLOP/s.
fn rate(lanes: usize, run: fn() -> f32) -> f64 {
    std::hint::black_box(run());
    let flop = (2 * lanes * CHAINS * ITERS) as f64;
    (0..3)
        .map(|_| {
            let t0 = std::time::Instant::now();
            std::hint::black_box(run());
            flop / t0.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// The measured FMA peak of every thread of the pool ([`super::available_threads`]) together, on the chosen kernel path, in
/// GFLOP/s (about a second of work; run it on a quiet machine).
///
/// ```no_run
/// let peak = flow_matching::kernel::peak::fma_peak_gflops();
/// assert!(peak > 0.0);
/// ```
pub fn fma_peak_gflops() -> f64 {
    let path = kernel_path();
    // On every pool thread at the same time: two threads may share a core's FMA units.
    rayon::broadcast(|_| one_thread(path)).into_iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_chains_stay_at_their_fixed_point() {
        // x -> 0.9999 x + 1e-4 has its fixed point at 1: every lane of every chain stays there.
        let s = chains::<4>();
        assert!((s - (4 * CHAINS) as f32).abs() < 1e-2, "{s}");
    }
}
