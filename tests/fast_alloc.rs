//! The fast sampling loop allocates nothing per step: a 10-step sample makes exactly as many
//! allocations as a 1-step one. Its own test binary without the libtest harness
//! (`harness = false` in Cargo.toml), so no other thread allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use candle_nn::VarMap;
use flow_matching::{
    Diffusion, FlowMatching, SampleOptions, VelocityMlp, VelocityMlpConfig, XDims,
};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations(fm: &FlowMatching, model: &mut VelocityMlp, batch: usize, steps: usize) -> usize {
    let opts = SampleOptions {
        steps: Some(steps),
        ..SampleOptions::seeded(1)
    };
    let before = ALLOCS.load(Ordering::SeqCst);
    let s = fm.sample(batch, model, &Device::Cpu, &opts).unwrap();
    let after = ALLOCS.load(Ordering::SeqCst);
    drop(s);
    after - before
}

fn main() {
    let cfg = VelocityMlpConfig {
        hidden: 64,
        ..VelocityMlpConfig::new(XDims::new(2).unwrap())
    };
    let mut model = VelocityMlp::init(cfg, &VarMap::new(), &Device::Cpu, 0)
        .unwrap()
        .detach();
    let fm = FlowMatching::new(2).unwrap();
    // Warm up first: the thread pool's workers allocate as they start, in the background.
    for batch in [1, 16, 300] {
        allocations(&fm, &mut model, batch, 2);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    // 1 and 16 rows run on one thread, 300 on two.
    for batch in [1, 16, 300] {
        let one = allocations(&fm, &mut model, batch, 1);
        let ten = allocations(&fm, &mut model, batch, 10);
        assert_eq!(
            one, ten,
            "batch {batch}: {one} allocations for 1 step, {ten} for 10"
        );
    }
    println!("sampling allocations do not grow with steps: ok");
}
