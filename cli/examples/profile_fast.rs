//! Runs one benchmark figure in a loop for a profiler: `cargo run --release --example
//! profile_fast -- sample 1 2000` or `... train 4096 20`.

#[allow(dead_code)]
#[path = "../src/harness.rs"]
mod harness;

fn main() -> flow_matching::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map_or("sample", String::as_str);
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let v = if what == "train" {
        harness::train_steps_per_s(batch, reps)?
    } else {
        let model = harness::workload_model(&candle_nn::VarMap::new())?;
        harness::sample_ms(&model, batch, reps)?
    };
    println!("{what} batch {batch}: {v:.4}");
    Ok(())
}
