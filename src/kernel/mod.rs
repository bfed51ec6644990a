//! Fused f32 CPU kernels for the velocity-mlp: matmuls over the `gemm` crate, fused bias and
//! SiLU (forward and backward), small dot-product kernels, and the thread policy.
//!
//! Plain candle spends most of a small-batch step in thread hand-offs and most of a large-batch
//! training step in single-threaded elementwise ops (shared/notes/candle-on-cpu.md); these
//! kernels work on preallocated slices instead.

pub mod euler;
pub mod mlp;

/// Rows per thread below which splitting a batch costs more than it saves (measured with
/// `flow-matching bench` on the 2-core reference machine: a 64-row step takes ~0.1 ms, about
/// the cost of waking a second thread twice).
pub const MIN_ROWS_PER_THREAD: usize = 128;

/// How many threads a batch of `batch` rows should use when `available` are there: one below
/// `2 * MIN_ROWS_PER_THREAD` rows, else as many as keep `MIN_ROWS_PER_THREAD` rows each.
///
/// ```
/// use flow_matching::kernel::threads_for_batch;
/// assert_eq!(threads_for_batch(1, 2), 1);
/// assert_eq!(threads_for_batch(4096, 2), 2);
/// ```
pub fn threads_for_batch(batch: usize, available: usize) -> usize {
    let by_rows = batch / MIN_ROWS_PER_THREAD;
    by_rows.clamp(1, available.max(1))
}

/// The number of threads the global pool offers (rayon's, which candle also uses).
pub fn available_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Calls `$body` compiled for AVX2+FMA when the CPU has it, else the portable build; the
/// crate itself is compiled for baseline x86-64, which has no wide vectors.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features `wide` was compiled for were just detected.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// `exp(x)` for f32 without branches, so loops over it vectorize (Cephes' expf polynomial,
/// within 2 ulp; inputs are clamped to [-88, 88]).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-88.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

simd_dispatch! {
    /// `a = silu(z)` and `s = sigmoid(z)` in place of `z` and `s` (the backward pass needs `s`).
    fn silu_keep(z: &mut [f32], s: &mut [f32]) {
        for (zi, si) in z.iter_mut().zip(s.iter_mut()) {
            let sig = 1.0 / (1.0 + exp_approx(-*zi));
            *si = sig;
            *zi *= sig;
        }
    }
}

simd_dispatch! {
    /// `z = silu(z)` in place.
    fn silu_inplace(z: &mut [f32]) {
        for zi in z.iter_mut() {
            *zi /= 1.0 + exp_approx(-*zi);
        }
    }
}

simd_dispatch! {
    /// `g *= silu'(z)` with `silu'(z) = s + a (1 - s)`, from the kept `a = silu(z)` and `s`.
    fn silu_backward(g: &mut [f32], a: &[f32], s: &[f32]) {
        for ((gi, ai), si) in g.iter_mut().zip(a).zip(s) {
            *gi *= *si + *ai * (1.0 - *si);
        }
    }
}

simd_dispatch! {
    /// The dot product of two equal-length slices, with 32 partial sums so it vectorizes.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 32];
        let ca = a.chunks_exact(32);
        let cb = b.chunks_exact(32);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..32 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = 0f32;
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        for l in 0..16 {
            acc[l] += acc[l + 16];
        }
        for l in 0..8 {
            acc[l] += acc[l + 8];
        }
        s + acc[..8].iter().sum::<f32>()
    }
}

simd_dispatch! {
    /// `y += a * x`.
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * *xi;
        }
    }
}

simd_dispatch! {
    /// `y += x`.
    fn add_assign(y: &mut [f32], x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += *xi;
        }
    }
}

/// `out[j] = bias[j] + dot(w[j, :], a)` for a row-major `w` `[n, a.len()]`: one row through a
/// linear layer, the fast form for a single row or a narrow output.
pub fn matvec_bias(w: &[f32], bias: &[f32], a: &[f32], out: &mut [f32]) {
    let k = a.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = bias[j] + dot(&w[j * k..(j + 1) * k], a);
    }
}

