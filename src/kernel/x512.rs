//! The AVX-512 kernels: the AVX2 ones at twice the width, with masked loads and stores for
//! the tails, and eight-row blocks where the AVX2 kernels use four or six, so that enough
//! independent fused multiply-adds are in flight for two 512-bit FMA pipes (latency 4).

use std::arch::x86_64::*;

/// A mask of the low `n` lanes (`n <= 16`).
#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// `exp(x)` on 16 lanes: the Cephes polynomial of [`super::exp_approx`] with fused steps, as
/// the AVX2 kernel computes it.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-88.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_add_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _mm512_set1_ps(0.5),
    ));
    let r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693_359_4)));
    let r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.121_944_4e-4)));
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(e))
}

/// `y[j] = b[j] + sum_kk x[kk] wt[kk, j]` for `n` (a multiple of 16) columns: up to 256
/// columns at a time in 16 accumulators, so each weight row streams through at full width.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn matvec_packed(
    y: *mut f32,
    b: *const f32,
    x: *const f32,
    wt: *const f32,
    n: usize,
    k: usize,
) {
    let mut j0 = 0;
    while j0 < n {
        let nv = match (n - j0) / 16 {
            16.. => 16,
            8.. => 8,
            4.. => 4,
            2.. => 2,
            _ => 1,
        };
        match nv {
            16 => matvec_cols::<16>(y, b, x, wt, n, k, j0),
            8 => matvec_cols::<8>(y, b, x, wt, n, k, j0),
            4 => matvec_cols::<4>(y, b, x, wt, n, k, j0),
            2 => matvec_cols::<2>(y, b, x, wt, n, k, j0),
            _ => matvec_cols::<1>(y, b, x, wt, n, k, j0),
        }
        j0 += 16 * nv;
    }
}

/// `NV * 16` columns from `j0` of [`matvec_packed`].
#[inline(always)]
unsafe fn matvec_cols<const NV: usize>(
    y: *mut f32,
    b: *const f32,
    x: *const f32,
    wt: *const f32,
    n: usize,
    k: usize,
    j0: usize,
) {
    let mut acc: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(j0 + 16 * v)));
    for kk in 0..k {
        let xv = _mm512_set1_ps(*x.add(kk));
        let row = wt.add(kk * n + j0);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(xv, _mm512_loadu_ps(row.add(16 * v)), *a);
        }
    }
    for (v, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(y.add(j0 + 16 * v), *a);
    }
}

/// `x = softmax(scale * x)` over `n` elements, `scale > 0`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn softmax(x: *mut f32, n: usize, scale: f32) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut mv = ninf;
    let mut i = 0;
    while i < n {
        let m = tail_mask((n - i).min(16));
        mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(ninf, m, x.add(i)));
        i += 16;
    }
    let mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mv) * scale);
    let scv = _mm512_set1_ps(scale);
    let mut sv = _mm512_setzero_ps();
    i = 0;
    while i < n {
        let m = tail_mask((n - i).min(16));
        let e = exp16(_mm512_fmsub_ps(
            _mm512_maskz_loadu_ps(m, x.add(i)),
            scv,
            mxv,
        ));
        let e = _mm512_maskz_mov_ps(m, e);
        sv = _mm512_add_ps(sv, e);
        _mm512_mask_storeu_ps(x.add(i), m, e);
        i += 16;
    }
    let iv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sv));
    i = 0;
    while i < n {
        let m = tail_mask((n - i).min(16));
        let v = _mm512_maskz_loadu_ps(m, x.add(i));
        _mm512_mask_storeu_ps(x.add(i), m, _mm512_mul_ps(v, iv));
        i += 16;
    }
}

/// `z = silu(z)` in place (and `s = sigmoid(z)` when `s` is not null), `n` elements.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn silu(z: *mut f32, s: *mut f32, n: usize) {
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m = tail_mask((n - i).min(16));
        let v = _mm512_maskz_loadu_ps(m, z.add(i));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        let sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(z.add(i), m, _mm512_mul_ps(v, sig));
        if !s.is_null() {
            _mm512_mask_storeu_ps(s.add(i), m, sig);
        }
        i += 16;
    }
}

/// `sum a[i] b[i]` for `i < n`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, c) in acc.iter_mut().enumerate() {
            let x = _mm512_loadu_ps(a.add(i + 16 * j));
            let y = _mm512_loadu_ps(b.add(i + 16 * j));
            *c = _mm512_fmadd_ps(x, y, *c);
        }
        i += 64;
    }
    while i < n {
        let m = tail_mask((n - i).min(16));
        let x = _mm512_maskz_loadu_ps(m, a.add(i));
        let y = _mm512_maskz_loadu_ps(m, b.add(i));
        acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
        i += 16;
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}

/// `out[j] = bias[j] + sum_i w[j * ldw + i] x[i]` for `j < n`: eight rows at a time, so each
/// load of `x` serves eight weight rows and eight sums are in flight.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn matvec_bias(
    w: *const f32,
    ldw: usize,
    bias: *const f32,
    x: *const f32,
    out: *mut f32,
    n: usize,
    k: usize,
) {
    const R: usize = 8;
    let mut j = 0;
    while j + R <= n {
        let rows: [*const f32; R] = std::array::from_fn(|r| w.add((j + r) * ldw));
        let mut acc = [_mm512_setzero_ps(); R];
        let mut i = 0;
        while i < k {
            let m = tail_mask((k - i).min(16));
            let xv = _mm512_maskz_loadu_ps(m, x.add(i));
            for (a, row) in acc.iter_mut().zip(&rows) {
                *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row.add(i)), xv, *a);
            }
            i += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            *out.add(j + r) = *bias.add(j + r) + _mm512_reduce_add_ps(*a);
        }
        j += R;
    }
    while j < n {
        *out.add(j) = *bias.add(j) + dot(w.add(j * ldw), x, k);
        j += 1;
    }
}

