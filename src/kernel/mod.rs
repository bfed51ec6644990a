//! Fused f32 CPU kernels: the path chosen at run time (AVX-512, AVX2+FMA or portable) and the
//! thread policy here; [`matmul`](self) (the packed matmul and matvec, weight-gradient forms,
//! `gemm` fallbacks), `elementwise` (exp, SiLU, dot), [`attention`] (softmax, layer norm,
//! sin/cos, attention), [`grad`] (the transformer's backward kernels), [`mlp`] (the velocity-mlp's passes) and [`euler`] (the allocation-free
//! Euler loop); `x86` and `x512` hold the AVX2 and AVX-512 builds.
//!
//! Plain candle spends most of a small-batch step in thread hand-offs and most of a large-batch
//! training step in single-threaded elementwise ops (shared/notes/candle-on-cpu.md); these
//! kernels work on preallocated slices instead.

pub mod euler;
pub mod mlp;
pub mod peak;

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
mod elementwise;
pub mod grad;
mod matmul;
#[cfg(target_arch = "x86_64")]
mod x512;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use elementwise::*;
pub use matmul::*;