/// `y[m, n] (+)= x[m, k] * w[n, k]^T` with row-major slices; with `accumulate` the product is
/// added to what `y` holds (a bias already broadcast into it).
/// `w`'s rows are `w_rs` long (at least `k`): the first `k` columns of a wider matrix.
#[allow(clippy::too_many_arguments)]
pub fn matmul_wt(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    w_rs: usize,
    accumulate: bool,
) {
    assert!(y.len() >= m * n && x.len() >= m * k && w_rs >= k && w.len() >= (n - 1) * w_rs + k);
    // SAFETY: the asserts bound every index gemm touches: y is m x n (rs n), x is m x k
    // (rs k), w^T is k x n read as w[j * w_rs + i].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            w_rs as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `dw[n, k] += g[m, n]^T * a[m, k]`: a weight gradient summed over the rows.
pub fn matmul_tn_acc(dw: &mut [f32], g: &[f32], a: &[f32], m: usize, n: usize, k: usize) {
    assert!(dw.len() >= n * k && g.len() >= m * n && a.len() >= m * k);
    // SAFETY: bounds as asserted; g^T is n x m read as g[r * n + j], a is m x k (rs k).
    unsafe {
        gemm::gemm(
            n,
            k,
            m,
            dw.as_mut_ptr(),
            1,
            k as isize,
            true,
            g.as_ptr(),
            n as isize,
            1,
            a.as_ptr(),
            1,
            k as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `da[m, k] = g[m, n] * w[n, k]` (the input gradient of a linear layer), with `w` read from
/// column `col0` of a row-major matrix whose rows are `w_rs` long.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(
    da: &mut [f32],
    g: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    w_rs: usize,
    col0: usize,
) {
    assert!(da.len() >= m * k && g.len() >= m * n && w.len() >= (n - 1) * w_rs + col0 + k);
    // SAFETY: bounds as asserted; w is n x k read as w[j * w_rs + col0 + i].
    unsafe {
        gemm::gemm(
            m,
            k,
            n,
            da.as_mut_ptr(),
            1,
            k as isize,
            false,
            g.as_ptr(),
            1,
            n as isize,
            w.as_ptr().add(col0),
            1,
            w_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_matches_std_within_2_ulp_scale() {
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp_approx(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "x = {x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn silu_kernels_match_closed_forms() {
        let z: Vec<f32> = (-50..50).map(|i| i as f32 * 0.37).collect();
        let mut a = z.clone();
        let mut s = vec![0.0; z.len()];
        silu_keep(&mut a, &mut s);
        let mut b = z.clone();
        silu_inplace(&mut b);
        let mut g = vec![1.0; z.len()];
        silu_backward(&mut g, &a, &s);
        for i in 0..z.len() {
            let sig = 1.0 / (1.0 + (-z[i] as f64).exp());
            let want = z[i] as f64 * sig;
            assert!((a[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()));
            assert!((b[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()));
            let dwant = sig * (1.0 + z[i] as f64 * (1.0 - sig));
            assert!((g[i] as f64 - dwant).abs() < 1e-6, "{} vs {dwant}", g[i]);
        }
    }

    #[test]
    fn thread_policy_keeps_small_batches_on_one_thread() {
        assert_eq!(threads_for_batch(1, 2), 1);
        assert_eq!(threads_for_batch(64, 2), 1);
        assert_eq!(threads_for_batch(2 * MIN_ROWS_PER_THREAD - 1, 2), 1);
        assert_eq!(threads_for_batch(2 * MIN_ROWS_PER_THREAD, 2), 2);
        assert_eq!(threads_for_batch(4096, 2), 2);
        assert_eq!(threads_for_batch(4096, 8), 8);
        assert_eq!(threads_for_batch(4096, 0), 1);
    }

    #[test]
    fn matmuls_match_naive_loops() {
        let (m, n, k) = (5, 3, 7);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.3).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.7).cos()).collect();
        let mut y = vec![1.0; m * n];
        matmul_wt(&mut y, &x, &w, m, n, k, k, true);
        let mut dw = vec![0.0; n * k];
        matmul_tn_acc(&mut dw, &y, &x, m, n, k);
        let mut da = vec![0.0; m * k];
        matmul_nn(&mut da, &y, &w, m, n, k, k, 0);
        for r in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                assert!((y[r * n + j] - want).abs() < 1e-5);
            }
        }
        for j in 0..n {
            for i in 0..k {
                let want: f32 = (0..m).map(|r| y[r * n + j] * x[r * k + i]).sum();
                assert!((dw[j * k + i] - want).abs() < 1e-4);
            }
        }
        for r in 0..m {
            for i in 0..k {
                let want: f32 = (0..n).map(|j| y[r * n + j] * w[j * k + i]).sum();
                assert!((da[r * k + i] - want).abs() < 1e-4);
            }
        }
    }
}

/// Columns per register tile of [`matmul_packed`] (two 8-lane vectors).
pub const TILE_N: usize = 16;
/// Rows per register tile of [`matmul_packed`].
const TILE_M: usize = 6;

/// `wt[i, j] = w[j, i]`: a weight `[n, k]` transposed to `[k, n]` for [`matmul_packed`].
pub fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut wt = vec![0.0f32; n * k];
    for j in 0..n {
        for i in 0..k {
            wt[i * n + j] = w[j * k + i];
        }
    }
    wt
}

/// `y[m, n] += x[m, k] * wt[k, n]` for `n` a multiple of [`TILE_N`], without allocating
/// (unlike the `gemm` crate, which allocates packing buffers on every call): 6 x 16 register
/// tiles of fused multiply-adds, the transposed weight read in 16-column panels.
pub fn matmul_packed(y: &mut [f32], x: &[f32], wt: &[f32], m: usize, n: usize, k: usize) {
    assert!(n % TILE_N == 0 && y.len() >= m * n && x.len() >= m * k && wt.len() >= k * n);
    matmul_packed_dispatch(y, x, wt, m, n, k);
}

simd_dispatch! {
    /// The body of [`matmul_packed`], compiled per instruction set.
    fn matmul_packed_dispatch(y: &mut [f32], x: &[f32], wt: &[f32], m: usize, n: usize, k: usize) {
        let mut j0 = 0;
        while j0 < n {
            let mut r0 = 0;
            while r0 + TILE_M <= m {
                tile::<TILE_M>(y, x, wt, r0, j0, n, k);
                r0 += TILE_M;
            }
            match m - r0 {
                5 => tile::<5>(y, x, wt, r0, j0, n, k),
                4 => tile::<4>(y, x, wt, r0, j0, n, k),
                3 => tile::<3>(y, x, wt, r0, j0, n, k),
                2 => tile::<2>(y, x, wt, r0, j0, n, k),
                1 => tile::<1>(y, x, wt, r0, j0, n, k),
                _ => {}
            }
            j0 += TILE_N;
        }
    }
}

/// One `MR x 16` tile of `y`, accumulated in registers over the whole depth `k`.
#[inline(always)]
fn tile<const MR: usize>(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    r0: usize,
    j0: usize,
    n: usize,
    k: usize,
) {
    let mut acc = [[0f32; TILE_N]; MR];
    for (r, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&y[(r0 + r) * n + j0..(r0 + r) * n + j0 + TILE_N]);
    }
    let xs: [&[f32]; MR] = std::array::from_fn(|r| &x[(r0 + r) * k..(r0 + r + 1) * k]);
    for kk in 0..k {
        let b: &[f32; TILE_N] = match wt[kk * n + j0..kk * n + j0 + TILE_N].try_into() {
            Ok(b) => b,
            Err(_) => return,
        };
        for r in 0..MR {
            let a = xs[r][kk];
            for c in 0..TILE_N {
                acc[r][c] = a.mul_add(b[c], acc[r][c]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        y[(r0 + r) * n + j0..(r0 + r) * n + j0 + TILE_N].copy_from_slice(a);
    }
}

#[cfg(test)]
mod packed_tests {
    use super::*;

    #[test]
    fn packed_matmul_matches_naive_for_every_row_remainder() {
        for m in 1..14 {
            let (n, k) = (32, 19);
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.17).cos()).collect();
            let mut y = vec![0.5f32; m * n];
            matmul_packed(&mut y, &x, &transpose(&w, n, k), m, n, k);
            for r in 0..m {
                for j in 0..n {
                    let want: f32 = 0.5 + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                    assert!((y[r * n + j] - want).abs() < 1e-4, "m {m} r {r} j {j}");
                }
            }
        }
    }
}
