//! Times the minibatch OT solvers on the training case (two-moons data against standard
//! normal noise): shortest augmenting paths (`assignment`, used in training), Jonker–Volgenant
//! (`assignment_jv`) and Sinkhorn rounded to a permutation, with the total cost each finds.
//!
//! `cargo run --release --example assignment_timing -- [REPEATS]`

use flow_matching::coupling::{
    assignment, assignment_jv, sinkhorn_assignment, squared_cost, SINKHORN_EPSILON,
    SINKHORN_ITERATIONS,
};
use flow_matching::data::Toy;
use flow_matching::flow_matching::randn;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// CPU seconds (user + system) of this process so far, from /proc (the machine is shared,
/// so wall time says little).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

type Solver = fn(&[f64], usize) -> flow_matching::Result<Vec<usize>>;

fn main() -> flow_matching::Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let sinkhorn: Solver = |c, n| sinkhorn_assignment(c, n, SINKHORN_EPSILON, SINKHORN_ITERATIONS);
    let solvers: [(&str, Solver); 3] = [
        ("shortest-augmenting-path", assignment),
        ("jonker-volgenant", assignment_jv),
        ("sinkhorn", sinkhorn),
    ];
    println!("| rows | solver | CPU ms per batch | total cost / exact |");
    println!("| ---: | --- | ---: | ---: |");
    for n in [64usize, 256, 1024] {
        let mut rng = StdRng::seed_from_u64(n as u64);
        let x = Toy::Moons.sample(n, &mut rng)?;
        let z = randn(
            &mut rng,
            &[n, 2],
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let zs = z.flatten_all()?.to_vec1::<f32>()?;
        let cost = squared_cost(&xs, &zs, n, 2);
        let total = |col: &[usize]| (0..n).map(|i| cost[i * n + col[i]]).sum::<f64>();
        let exact = total(&assignment(&cost, n)?);
        for (name, solve) in solvers {
            let reps = if n >= 1024 {
                repeats.div_ceil(10)
            } else {
                repeats * 256 / n
            };
            let start = cpu_seconds();
            let mut col = Vec::new();
            for _ in 0..reps {
                col = solve(&cost, n)?;
            }
            let ms = (cpu_seconds() - start) * 1e3 / reps as f64;
            println!("| {n} | {name} | {ms:.2} | {:.4} |", total(&col) / exact);
        }
    }
    Ok(())
}
