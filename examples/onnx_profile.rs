//! Where tract's time goes in one ONNX velocity network: the plan `OnnxStep` builds (every
//! symbol substituted with the batch, optimised, one thread), timed node by node and summed by
//! operator.
//!
//! ```text
//! python3 bench/onnx_reference.py --export /tmp/ob      # the bench's waypoint transformer
//! cargo run --release --features onnx --example onnx_profile -- /tmp/ob/traj_bench.onnx 6 200
//! ```
//! Arguments: the model (inputs `x`, `t` and one condition `ctx`, all batch-first), the batch,
//! the number of timed calls.

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::OpState;
use tract_onnx::tract_core::plan::{eval, EvalContext};

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(String::as_str).unwrap_or("traj_bench.onnx");
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(6);
    let calls: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(200);
    let t0 = Instant::now();
    let model = tract_onnx::onnx()
        .model_for_path(path)?
        .into_typed()?
        .into_decluttered()?;
    let mut subs = HashMap::new();
    let mut inputs = tvec!();
    for o in model.input_outlets()? {
        let fact = model.outlet_fact(*o)?;
        let dims = fact.shape.dims();
        for d in dims.iter() {
            for s in d.symbols() {
                subs.insert(s, TDim::Val(batch as i64));
            }
        }
        let shape: Vec<usize> = dims
            .iter()
            .map(|d| d.as_i64().map_or(batch, |n| n as usize))
            .collect();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        inputs.push(Tensor::from_shape(&shape, &v)?.into_tvalue());
    }
    let specialised = model.set_symbols(&subs)?;
    // Multiply-adds per call from tract's cost model (what OnnxStep splits threads by).
    let mut fma = 0i64;
    for node in specialised.nodes() {
        let facts = specialised.node_input_facts(node.id)?;
        for (cost, n) in node.op.cost(&facts)? {
            if matches!(cost, tract_onnx::tract_core::ops::Cost::FMA(_)) {
                fma += n.to_i64()?;
            }
        }
    }
    let plan = specialised.into_optimized()?;
    let nodes = plan.nodes().len();
    let plan = plan.into_runnable()?;
    let mut state = plan.spawn()?;
    println!(
        "{path}: batch {batch}, {nodes} nodes after optimisation, planned in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    for _ in 0..10 {
        state.run(inputs.clone())?;
    }
    let t = Instant::now();
    for _ in 0..calls {
        state.run(inputs.clone())?;
    }
    let plain = t.elapsed().as_secs_f64() * 1e6 / calls as f64;
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let t = Instant::now();
    for _ in 0..calls {
        state.run_plan_with_eval(
            inputs.clone(),
            |ctx: &EvalContext, st: Option<&mut (dyn OpState + 'static)>, node, input| {
                let t = Instant::now();
                let r = eval(ctx, st, node, input);
                let e = by_op.entry(node.op().name().to_string()).or_default();
                e.0 += t.elapsed().as_secs_f64() * 1e6;
                e.1 += 1;
                r
            },
        )?;
    }
    let timed = t.elapsed().as_secs_f64() * 1e6 / calls as f64;
    println!("µs per call: {plain:.0} (plain run), {timed:.0} (timed node by node)");
    println!(
        "{:.1} M multiply-adds per call (tract's cost model): {:.1} GFLOP/s in the plain run",
        fma as f64 / 1e6,
        2.0 * fma as f64 / plain / 1e3
    );
    let mut rows: Vec<_> = by_op.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let total: f64 = rows.iter().map(|r| r.1 .0).sum();
    println!("| operator | nodes | µs per call | share |");
    println!("|---|---:|---:|---:|");
    for (op, (us, n)) in rows {
        println!(
            "| {op} | {} | {:.0} | {:.1}% |",
            n / calls,
            us / calls as f64,
            100.0 * us / total
        );
    }
    Ok(())
}
