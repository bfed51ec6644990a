//! Fused f32 CPU kernels for the velocity-mlp: matmuls over the `gemm` crate, fused bias and
//! SiLU (forward and backward), small dot-product kernels, and the thread policy.
//!
//! Plain candle spends most of a small-batch step in thread hand-offs and most of a large-batch
//! training step in single-threaded elementwise ops (shared/notes/candle-on-cpu.md); these
//! kernels work on preallocated slices instead.

pub mod euler;
pub mod mlp;

/// Rows per thread below which splitting a batch costs more than it saves. Measured on the
/// 2-core reference machine (examples/profile_fast.rs, 10-step samples): 16 rows take 0.76 ms
/// on one thread and 1.0 ms on two, 32 rows 1.35 ms on either, 64 rows 2.5 ms on one and
/// 1.9 ms on two.
pub const MIN_ROWS_PER_THREAD: usize = 32;

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

/// `a = silu(z)` and `s = sigmoid(z)` in place of `z` and `s` (the backward pass needs `s`).
pub fn silu_keep(z: &mut [f32], s: &mut [f32]) {
    let n = z.len().min(s.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features detected; both slices hold n elements.
        unsafe { x86::silu(z.as_mut_ptr(), s.as_mut_ptr(), n) };
        return;
    }
    for (zi, si) in z[..n].iter_mut().zip(s.iter_mut()) {
        let sig = 1.0 / (1.0 + exp_approx(-*zi));
        *si = sig;
        *zi *= sig;
    }
}

/// `z = silu(z)` in place.
pub fn silu_inplace(z: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features detected; a null `s` is never written.
        unsafe { x86::silu(z.as_mut_ptr(), std::ptr::null_mut(), z.len()) };
        return;
    }
    for zi in z.iter_mut() {
        *zi /= 1.0 + exp_approx(-*zi);
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

/// The dot product of two equal-length slices (AVX2+FMA with four accumulators when the CPU
/// has them: autovectorized reductions come out as shuffles).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected; both slices hold at least n elements.
        return unsafe { x86::dot(a.as_ptr(), b.as_ptr(), n) };
    }
    a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum()
}

/// Whether AVX2 and FMA are there (cached by std after the first call).
#[inline(always)]
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `exp(x)` on 8 lanes: the same Cephes polynomial as [`super::exp_approx`].
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-88.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_floor_ps(_mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693_359_4)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.121_944_4e-4)));
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    /// `z = silu(z)` in place (and `s = sigmoid(z)` when `s` is not null), `n` elements.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu(z: *mut f32, s: *mut f32, n: usize) {
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(z.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
            let sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
            _mm256_storeu_ps(z.add(i), _mm256_mul_ps(v, sig));
            if !s.is_null() {
                _mm256_storeu_ps(s.add(i), sig);
            }
            i += 8;
        }
        while i < n {
            let sig = 1.0 / (1.0 + super::exp_approx(-*z.add(i)));
            *z.add(i) *= sig;
            if !s.is_null() {
                *s.add(i) = sig;
            }
            i += 1;
        }
    }

    /// `out[j] = bias[j] + sum_i w[j * k + i] x[i]` for `j < n`: four rows at a time, so each
    /// load of `x` serves four weight rows and one horizontal add finishes four sums.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matvec_bias(
        w: *const f32,
        ldw: usize,
        bias: *const f32,
        x: *const f32,
        out: *mut f32,
        n: usize,
        k: usize,
    ) {
        let mut j = 0;
        let k8 = k / 8 * 8;
        while j + 4 <= n {
            let rows = [
                w.add(j * ldw),
                w.add((j + 1) * ldw),
                w.add((j + 2) * ldw),
                w.add((j + 3) * ldw),
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < k8 {
                let xv = _mm256_loadu_ps(x.add(i));
                for r in 0..4 {
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r].add(i)), xv, acc[r]);
                }
                i += 8;
            }
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            let mut sums = [0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), s);
            for r in 0..4 {
                let mut t = sums[r];
                for ii in k8..k {
                    t += *rows[r].add(ii) * *x.add(ii);
                }
                *out.add(j + r) = *bias.add(j + r) + t;
            }
            j += 4;
        }
        while j < n {
            *out.add(j) = *bias.add(j) + dot(w.add(j * ldw), x, k);
            j += 1;
        }
    }

    /// `sum a[i] b[i]` for `i < n`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, c) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.add(i + 8 * j));
                let y = _mm256_loadu_ps(b.add(i + 8 * j));
                *c = _mm256_fmadd_ps(x, y, *c);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(s);
        while i < n {
            total += *a.add(i) * *b.add(i);
            i += 1;
        }
        total
    }

    /// One `MR x 16` tile: `y[r0.., j0..j0+16] += x[r0.., :] * wt[:, j0..j0+16]`.
    #[inline(always)]
    unsafe fn tile<const MR: usize>(
        y: *mut f32,
        x: *const f32,
        wt: *const f32,
        n: usize,
        k: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (r, a) in acc.iter_mut().enumerate() {
            a[0] = _mm256_loadu_ps(y.add(r * n));
            a[1] = _mm256_loadu_ps(y.add(r * n + 8));
        }
        for kk in 0..k {
            let b0 = _mm256_loadu_ps(wt.add(kk * n));
            let b1 = _mm256_loadu_ps(wt.add(kk * n + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * k + kk));
                a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(r * n), a[0]);
            _mm256_storeu_ps(y.add(r * n + 8), a[1]);
        }
    }

    /// `y[m, n] += x[m, k] * wt[k, n]`, `n` a multiple of 16, every slice long enough.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul_packed(
        y: *mut f32,
        x: *const f32,
        wt: *const f32,
        m: usize,
        n: usize,
        k: usize,
    ) {
        // Blocks of 48 rows: their x (48 KiB at k = 256) stays in L2 while every column panel
        // of wt passes over it, instead of all of x streaming from memory once per panel.
        const ROWS: usize = 48;
        let mut b0 = 0;
        while b0 < m {
            let mb = ROWS.min(m - b0);
            panels(y.add(b0 * n), x.add(b0 * k), wt, mb, n, k);
            b0 += mb;
        }
    }

    #[inline(always)]
    unsafe fn panels(y: *mut f32, x: *const f32, wt: *const f32, m: usize, n: usize, k: usize) {
        let mut j0 = 0;
        while j0 < n {
            let mut r0 = 0;
            let (yj, wj) = (y.add(j0), wt.add(j0));
            while r0 + 6 <= m {
                tile::<6>(yj.add(r0 * n), x.add(r0 * k), wj, n, k);
                r0 += 6;
            }
            let (yr, xr) = (yj.add(r0 * n), x.add(r0 * k));
            match m - r0 {
                5 => tile::<5>(yr, xr, wj, n, k),
                4 => tile::<4>(yr, xr, wj, n, k),
                3 => tile::<3>(yr, xr, wj, n, k),
                2 => tile::<2>(yr, xr, wj, n, k),
                1 => tile::<1>(yr, xr, wj, n, k),
                _ => {}
            }
            j0 += 16;
        }
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
    matvec_bias_strided(w, a.len(), bias, a, out);
}

