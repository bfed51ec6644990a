//! Runs one benchmark figure in a loop for a profiler: `cargo run --release --example
//! profile_fast -- sample 1 2000`, `... rk4 1 500`, `... cfg 1 500`, `... traj 6 50` or `... train 4096 20`;
//! `FLOW_MATCHING_KERNEL=avx2` (or `portable`) compares the kernel paths.

#[allow(dead_code)]
#[path = "../src/harness.rs"]
mod harness;

fn main() -> flow_matching::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map_or("sample", String::as_str);
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let varmap = candle_nn::VarMap::new();
    // Sampling figures load the model from a file, as the bench does.
    let loaded = |m: flow_matching::VelocityMlp| -> flow_matching::Result<_> {
        let p =
            std::env::temp_dir().join(format!("profile-fast-{}.safetensors", std::process::id()));
        m.save(&p)?;
        let l = flow_matching::VelocityMlp::load(&p, &candle_core::Device::Cpu);
        let _ = std::fs::remove_file(&p);
        l
    };
    let v = match what {
        "train" => harness::train_steps_per_s(batch, reps)?,
        "cfg" => harness::cfg_sample_ms(&loaded(harness::conditional_model(&varmap)?)?, reps)?,
        "traj" => harness::traj_ms(&harness::traj_model()?, reps)?,
        "rk4" => {
            let m = loaded(harness::workload_model(&varmap)?)?;
            harness::sample_method_ms(&m, "rk4", batch, reps)?
        }
        _ => harness::sample_ms(&loaded(harness::workload_model(&varmap)?)?, batch, reps)?,
    };
    println!(
        "{what} batch {batch} ({} kernels): {v:.4}",
        flow_matching::kernel::kernel_path().name()
    );
    Ok(())
}