/// One `MR x 16 NV` tile: `y[r0.., j0..] += x[r0.., :] * w[:, j0..]`, accumulated in
/// registers over the whole depth `k`; `x[r, kk]` is at `x + r * xs.0 + kk * xs.1`, the
/// weight's sixteen `v` of row `kk` at `wt + kk * lay.0 + v * lay.1` (the row layout: `(n,
/// 16)`; 16-column panels: `(16, 16 k)`); `y` is overwritten instead when `add` is false.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<const MR: usize, const NV: usize>(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    n: usize,
    k: usize,
    lay: (usize, usize),
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if add {
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, av) in a.iter_mut().enumerate() {
                *av = _mm512_loadu_ps(y.add(r * n + 16 * v));
            }
        }
    }
    for kk in 0..k {
        let b: [__m512; NV] =
            std::array::from_fn(|v| _mm512_loadu_ps(wt.add(kk * lay.0 + v * lay.1)));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * xs.0 + kk * xs.1));
            for v in 0..NV {
                a[v] = _mm512_fmadd_ps(xv, b[v], a[v]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            _mm512_storeu_ps(y.add(r * n + 16 * v), *av);
        }
    }
}

/// Rows of a full tile: 12 x 2 accumulators, two weight vectors and a broadcast fit the 32
/// registers, and each broadcast feeds two FMAs.
const MR_MAX: usize = 12;

/// The row tiles of one column panel `NV * 16` wide.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn panel<const NV: usize>(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    m: usize,
    n: usize,
    k: usize,
    lay: (usize, usize),
    add: bool,
) {
    let mut r0 = 0;
    while r0 + MR_MAX <= m {
        tile::<MR_MAX, NV>(y.add(r0 * n), x.add(r0 * xs.0), xs, wt, n, k, lay, add);
        r0 += MR_MAX;
    }
    let (yr, xr) = (y.add(r0 * n), x.add(r0 * xs.0));
    match m - r0 {
        11 => tile::<11, NV>(yr, xr, xs, wt, n, k, lay, add),
        10 => tile::<10, NV>(yr, xr, xs, wt, n, k, lay, add),
        9 => tile::<9, NV>(yr, xr, xs, wt, n, k, lay, add),
        8 => tile::<8, NV>(yr, xr, xs, wt, n, k, lay, add),
        7 => tile::<7, NV>(yr, xr, xs, wt, n, k, lay, add),
        6 => tile::<6, NV>(yr, xr, xs, wt, n, k, lay, add),
        5 => tile::<5, NV>(yr, xr, xs, wt, n, k, lay, add),
        4 => tile::<4, NV>(yr, xr, xs, wt, n, k, lay, add),
        3 => tile::<3, NV>(yr, xr, xs, wt, n, k, lay, add),
        2 => tile::<2, NV>(yr, xr, xs, wt, n, k, lay, add),
        1 => tile::<1, NV>(yr, xr, xs, wt, n, k, lay, add),
        _ => {}
    }
}

/// The 48-row blocks of `y[m, n] (+)= x w`, 32 columns at a time and 16 for an odd sixteen;
/// column `j0` of the weight starts at `wt + col(j0)`, its rows laid out as `lay` says.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn blocks(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    m: usize,
    n: usize,
    k: usize,
    (col, lay): (usize, (usize, usize)),
    add: bool,
) {
    // Blocks of 48 rows, as in the AVX2 kernel: their x stays in L2 while every column
    // panel of the weight passes over it.
    const ROWS: usize = 48;
    let mut b0 = 0;
    while b0 < m {
        let mb = ROWS.min(m - b0);
        let (yb, xb) = (y.add(b0 * n), x.add(b0 * xs.0));
        let mut j0 = 0;
        while j0 + 32 <= n {
            panel::<2>(yb.add(j0), xb, xs, wt.add(j0 * col), mb, n, k, lay, add);
            j0 += 32;
        }
        if j0 < n {
            panel::<1>(yb.add(j0), xb, xs, wt.add(j0 * col), mb, n, k, lay, add);
        }
        b0 += mb;
    }
}

/// `y[m, n] += x[m, k] * wt[k, n]`, `n` a multiple of 16, `x[r, kk]` at
/// `x + r * xs.0 + kk * xs.1`, every slice long enough: 8 x 32 register tiles (16
/// accumulators), a 16-wide panel for an odd sixteen.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn matmul_packed(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    m: usize,
    n: usize,
    k: usize,
) {
    blocks(y, x, xs, wt, m, n, k, (1, (n, 16)), true);
}

/// [`matmul_packed`] with the weight in 16-column panels ([`crate::kernel::pack_panels`]:
/// panel `p`'s row `kk` at `(p k + kk) 16`), each tile reading contiguous streams; `add` false
/// overwrites `y` instead of adding to it.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn matmul_panels(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wp: *const f32,
    m: usize,
    n: usize,
    k: usize,
    add: bool,
) {
    // Column j0 (a multiple of 16) starts panel j0 / 16, at j0 / 16 * 16 k = j0 k.
    blocks(y, x, xs, wp, m, n, k, (k, (16, 16 * k)), add);
}
