//! Matrix kernels: the packed `6 x 16` register-tile matmul (95% of a core's FMA peak), its
//! strided and transposed-operand forms for weight gradients, the packed matvec for single
//! rows, the `gemm`-crate fallbacks for widths that are not a multiple of [`TILE_N`], and the
//! blocked transpose that packs weights.

use super::*;

/// `y = bias + x wt` for one row: `x` `[k]`, the packed (transposed) weight `wt` `[k, n]`, `n`
/// (`y.len()`) a multiple of [`TILE_N`]. Every output column stays in a register while the
/// weight rows stream past, so one row runs at the width of the vectors (a row of dot products
/// needs a horizontal sum per output).
pub fn matvec_packed(y: &mut [f32], bias: &[f32], x: &[f32], wt: &[f32]) {
    matvec_packed_on(kernel_path(), y, bias, x, wt)
}

/// [`matvec_packed`] on a given path (which the CPU must support).
pub(crate) fn matvec_packed_on(
    path: KernelPath,
    y: &mut [f32],
    bias: &[f32],
    x: &[f32],
    wt: &[f32],
) {
    let (n, k) = (y.len(), x.len());
    assert!(n.is_multiple_of(TILE_N) && bias.len() >= n && wt.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    {
        let (yp, bp, xp, wp) = (y.as_mut_ptr(), bias.as_ptr(), x.as_ptr(), wt.as_ptr());
        match path {
            // SAFETY: features detected; the assert bounds every pointer the kernel reads.
            KernelPath::Avx512 => return unsafe { x512::matvec_packed(yp, bp, xp, wp, n, k) },
            // SAFETY: as above.
            KernelPath::Avx2 => return unsafe { x86::matvec_packed(yp, bp, xp, wp, n, k) },
            KernelPath::Portable => {}
        }
    }
    y.copy_from_slice(&bias[..n]);
    for (kk, &xv) in x.iter().enumerate() {
        for (yj, &w) in y.iter_mut().zip(&wt[kk * n..(kk + 1) * n]) {
            *yj += xv * w;
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
    matvec_bias_strided_on(kernel_path(), w, ldw, bias, a, out)
}

/// [`matvec_bias_strided`] on a given path (which the CPU must support).
pub(crate) fn matvec_bias_strided_on(
    path: KernelPath,
    w: &[f32],
    ldw: usize,
    bias: &[f32],
    a: &[f32],
    out: &mut [f32],
) {
    let k = a.len();
    let n = out.len();
    assert!(n == 0 || (ldw >= k && w.len() >= (n - 1) * ldw + k && bias.len() >= n));
    #[cfg(target_arch = "x86_64")]
    {
        let (w, b, x, o) = (w.as_ptr(), bias.as_ptr(), a.as_ptr(), out.as_mut_ptr());
        match path {
            // SAFETY: features detected; the assert bounds every row read.
            KernelPath::Avx512 => return unsafe { x512::matvec_bias(w, ldw, b, x, o, n, k) },
            // SAFETY: as above.
            KernelPath::Avx2 => return unsafe { x86::matvec_bias(w, ldw, b, x, o, n, k) },
            KernelPath::Portable => {}
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = bias[j] + dot_on(path, &w[j * ldw..j * ldw + k], a);
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

/// Rows of the batch per chunk of [`matmul_tn_acc`]'s packed path: the gradient chunk
/// (`256 x n`) and the input chunk (`256 x k`) stay in L2 while the kernel runs.
const TN_CHUNK: usize = 256;

/// `dw[n, k] += g[m, n]^T * a[m, k]`: a weight gradient summed over the rows. On the packed
/// kernels (the path [`kernel_path`] chose, AVX-512 included) when `k` is a multiple of
/// [`TILE_N`]: `a`'s rows are already the packed `[K, N]` layout, and `g` is read down its
/// columns in place (a transposed copy cost 4% of a training step). Otherwise through `gemm`.
pub fn matmul_tn_acc(dw: &mut [f32], g: &[f32], a: &[f32], m: usize, n: usize, k: usize) {
    matmul_tn_acc_on(kernel_path(), dw, g, a, m, n, k)
}

/// [`matmul_tn_acc`] on a given path (which the CPU must support).
pub(crate) fn matmul_tn_acc_on(
    path: KernelPath,
    dw: &mut [f32],
    g: &[f32],
    a: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(dw.len() >= n * k && g.len() >= m * n && a.len() >= m * k);
    if k.is_multiple_of(TILE_N) && m >= TILE_N {
        let mut r0 = 0;
        while r0 < m {
            let rows = TN_CHUNK.min(m - r0);
            // dw += g[r0.., :]^T a[r0.., :]: the chunk of g read down its columns in place.
            matmul_strided_on(
                path,
                dw,
                &g[r0 * n..(r0 + rows) * n],
                (1, n),
                &a[r0 * k..(r0 + rows) * k],
                n,
                k,
                rows,
            );
            r0 += rows;
        }
        return;
    }
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
    fn silu_kernels_match_closed_forms_on_every_path() {
        // 101 elements: every vector width's tail is exercised.
        let z: Vec<f32> = (-50..51).map(|i| i as f32 * 0.37).collect();
        for path in KernelPath::supported() {
            silu_on_path(path, &z);
        }
    }

    fn silu_on_path(path: KernelPath, z: &[f32]) {
        let mut a = z.to_vec();
        let mut s = vec![0.0; z.len()];
        silu_keep_on(path, &mut a, &mut s);
        let mut b = z.to_vec();
        silu_inplace_on(path, &mut b);
        let mut g = vec![1.0; z.len()];
        silu_backward_on(path, &mut g, &a, &s);
        for i in 0..z.len() {
            let sig = 1.0 / (1.0 + (-z[i] as f64).exp());
            let want = z[i] as f64 * sig;
            assert!(
                (a[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{path:?}"
            );
            assert!(
                (b[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{path:?}"
            );
            let dwant = sig * (1.0 + z[i] as f64 * (1.0 - sig));
            assert!(
                (g[i] as f64 - dwant).abs() < 1e-6,
                "{path:?}: {} vs {dwant}",
                g[i]
            );
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
    // In 16 x 16 blocks so that both sides stay in L1: a plain double loop strides through
    // one of them (9% of a batch-64 sample when every run packed its hidden weights).
    let mut wt = vec![0.0; n * k];
    for rb in (0..n).step_by(16) {
        for jb in (0..k).step_by(16) {
            for r in rb..(rb + 16).min(n) {
                let row = &w[r * k..(r + 1) * k];
                for j in jb..(jb + 16).min(k) {
                    wt[j * n + r] = row[j];
                }
            }
        }
    }
    wt
}

/// `y[m, n] += x[m, k] * wt[k, n]` for `n` a multiple of [`TILE_N`], without allocating
/// (unlike the `gemm` crate, which allocates packing buffers on every call): 6 x 16 register
/// tiles of fused multiply-adds, the transposed weight read in 16-column panels.
pub fn matmul_packed(y: &mut [f32], x: &[f32], wt: &[f32], m: usize, n: usize, k: usize) {
    matmul_packed_on(kernel_path(), y, x, wt, m, n, k)
}

/// [`matmul_packed`] on a given path (which the CPU must support).
pub(crate) fn matmul_packed_on(
    path: KernelPath,
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(x.len() >= m * k);
    matmul_strided_on(path, y, x, (k, 1), wt, m, n, k)
}

/// [`matmul_packed`] with `x[r, kk]` read at `x[r * xs.0 + kk * xs.1]`: `xs = (1, m)` reads
/// `x` `[k, m]` as its transpose, which a weight gradient `g^T a` needs without copying `g`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_strided_on(
    path: KernelPath,
    y: &mut [f32],
    x: &[f32],
    xs: (usize, usize),
    wt: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    let x_last = match (m, k) {
        (0, _) | (_, 0) => 0,
        _ => (m - 1) * xs.0 + (k - 1) * xs.1 + 1,
    };
    assert!(n.is_multiple_of(TILE_N) && y.len() >= m * n && x.len() >= x_last && wt.len() >= k * n);
    if m == 0 || k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (yp, xp, wp) = (y.as_mut_ptr(), x.as_ptr(), wt.as_ptr());
        match path {
            // SAFETY: features detected; the assert bounds every pointer the kernel reads.
            KernelPath::Avx512 => return unsafe { x512::matmul_packed(yp, xp, xs, wp, m, n, k) },
            // SAFETY: as above.
            KernelPath::Avx2 => return unsafe { x86::matmul_packed(yp, xp, xs, wp, m, n, k) },
            KernelPath::Portable => {}
        }
    }
    portable(y, x, xs, wt, m, n, k, (TILE_N, n));
}

/// The portable loops of both layouts: panel `p` of the weight at `wt[p * lay.0..]`, its rows
/// `lay.1` floats apart.
#[allow(clippy::too_many_arguments)]
fn portable(
    y: &mut [f32],
    x: &[f32],
    xs: (usize, usize),
    wt: &[f32],
    m: usize,
    n: usize,
    k: usize,
    lay: (usize, usize),
) {
    let mut r0 = 0;
    while r0 < m {
        let mut j0 = 0;
        while j0 < n {
            tile::<1>(y, x, xs, wt, r0, j0, n, k, lay);
            j0 += TILE_N;
        }
        r0 += 1;
    }
}

/// A `[k, n]` weight (`n` a multiple of [`TILE_N`]) in [`TILE_N`]-column panels, the layout
/// [`matmul_panels`] reads: panel `p`'s row `kk` at `(p * k + kk) * TILE_N`.
///
/// ```
/// let wt: Vec<f32> = (0..2 * 32).map(|i| i as f32).collect(); // [k = 2, n = 32]
/// let wp = flow_matching::kernel::pack_panels(&wt, 2, 32);
/// assert_eq!(wp[16], 32.0); // panel 0, row 1 starts with wt[1][0]
/// assert_eq!(wp[32], 16.0); // panel 1, row 0 starts with wt[0][16]
/// ```
pub fn pack_panels(wt: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert!(n.is_multiple_of(TILE_N) && wt.len() >= k * n);
    let mut wp = vec![0.0; k * n];
    for (kk, row) in wt.chunks_exact(n).take(k).enumerate() {
        for (p, cols) in row.chunks_exact(TILE_N).enumerate() {
            let at = panel_index(p * TILE_N, kk, k);
            wp[at..at + TILE_N].copy_from_slice(cols);
        }
    }
    wp
}

/// Where column `j`, row `kk` of a `[k, n]` weight lies in its [`pack_panels`] layout.
#[inline(always)]
pub fn panel_index(j: usize, kk: usize, k: usize) -> usize {
    (j / TILE_N * k + kk) * TILE_N + j % TILE_N
}

/// `y[m, n] += x[m, k] * w[k, n]` with `w` in [`pack_panels`]' layout: as [`matmul_packed`]
/// but each tile reads its panel as one contiguous stream (no cache-set conflicts for `n` a
/// multiple of 1,024, and one prefetch stream per tile).
///
/// ```
/// use flow_matching::kernel::{matmul_panels, pack_panels};
/// let (m, n, k) = (2, 16, 3);
/// let x = [1.0, 2.0, 3.0, 0.0, 1.0, 0.0];
/// let wt: Vec<f32> = (0..k * n).map(|i| (i % n) as f32).collect(); // w[kk][j] = j
/// let mut y = vec![0.0; m * n];
/// matmul_panels(&mut y, &x, &pack_panels(&wt, k, n), m, n, k);
/// assert_eq!((y[5], y[16 + 5]), (30.0, 5.0));
/// ```
pub fn matmul_panels(y: &mut [f32], x: &[f32], wp: &[f32], m: usize, n: usize, k: usize) {
    matmul_panels_on(kernel_path(), y, x, wp, m, n, k, true)
}

/// [`matmul_panels`] overwriting `y` (`y = x w`): no zeroing pass over `y` first.
pub fn matmul_panels_set(y: &mut [f32], x: &[f32], wp: &[f32], m: usize, n: usize, k: usize) {
    matmul_panels_on(kernel_path(), y, x, wp, m, n, k, false)
}

/// [`matmul_panels`] (`add`) or [`matmul_panels_set`] on a given path (which the CPU must
/// support).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_panels_on(
    path: KernelPath,
    y: &mut [f32],
    x: &[f32],
    wp: &[f32],
    m: usize,
    n: usize,
    k: usize,
    add: bool,
) {
    assert!(n.is_multiple_of(TILE_N) && y.len() >= m * n && x.len() >= m * k && wp.len() >= k * n);
    if m == 0 {
        return;
    }
    if k == 0 {
        if !add {
            y[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (yp, xp, wq) = (y.as_mut_ptr(), x.as_ptr(), wp.as_ptr());
        match path {
            // SAFETY: the path is supported by this CPU (checked when it was chosen); the
            // assert bounds every pointer the kernel reads.
            KernelPath::Avx512 => {
                return unsafe { x512::matmul_panels(yp, xp, (k, 1), wq, m, n, k, add) }
            }
            // SAFETY: as above.
            KernelPath::Avx2 => {
                return unsafe { x86::matmul_panels(yp, xp, (k, 1), wq, m, n, k, add) }
            }
            KernelPath::Portable => {}
        }
    }
    if !add {
        y[..m * n].fill(0.0);
    }
    portable(y, x, (k, 1), wp, m, n, k, (TILE_N * k, TILE_N));
}

/// One `MR x 16` tile of `y`, accumulated in registers over the whole depth `k`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile<const MR: usize>(
    y: &mut [f32],
    x: &[f32],
    xs: (usize, usize),
    wt: &[f32],
    r0: usize,
    j0: usize,
    n: usize,
    k: usize,
    (pstep, ldb): (usize, usize),
) {
    let base = j0 / TILE_N * pstep;
    let mut acc = [[0f32; TILE_N]; MR];
    for (r, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&y[(r0 + r) * n + j0..(r0 + r) * n + j0 + TILE_N]);
    }
    for kk in 0..k {
        let at = base + kk * ldb;
        let b: &[f32; TILE_N] = match wt[at..at + TILE_N].try_into() {
            Ok(b) => b,
            Err(_) => return,
        };
        for r in 0..MR {
            let a = x[(r0 + r) * xs.0 + kk * xs.1];
            // Not `mul_add`: baseline x86-64 has no FMA, and the libm call per element made
            // this path 50x slower than a multiply and an add.
            for c in 0..TILE_N {
                acc[r][c] += a * b[c];
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
    fn weight_gradient_matches_naive_on_every_path_across_chunks() {
        for path in KernelPath::supported() {
            // m = 600 crosses two chunk boundaries; k = 40 is not a multiple of 16 (gemm).
            for (m, n, k) in [
                (16, 5, 16),
                (300, 64, 48),
                (600, 3, 32),
                (20, 7, 40),
                (3, 4, 16),
            ] {
                let g: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.37).sin()).collect();
                let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut dw = vec![0.25f32; n * k];
                matmul_tn_acc_on(path, &mut dw, &g, &a, m, n, k);
                for j in 0..n {
                    for i in 0..k {
                        let want: f64 = 0.25
                            + (0..m)
                                .map(|r| g[r * n + j] as f64 * a[r * k + i] as f64)
                                .sum::<f64>();
                        let got = dw[j * k + i] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{path:?} m {m} n {n} k {k} at ({j}, {i}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_matmul_matches_naive_for_every_row_remainder_on_every_path() {
        for path in KernelPath::supported() {
            // n = 48: one 32-wide and one 16-wide panel on AVX-512; m past a 48-row block.
            for (m, n) in (1..20).map(|m| (m, 32)).chain([(50, 48), (9, 16)]) {
                let k = 19;
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
                let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.17).cos()).collect();
                let mut y = vec![0.5f32; m * n];
                matmul_packed_on(path, &mut y, &x, &transpose(&w, n, k), m, n, k);
                for r in 0..m {
                    for j in 0..n {
                        let want: f32 =
                            0.5 + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                        assert!(
                            (y[r * n + j] - want).abs() < 1e-4,
                            "{path:?} m {m} r {r} j {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn panel_matmul_matches_the_row_layout_on_every_path() {
        for path in KernelPath::supported() {
            // n = 1,024 and k = 64: the prefix-score shape; m across the 6-row tiles and the
            // 48-row blocks.
            for (m, n, k) in [(1, 16, 1), (7, 48, 19), (50, 64, 33), (128, 1024, 64)] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
                let wt: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.17).cos()).collect();
                let mut want = vec![0.25f32; m * n];
                matmul_packed_on(path, &mut want, &x, &wt, m, n, k);
                let mut got = vec![0.25f32; m * n];
                let wp = pack_panels(&wt, k, n);
                matmul_panels_on(path, &mut got, &x, &wp, m, n, k, true);
                // Overwriting: the sums alone, whatever y held.
                let mut set = vec![f32::NAN; m * n];
                matmul_panels_on(path, &mut set, &x, &wp, m, n, k, false);
                for (s, g) in set.iter().zip(&got) {
                    assert!(
                        (s + 0.25 - g).abs() <= 1e-5 * (1.0 + g.abs()),
                        "{path:?} set"
                    );
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // The same sums; the AVX-512 row kernel may order them differently.
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{path:?} m {m} n {n} k {k} at {i}: {g} vs {w}"
                    );
                }
                for kk in [0, k - 1] {
                    for j in [0, 15, n - 1] {
                        assert_eq!(
                            pack_panels(&wt, k, n)[panel_index(j, kk, k)],
                            wt[kk * n + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dot_matvec_axpy_match_naive_loops_on_every_path() {
        for path in KernelPath::supported() {
            for (n, k) in [(1, 1), (3, 7), (8, 16), (13, 37), (20, 100), (9, 256)] {
                let ldw = k + 3;
                let w: Vec<f32> = (0..n * ldw).map(|i| (i as f32 * 0.23).sin()).collect();
                let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.41).cos()).collect();
                let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
                let mut out = vec![0.0; n];
                matvec_bias_strided_on(path, &w, ldw, &bias, &x, &mut out);
                for j in 0..n {
                    let want: f32 = bias[j] + (0..k).map(|i| w[j * ldw + i] * x[i]).sum::<f32>();
                    assert!((out[j] - want).abs() < 1e-4, "{path:?} n {n} k {k} j {j}");
                }
                let d = dot_on(path, &x, &w[..k]);
                let want: f32 = (0..k).map(|i| x[i] * w[i]).sum();
                assert!((d - want).abs() < 1e-4, "{path:?} dot k {k}");
                let mut y = w[..k].to_vec();
                axpy_on(path, &mut y, 0.5, &x);
                add_assign_on(path, &mut y, &x);
                for i in 0..k {
                    assert!((y[i] - (w[i] + 1.5 * x[i])).abs() < 1e-6, "{path:?} axpy");
                }
            }
        }
    }

    #[test]
    fn kernel_paths_parse_and_the_best_is_supported() {
        assert_eq!("AVX512".parse::<KernelPath>().unwrap(), KernelPath::Avx512);
        let err = "sse".parse::<KernelPath>().unwrap_err().to_string();
        assert!(err.contains("portable, avx2, avx512"), "{err}");
        assert!(KernelPath::best().is_supported());
        assert!(KernelPath::supported().contains(&KernelPath::Portable));
    }
}
