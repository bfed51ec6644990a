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

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// Plain Rust loops for baseline x86-64 (or any other architecture).
    Portable,
    /// 256-bit AVX2 with fused multiply-adds.
    Avx2,
    /// 512-bit AVX-512 (`avx512f`) with fused multiply-adds.
    Avx512,
}

/// The environment variable that forces a kernel path: `portable`, `avx2` or `avx512`.
pub const KERNEL_ENV: &str = "FLOW_MATCHING_KERNEL";

impl KernelPath {
    /// Every path, slowest first.
    pub const ALL: [KernelPath; 3] = [KernelPath::Portable, KernelPath::Avx2, KernelPath::Avx512];

    /// The name the path parses from.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                KernelPath::Portable => true,
                KernelPath::Avx2 => has!("avx2") && has!("fma"),
                KernelPath::Avx512 => has!("avx2") && has!("fma") && has!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == KernelPath::Portable
        }
    }

    /// The paths this CPU can run, slowest first (tests loop over them).
    ///
    /// ```
    /// use flow_matching::kernel::KernelPath;
    /// assert_eq!(KernelPath::supported()[0], KernelPath::Portable);
    /// ```
    pub fn supported() -> Vec<KernelPath> {
        Self::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> KernelPath {
        Self::ALL
            .into_iter()
            .rev()
            .find(|p| p.is_supported())
            .unwrap_or(KernelPath::Portable)
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<KernelPath> {
        Self::ALL.get((c as usize).checked_sub(1)?).copied()
    }
}

impl std::str::FromStr for KernelPath {
    type Err = crate::error::Error;

    /// Parses `portable`, `avx2` or `avx512`, case-insensitively.
    fn from_str(s: &str) -> crate::error::Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|p| p.name() == lower)
            .ok_or_else(|| crate::error::Error::UnknownName {
                kind: "kernel path",
                name: s.to_string(),
                known: "portable, avx2, avx512".into(),
            })
    }
}

/// The chosen path (a [`KernelPath::code`]); 0 until the first kernel call reads the environment.
static PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// What [`KERNEL_ENV`] asks for, if it is set: an unknown name is an error naming the
/// variable's value and the known names.
pub fn requested_path() -> crate::error::Result<Option<KernelPath>> {
    match std::env::var(KERNEL_ENV) {
        Ok(v) if !v.trim().is_empty() => v.parse().map(Some),
        _ => Ok(None),
    }
}

/// The path the kernels use: the one forced by [`set_kernel_path`], else the one
/// [`KERNEL_ENV`] names (a path this CPU cannot run, or an unknown name, falls back to the
/// fastest supported one at or below it, which [`requested_path`] lets a caller report),
/// else the fastest this CPU has.
///
/// ```
/// use flow_matching::kernel::{kernel_path, KernelPath};
/// assert!(kernel_path().is_supported());
/// ```
pub fn kernel_path() -> KernelPath {
    use std::sync::atomic::Ordering;
    if let Some(p) = KernelPath::from_code(PATH.load(Ordering::Relaxed)) {
        return p;
    }
    let want = requested_path()
        .ok()
        .flatten()
        .unwrap_or(KernelPath::Avx512);
    let p = KernelPath::ALL
        .into_iter()
        .rev()
        .find(|p| *p as u8 <= want as u8 && p.is_supported())
        .unwrap_or(KernelPath::Portable);
    PATH.store(p.code(), Ordering::Relaxed);
    p
}

