//! The fast sampling loop allocates nothing per step: a 10-step sample makes exactly as many
//! allocations as a 1-step one, for every method (recorded or not), guidance and encoding, and
//! an adaptive run of many steps as many as one of few; and the bytes a run asks for do not
//! grow with its step count either (the time grid is computed, not stored). Its own test binary without the libtest harness
//! (`harness = false` in Cargo.toml), so no other thread allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use flow_matching::guidance::Guided;
use flow_matching::{
    AdaptiveOptions, Diffusion, FlowMatching, Method, SampleOptions, StepFn, VelocityMlp,
    VelocityMlpConfig, XDims,
};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(layout.size(), Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(new_size, Ordering::SeqCst);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by one `sample` call (and the call's step counts).
fn allocations(
    fm: &FlowMatching,
    f: &mut dyn StepFn,
    batch: usize,
    opts: &SampleOptions,
) -> (usize, usize) {
    let before = ALLOCS.load(Ordering::SeqCst);
    let s = fm.sample(batch, f, &Device::Cpu, opts).unwrap();
    let after = ALLOCS.load(Ordering::SeqCst);
    let steps = s.accepted_steps + s.rejected_steps;
    drop(s);
    (after - before, steps)
}

/// Allocations made by one `encode` call.
fn encode_allocations(fm: &FlowMatching, f: &mut dyn StepFn, opts: &SampleOptions) -> usize {
    let x = fm.noise(3, Some(4), DType::F32, &Device::Cpu).unwrap();
    let before = ALLOCS.load(Ordering::SeqCst);
    let s = fm.encode(&x, f, opts).unwrap();
    let after = ALLOCS.load(Ordering::SeqCst);
    drop(s);
    after - before
}

/// Allocations a run may make beyond a 1-step run's. One thread (up to 63 rows): none. Two
/// threads: each step's evaluations fork with `rayon::join` from outside the pool, which
/// pushes a job onto rayon's injector queue, and that queue allocates one block per 63 pushes
/// whatever the caller does; 10 steps of at most 4 evaluations cross at most one block.
/// (Whole-run Euler forks once per run and stays exact.)
fn pool_slack(batch: usize) -> usize {
    usize::from(batch >= 64)
}

fn opts(method: &str, steps: usize, record: bool) -> SampleOptions {
    SampleOptions {
        steps: Some(steps),
        method: Some(method.parse().unwrap()),
        return_all_steps: record,
        ..SampleOptions::seeded(1)
    }
}

fn main() {
    let cfg = VelocityMlpConfig {
        hidden: 64,
        ..VelocityMlpConfig::new(XDims::new(2).unwrap())
    };
    let mut model = VelocityMlp::init(cfg.clone(), &VarMap::new(), &Device::Cpu, 0)
        .unwrap()
        .detach();
    let cond_cfg = VelocityMlpConfig {
        num_classes: 3,
        ..cfg
    };
    let cond = VelocityMlp::init(cond_cfg, &VarMap::new(), &Device::Cpu, 1)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    let methods = ["euler", "midpoint", "heun", "rk4"];
    // Warm up first: the thread pool's workers allocate as they start, in the background.
    for batch in [1, 16, 300] {
        for m in methods {
            allocations(&fm, &mut model, batch, &opts(m, 2, false));
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    // 1 and 16 rows run on one thread, 300 on two.
    for batch in [1, 16, 300] {
        for m in methods {
            for record in [false, true] {
                let (one, _) = allocations(&fm, &mut model, batch, &opts(m, 1, record));
                let (ten, _) = allocations(&fm, &mut model, batch, &opts(m, 10, record));
                assert!(
                    ten <= one + pool_slack(batch),
                    "{m} batch {batch} record {record}: {one} allocations for 1 step, {ten} for 10"
                );
            }
        }
        // Classifier-free guidance: one fused 2B-row evaluation per step.
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 3).collect();
        for m in ["euler", "rk4"] {
            let mut g = Guided::new(&cond, &labels, 2.0).unwrap();
            allocations(&fm, &mut g, batch, &opts(m, 2, false));
            let (one, _) = allocations(&fm, &mut g, batch, &opts(m, 1, false));
            let (ten, _) = allocations(&fm, &mut g, batch, &opts(m, 10, false));
            assert!(
                ten <= one + pool_slack(batch),
                "guided {m} batch {batch}: {one} vs {ten}"
            );
        }
    }
    // Dormand-Prince: a tighter tolerance takes more steps, with no more allocations.
    let tol = |rtol: f64| SampleOptions {
        method: Some(Method::Dopri5(AdaptiveOptions {
            rtol,
            atol: rtol,
            ..AdaptiveOptions::default()
        })),
        ..SampleOptions::seeded(1)
    };
    allocations(&fm, &mut model, 16, &tol(1e-2));
    let (loose, loose_steps) = allocations(&fm, &mut model, 16, &tol(1e-2));
    let (tight, tight_steps) = allocations(&fm, &mut model, 16, &tol(1e-6));
    assert!(
        tight_steps > loose_steps + 3,
        "{loose_steps} vs {tight_steps}"
    );
    assert_eq!(
        loose, tight,
        "dopri5: {loose} allocations for {loose_steps} steps, {tight} for {tight_steps}"
    );
    // Encoding (the grid run backwards) takes the same loop.
    for m in methods {
        let one = encode_allocations(&fm, &mut model, &opts(m, 1, false));
        let ten = encode_allocations(&fm, &mut model, &opts(m, 10, false));
        assert_eq!(one, ten, "encode {m}: {one} vs {ten}");
    }
    // Bytes: a 200,000-step run (its stored grid would be 1.6 MB) asks for what a 10-step run
    // asks for, on the fast path, the tensor path (a closure) and the likelihood's.
    let bytes = |f: &mut dyn StepFn, steps: usize, method: &str| {
        let before = BYTES.load(Ordering::SeqCst);
        fm.sample(1, f, &Device::Cpu, &opts(method, steps, false))
            .unwrap();
        BYTES.load(Ordering::SeqCst) - before
    };
    for m in ["euler", "rk4"] {
        bytes(&mut model, 10, m);
        let (short, long) = (bytes(&mut model, 10, m), bytes(&mut model, 200_000, m));
        assert!(
            long <= short + 4096,
            "fast {m}: {short} bytes for 10 steps, {long} for 200000"
        );
    }
    // The grid every path integrates along: ten million steps, validated, stores nothing.
    let before = BYTES.load(Ordering::SeqCst);
    let grid = flow_matching::Schedule::Cosine
        .time_grid(10_000_000, DType::F64)
        .unwrap()
        .reversed();
    let steps = grid.windows().count();
    let used = BYTES.load(Ordering::SeqCst) - before;
    assert_eq!(
        (steps, grid.first(), grid.last()),
        (10_000_000, Some(1.0), Some(0.0))
    );
    assert!(used < 1024, "a 10^7-step grid asked for {used} bytes");
    expert();
    println!("sampling allocations do not grow with steps: ok");
}

/// The action expert: a new prefix cache of the shape of the one before allocates nothing
/// (no re-packing, no new buffers), and its steps allocate nothing either.
fn expert() {
    use flow_matching::model::expert::{ActionExpert, PrefixCache};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden");
    let mut e = ActionExpert::load(root.join("expert-qwen3/model"), &Device::Cpu).unwrap();
    let cache = |seed: u64| {
        let mut k = Vec::new();
        let mut v = Vec::new();
        for i in 0..4 {
            let t = |j: u64| {
                let n = 2 * 96 * 64;
                let vals: Vec<f32> = (0..n)
                    .map(|x| ((x as u64 * 31 + seed * 7 + i * 3 + j) % 17) as f32 / 17.0 - 0.5)
                    .collect();
                candle_core::Tensor::from_vec(vals, (1, 2, 96, 64), &Device::Cpu).unwrap()
            };
            k.push(t(0));
            v.push(t(1));
        }
        PrefixCache::from_tensors(&k, &v, None, None).unwrap()
    };
    let fm = FlowMatching::new(e.x_dims()).unwrap();
    let euler = |steps| SampleOptions {
        steps: Some(steps),
        ..SampleOptions::seeded(3)
    };
    e.set_condition(cache(0)).unwrap();
    allocations(&fm, &mut e, 6, &euler(2));
    let (one, _) = allocations(&fm, &mut e, 6, &euler(1));
    let (ten, _) = allocations(&fm, &mut e, 6, &euler(10));
    assert!(
        ten <= one + 1,
        "expert: {one} allocations for 1 step, {ten} for 10"
    );
    // The caches are made before counting: only set_condition's own work is counted.
    let next = cache(1);
    let before = ALLOCS.load(Ordering::SeqCst);
    e.set_condition(next).unwrap();
    let made = ALLOCS.load(Ordering::SeqCst) - before;
    assert_eq!(
        made, 0,
        "set_condition with a cache of the same shape allocated {made} times"
    );
}
