//! The AVX2+FMA builds of the hand-written kernels (8 lanes); `x512` holds the AVX-512 ones
//! and the portable builds stay beside their dispatch in `elementwise` and `matmul`.

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

/// `y[j] = b[j] + sum_kk x[kk] wt[kk, j]` for `n` (a multiple of 16) columns, 64 at a time
/// in 8 accumulators.
#[target_feature(enable = "avx2,fma")]
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
        if n - j0 >= 64 {
            matvec_cols::<8>(y, b, x, wt, n, k, j0);
            j0 += 64;
        } else {
            matvec_cols::<2>(y, b, x, wt, n, k, j0);
            j0 += 16;
        }
    }
}

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
    let mut acc: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(b.add(j0 + 8 * v)));
    for kk in 0..k {
        let xv = _mm256_broadcast_ss(&*x.add(kk));
        let row = wt.add(kk * n + j0);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(xv, _mm256_loadu_ps(row.add(8 * v)), *a);
        }
    }
    for (v, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.add(j0 + 8 * v), *a);
    }
}

/// `x = softmax(scale * x)` over `n` elements, `scale > 0`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax(x: *mut f32, n: usize, scale: f32) {
    let mut mx = f32::NEG_INFINITY;
    let mut mv = _mm256_set1_ps(mx);
    let mut i = 0;
    while i + 8 <= n {
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(x.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
    for v in lanes.into_iter().chain((i..n).map(|j| *x.add(j))) {
        mx = mx.max(v);
    }
    let (sc, mxs) = (scale, mx * scale);
    let (scv, mxv) = (_mm256_set1_ps(sc), _mm256_set1_ps(mxs));
    let mut sv = _mm256_setzero_ps();
    i = 0;
    while i + 8 <= n {
        let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x.add(i)), scv, mxv));
        sv = _mm256_add_ps(sv, e);
        _mm256_storeu_ps(x.add(i), e);
        i += 8;
    }
    let mut sum = hsum(sv);
    for j in i..n {
        let e = super::exp_approx(*x.add(j) * sc - mxs);
        *x.add(j) = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    let iv = _mm256_set1_ps(inv);
    i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(x.add(i), _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), iv));
        i += 8;
    }
    for j in i..n {
        *x.add(j) *= inv;
    }
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

/// One `MR x 16` tile: `y[r0.., j0..j0+16] += x[r0.., :] * wt[:, j0..j0+16]`, `x[r, kk]`
/// at `x + r * xs.0 + kk * xs.1`, the panel's row `kk` at `wt + kk * ldb`; `y` is overwritten
/// instead when `add` is false.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<const MR: usize>(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    n: usize,
    k: usize,
    ldb: usize,
    add: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    if add {
        for (r, a) in acc.iter_mut().enumerate() {
            a[0] = _mm256_loadu_ps(y.add(r * n));
            a[1] = _mm256_loadu_ps(y.add(r * n + 8));
        }
    }
    for kk in 0..k {
        let b0 = _mm256_loadu_ps(wt.add(kk * ldb));
        let b1 = _mm256_loadu_ps(wt.add(kk * ldb + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(r * xs.0 + kk * xs.1));
            a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.add(r * n), a[0]);
        _mm256_storeu_ps(y.add(r * n + 8), a[1]);
    }
}

/// `y[m, n] += x[m, k] * wt[k, n]`, `n` a multiple of 16, `x[r, kk]` at
/// `x + r * xs.0 + kk * xs.1`, every slice long enough.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_packed(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    m: usize,
    n: usize,
    k: usize,
) {
    rows_in_blocks(y, x, xs, wt, m, n, k, (16, n), true);
}

/// [`matmul_packed`] with the weight in 16-column panels ([`crate::kernel::pack_panels`]):
/// each panel's `[k, 16]` values contiguous, so a tile reads one stream instead of `k` rows
/// `n` floats apart (which for `n` a multiple of 1,024 all fall in one L1 set). `add` false
/// overwrites `y` (`y = x w`) instead of adding to it.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    rows_in_blocks(y, x, xs, wp, m, n, k, (16 * k, 16), add);
}

/// The rows in blocks of 48: their x (48 KiB at k = 256) stays in L2 while every column panel
/// of the weight passes over it, instead of all of x streaming from memory once per panel.
/// Panel `p` of the weight starts at `wt + p * lay.0` and its rows are `lay.1` floats apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn rows_in_blocks(
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
    const ROWS: usize = 48;
    let mut b0 = 0;
    while b0 < m {
        let mb = ROWS.min(m - b0);
        panels(y.add(b0 * n), x.add(b0 * xs.0), xs, wt, mb, n, k, lay, add);
        b0 += mb;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn panels(
    y: *mut f32,
    x: *const f32,
    xs: (usize, usize),
    wt: *const f32,
    m: usize,
    n: usize,
    k: usize,
    (pstep, ldb): (usize, usize),
    add: bool,
) {
    let mut j0 = 0;
    while j0 < n {
        let mut r0 = 0;
        let (yj, wj) = (y.add(j0), wt.add(j0 / 16 * pstep));
        while r0 + 6 <= m {
            tile::<6>(yj.add(r0 * n), x.add(r0 * xs.0), xs, wj, n, k, ldb, add);
            r0 += 6;
        }
        let (yr, xr) = (yj.add(r0 * n), x.add(r0 * xs.0));
        match m - r0 {
            5 => tile::<5>(yr, xr, xs, wj, n, k, ldb, add),
            4 => tile::<4>(yr, xr, xs, wj, n, k, ldb, add),
            3 => tile::<3>(yr, xr, xs, wj, n, k, ldb, add),
            2 => tile::<2>(yr, xr, xs, wj, n, k, ldb, add),
            1 => tile::<1>(yr, xr, xs, wj, n, k, ldb, add),
            _ => {}
        }
        j0 += 16;
    }
}