/// Forces every kernel onto `path` from now on (tests use it to cover each path); a path this
/// CPU cannot run is refused.
pub fn set_kernel_path(path: KernelPath) -> crate::error::Result<()> {
    if !path.is_supported() {
        return Err(crate::error::Error::invalid(
            "kernel path",
            path.name(),
            format!(
                "one this CPU supports ({})",
                KernelPath::supported()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    PATH.store(path.code(), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The SIMD features of this CPU that matter to the kernels, as `/proc/cpuinfo` names them.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let all = [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vl", has!("avx512vl")),
            ("avx512_vnni", has!("avx512vnni")),
            ("avx512_bf16", has!("avx512bf16")),
        ];
        v.extend(all.iter().filter(|(_, on)| *on).map(|(n, _)| *n));
    }
    v
}

/// Calls `$body` compiled for the chosen [`KernelPath`]: for AVX-512, for AVX2+FMA, or the
/// portable build; the crate itself is compiled for baseline x86-64, which has no wide vectors.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident / $on:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            $on(kernel_path(), $($arg),*)
        }

        /// The same on a given path (which the CPU must support).
        pub(crate) fn $on(path: KernelPath, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wider($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match path {
                    // SAFETY: callers pass supported paths only.
                    KernelPath::Avx512 => return unsafe { wider($($arg),*) },
                    // SAFETY: as above.
                    KernelPath::Avx2 => return unsafe { wide($($arg),*) },
                    KernelPath::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}

// After the macro: the modules' kernels are built with it.
pub mod attention;
pub mod decoder;

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
    silu_keep_on(kernel_path(), z, s)
}

/// [`silu_keep`] on a given path (which the CPU must support).
pub(crate) fn silu_keep_on(path: KernelPath, z: &mut [f32], s: &mut [f32]) {
    let n = z.len().min(s.len());
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY: features detected; both slices hold n elements.
        KernelPath::Avx512 => return unsafe { x512::silu(z.as_mut_ptr(), s.as_mut_ptr(), n) },
        // SAFETY: as above.
        KernelPath::Avx2 => return unsafe { x86::silu(z.as_mut_ptr(), s.as_mut_ptr(), n) },
        KernelPath::Portable => {}
    }
    for (zi, si) in z[..n].iter_mut().zip(s.iter_mut()) {
        let sig = 1.0 / (1.0 + exp_approx(-*zi));
        *si = sig;
        *zi *= sig;
    }
}

/// `z = silu(z)` in place.
pub fn silu_inplace(z: &mut [f32]) {
    silu_inplace_on(kernel_path(), z)
}

/// [`silu_inplace`] on a given path (which the CPU must support).
pub(crate) fn silu_inplace_on(path: KernelPath, z: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (p, n) = (z.as_mut_ptr(), z.len());
        match path {
            // SAFETY: features detected; a null `s` is never written.
            KernelPath::Avx512 => return unsafe { x512::silu(p, std::ptr::null_mut(), n) },
            // SAFETY: as above.
            KernelPath::Avx2 => return unsafe { x86::silu(p, std::ptr::null_mut(), n) },
            KernelPath::Portable => {}
        }
    }
    for zi in z.iter_mut() {
        *zi /= 1.0 + exp_approx(-*zi);
    }
}

simd_dispatch! {
    /// `g *= silu'(z)` with `silu'(z) = s + a (1 - s)`, from the kept `a = silu(z)` and `s`.
    fn silu_backward / silu_backward_on(g: &mut [f32], a: &[f32], s: &[f32]) {
        for ((gi, ai), si) in g.iter_mut().zip(a).zip(s) {
            *gi *= *si + *ai * (1.0 - *si);
        }
    }
}

/// The dot product of two equal-length slices (AVX2+FMA with four accumulators when the CPU
/// has them: autovectorized reductions come out as shuffles).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_on(kernel_path(), a, b)
}

/// [`dot`] on a given path (which the CPU must support).
pub(crate) fn dot_on(path: KernelPath, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY: the features were detected; both slices hold at least n elements.
        KernelPath::Avx512 => return unsafe { x512::dot(a.as_ptr(), b.as_ptr(), n) },
        // SAFETY: as above.
        KernelPath::Avx2 => return unsafe { x86::dot(a.as_ptr(), b.as_ptr(), n) },
        KernelPath::Portable => {}
    }
    a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
mod x512;

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
    /// at `x + r * xs.0 + kk * xs.1`.
    #[inline(always)]
    unsafe fn tile<const MR: usize>(
        y: *mut f32,
        x: *const f32,
        xs: (usize, usize),
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
        // Blocks of 48 rows: their x (48 KiB at k = 256) stays in L2 while every column panel
        // of wt passes over it, instead of all of x streaming from memory once per panel.
        const ROWS: usize = 48;
        let mut b0 = 0;
        while b0 < m {
            let mb = ROWS.min(m - b0);
            panels(y.add(b0 * n), x.add(b0 * xs.0), xs, wt, mb, n, k);
            b0 += mb;
        }
    }

    #[inline(always)]
    unsafe fn panels(
        y: *mut f32,
        x: *const f32,
        xs: (usize, usize),
        wt: *const f32,
        m: usize,
        n: usize,
        k: usize,
    ) {
        let mut j0 = 0;
        while j0 < n {
            let mut r0 = 0;
            let (yj, wj) = (y.add(j0), wt.add(j0));
            while r0 + 6 <= m {
                tile::<6>(yj.add(r0 * n), x.add(r0 * xs.0), xs, wj, n, k);
                r0 += 6;
            }
            let (yr, xr) = (yj.add(r0 * n), x.add(r0 * xs.0));
            match m - r0 {
                5 => tile::<5>(yr, xr, xs, wj, n, k),
                4 => tile::<4>(yr, xr, xs, wj, n, k),
                3 => tile::<3>(yr, xr, xs, wj, n, k),
                2 => tile::<2>(yr, xr, xs, wj, n, k),
                1 => tile::<1>(yr, xr, xs, wj, n, k),
                _ => {}
            }
            j0 += 16;
        }
    }
}

simd_dispatch! {
    /// `y += a * x`.
    fn axpy / axpy_on(y: &mut [f32], a: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * *xi;
        }
    }
}

simd_dispatch! {
    /// `y += x`.
    fn add_assign / add_assign_on(y: &mut [f32], x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += *xi;
        }
    }
}

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
    let mut r0 = 0;
    while r0 < m {
        let mut j0 = 0;
        while j0 < n {
            tile::<1>(y, x, xs, wt, r0, j0, n, k);
            j0 += TILE_N;
        }
        r0 += 1;
    }
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
) {
    let mut acc = [[0f32; TILE_N]; MR];
    for (r, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&y[(r0 + r) * n + j0..(r0 + r) * n + j0 + TILE_N]);
    }
    for kk in 0..k {
        let b: &[f32; TILE_N] = match wt[kk * n + j0..kk * n + j0 + TILE_N].try_into() {
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
