//! Element-wise kernels and the dot product: branch-free `exp`, SiLU (keeping the sigmoid for
//! the backward pass), and a four-accumulator dot product, each dispatched per path.

use super::*;

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
    // 2^n from the float's own bits: adding 1.5 * 2^23 leaves n + 127 (0..=254 after the clamp)
    // in the low mantissa bits, and shifting them into the exponent field is a pure bit
    // operation. (`n as i32` is a saturating cast whose NaN and range checks kept the loops
    // that call this scalar.)
    let bits = (n + (12_582_912.0 + 127.0)).to_bits() << 23;
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