/// [`matvec_bias`] with `w`'s rows `ldw` apart (the first `a.len()` columns of a wider matrix).
pub fn matvec_bias_strided(w: &[f32], ldw: usize, bias: &[f32], a: &[f32], out: &mut [f32]) {
    let k = a.len();
    let n = out.len();
    assert!(n == 0 || (ldw >= k && w.len() >= (n - 1) * ldw + k && bias.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features detected; the assert bounds every row read.
        unsafe {
            x86::matvec_bias(
                w.as_ptr(),
                ldw,
                bias.as_ptr(),
                a.as_ptr(),
                out.as_mut_ptr(),
                n,
                k,
            )
        };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = bias[j] + dot(&w[j * ldw..j * ldw + k], a);
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
        assert_eq!(threads_for_batch(32, 2), 1);
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

/// `wt[i, j] = w[j, i]`: a weight `[n, k]` transposed to `[k, n]` for [`matmul_packed`].
pub fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    // Written in order, read down the columns: the n rows being read (16 KiB at n = 256) stay
    // in L1 from one column to the next, and nothing is zeroed first.
    let mut wt = Vec::with_capacity(n * k);
    for i in 0..k {
        wt.extend(w.chunks_exact(k).take(n).map(|row| row[i]));
    }
    wt
}

/// `y[m, n] += x[m, k] * wt[k, n]` for `n` a multiple of [`TILE_N`], without allocating
/// (unlike the `gemm` crate, which allocates packing buffers on every call): 6 x 16 register
/// tiles of fused multiply-adds, the transposed weight read in 16-column panels.
pub fn matmul_packed(y: &mut [f32], x: &[f32], wt: &[f32], m: usize, n: usize, k: usize) {
    assert!(n.is_multiple_of(TILE_N) && y.len() >= m * n && x.len() >= m * k && wt.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features detected; the assert bounds every pointer the kernel reads.
        unsafe { x86::matmul_packed(y.as_mut_ptr(), x.as_ptr(), wt.as_ptr(), m, n, k) };
        return;
    }
    let mut r0 = 0;
    while r0 < m {
        let mut j0 = 0;
        while j0 < n {
            tile::<1>(y, x, wt, r0, j0, n, k);
            j0 += TILE_N;
        }
        r0 += 1;
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
