//! Minibatch couplings of noise and data for flow-matching training.
//!
//! Plain (independent) flow matching pairs each data row with an independent noise row, so
//! the learned paths cross and bend and few-step sampling is poor. Minibatch optimal-transport
//! coupling (OT-CFM, Tong et al. 2023; Pooladian et al. 2023) re-pairs the noise rows of each
//! batch with the data rows by the permutation that minimises the total squared distance,
//! which straightens the paths. Exact assignment ([`assignment`], shortest augmenting paths,
//! O(B³) worst case) is used up to [`EXACT_MAX_ROWS`] rows per group; larger groups use
//! entropic OT ([`sinkhorn_assignment`]) rounded to a permutation.
//!
//! With class labels, rows are paired only within the same class, so the noise of each class
//! is still an i.i.d. standard normal sample and the conditional flows stay correct. For
//! continuous conditions, [`condition_groups`] cuts the batch into groups of rows with nearby
//! conditions (an approximation: exact only when a group's conditions coincide).

use std::fmt;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::flow_matching::TrainingBatch;

/// Groups larger than this use Sinkhorn under [`OtSolver::Auto`].
pub const EXACT_MAX_ROWS: usize = 1024;

/// How training pairs noise rows with data rows within a batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Coupling {
    /// Each data row keeps the noise row drawn for it (plain flow matching).
    #[default]
    Independent,
    /// Minibatch optimal transport under the squared Euclidean cost.
    Ot(OtSolver),
}

/// How a minibatch OT assignment is solved.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum OtSolver {
    /// Exact up to [`EXACT_MAX_ROWS`] rows per group, Sinkhorn above.
    #[default]
    Auto,
    /// Always the exact assignment.
    Exact,
    /// Always Sinkhorn (entropic OT) rounded to a permutation.
    Sinkhorn,
}

/// The names [`Coupling`] parses from.
pub const COUPLING_NAMES: [&str; 4] = ["independent", "ot", "ot:exact", "ot:sinkhorn"];

impl std::str::FromStr for Coupling {
    type Err = Error;

    /// Parses `independent`, `ot` (exact or Sinkhorn by size), `ot:exact` or `ot:sinkhorn`.
    ///
    /// ```
    /// use flow_matching::coupling::{Coupling, OtSolver};
    /// assert_eq!("ot".parse::<Coupling>().unwrap(), Coupling::Ot(OtSolver::Auto));
    /// assert!("nearest".parse::<Coupling>().unwrap_err().to_string().contains("ot:sinkhorn"));
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "independent" | "none" => Ok(Coupling::Independent),
            "ot" => Ok(Coupling::Ot(OtSolver::Auto)),
            "ot:exact" => Ok(Coupling::Ot(OtSolver::Exact)),
            "ot:sinkhorn" => Ok(Coupling::Ot(OtSolver::Sinkhorn)),
            _ => Err(Error::UnknownName {
                kind: "coupling",
                name: s.to_string(),
                known: COUPLING_NAMES.join(", "),
            }),
        }
    }
}

impl fmt::Display for Coupling {
    /// The form [`str::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Coupling::Independent => "independent",
            Coupling::Ot(OtSolver::Auto) => "ot",
            Coupling::Ot(OtSolver::Exact) => "ot:exact",
            Coupling::Ot(OtSolver::Sinkhorn) => "ot:sinkhorn",
        })
    }
}

/// The squared Euclidean distances `|x_i - z_j|²` of two row-major tables of `n` rows of `d`
/// values, row-major `[n, n]`, in f64.
pub fn squared_cost(x: &[f32], z: &[f32], n: usize, d: usize) -> Vec<f64> {
    let mut c = vec![0f64; n * n];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for j in 0..n {
            let zj = &z[j * d..(j + 1) * d];
            c[i * n + j] = xi
                .iter()
                .zip(zj)
                .map(|(a, b)| {
                    let e = (*a - *b) as f64;
                    e * e
                })
                .sum();
        }
    }
    c
}

fn check_square(cost: &[f64], n: usize) -> Result<()> {
    if cost.len() != n * n {
        return Err(Error::invalid(
            "cost matrix",
            format!("{} entries", cost.len()),
            format!("{n} x {n} = {} entries", n * n),
        ));
    }
    if let Some(bad) = cost.iter().find(|c| !c.is_finite()) {
        return Err(Error::invalid(
            "cost matrix entry",
            bad,
            "a finite number (is the batch finite?)",
        ));
    }
    Ok(())
}

/// The same optimum as [`assignment`] by Jonker and Volgenant's LAPJV (1987): column
/// reduction with reduction transfer, two passes of augmenting row reduction, then shortest
/// augmenting paths for the rows still free. On the training case (two-moons data against
/// normal noise, `examples/assignment_timing`) its initialisation did not pay: 10.6 CPU ms
/// against 9.0 for [`assignment`] at 256 rows, 738 against 422 at 1024.
///
/// ```
/// use flow_matching::coupling::assignment_jv;
/// assert_eq!(assignment_jv(&[4.0, 1.0, 2.0, 8.0], 2).unwrap(), vec![1, 0]);
/// ```
pub fn assignment_jv(cost: &[f64], n: usize) -> Result<Vec<usize>> {
    check_square(cost, n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if n == 1 {
        return Ok(vec![0]);
    }
    let c = |i: usize, j: usize| cost[i * n + j];
    const NONE: usize = usize::MAX;
    let mut x = vec![NONE; n]; // column of each row
    let mut y = vec![NONE; n]; // row of each column
    let mut v = vec![f64::INFINITY; n]; // column duals

    // Column reduction: each column goes to its cheapest row; reduction transfer then lowers
    // the dual of columns whose row got just one.
    for i in 0..n {
        for j in 0..n {
            if c(i, j) < v[j] {
                v[j] = c(i, j);
                y[j] = i;
            }
        }
    }
    let mut unique = vec![true; n];
    for j in (0..n).rev() {
        let i = y[j];
        if x[i] == NONE {
            x[i] = j;
        } else {
            unique[i] = false;
            y[j] = NONE;
        }
    }
    let mut free = Vec::with_capacity(n);
    for i in 0..n {
        if x[i] == NONE {
            free.push(i);
        } else if unique[i] {
            let j = x[i];
            let min = (0..n)
                .filter(|&k| k != j)
                .map(|k| c(i, k) - v[k])
                .fold(f64::INFINITY, f64::min);
            v[j] -= min;
        }
    }

    // Augmenting row reduction, twice.
    for _ in 0..2 {
        if free.is_empty() {
            break;
        }
        let n_free = free.len();
        let mut current = 0usize;
        let mut new_free = 0usize;
        let mut rr_count = 0usize;
        while current < n_free {
            rr_count += 1;
            let fi = free[current];
            current += 1;
            // The best and second-best reduced costs of row fi.
            let (mut j1, mut v1, mut j2, mut v2) = (0usize, c(fi, 0) - v[0], NONE, f64::INFINITY);
            for (j, vj) in v.iter().enumerate().skip(1) {
                let h = c(fi, j) - vj;
                if h < v2 {
                    if h >= v1 {
                        v2 = h;
                        j2 = j;
                    } else {
                        v2 = v1;
                        v1 = h;
                        j2 = j1;
                        j1 = j;
                    }
                }
            }
            let mut i0 = y[j1];
            let v1_new = v[j1] - (v2 - v1);
            let v1_lowers = v1_new < v[j1];
            if rr_count < current * n {
                if v1_lowers {
                    v[j1] = v1_new;
                } else if i0 != NONE && j2 != NONE {
                    j1 = j2;
                    i0 = y[j2];
                }
                if i0 != NONE {
                    if v1_lowers {
                        current -= 1;
                        free[current] = i0;
                    } else {
                        free[new_free] = i0;
                        new_free += 1;
                    }
                }
            } else if i0 != NONE {
                free[new_free] = i0;
                new_free += 1;
            }
            x[fi] = j1;
            y[j1] = fi;
        }
        free.truncate(new_free);
    }

    // Shortest augmenting paths for the rows still free.
    let mut d = vec![0f64; n];
    let mut pred = vec![0usize; n];
    let mut cols: Vec<usize> = (0..n).collect();
    for &fi in &free {
        for (k, col) in cols.iter_mut().enumerate() {
            *col = k;
        }
        for j in 0..n {
            d[j] = c(fi, j) - v[j];
            pred[j] = fi;
        }
        let (mut lo, mut hi, mut n_ready) = (0usize, 0usize, 0usize);
        // The distance of the columns in the current scan list (all of [lo, hi) share it).
        let mut phase_min = 0f64;
        let mut final_j = NONE;
        while final_j == NONE {
            if lo == hi {
                // Move the columns at the minimum distance into the scan list [lo, hi).
                n_ready = lo;
                hi = lo + 1;
                let mut mind = d[cols[lo]];
                // k runs over the columns after the first; hi moves inside the loop.
                let mut k = hi;
                while k < n {
                    let j = cols[k];
                    if d[j] <= mind {
                        if d[j] < mind {
                            hi = lo;
                            mind = d[j];
                        }
                        cols[k] = cols[hi];
                        cols[hi] = j;
                        hi += 1;
                    }
                    k += 1;
                }
                phase_min = mind;
                for &j in &cols[lo..hi] {
                    if y[j] == NONE {
                        final_j = j;
                    }
                }
            }
            if final_j == NONE {
                // Scan the rows of the ready columns.
                while lo != hi && final_j == NONE {
                    let j = cols[lo];
                    lo += 1;
                    let i = y[j];
                    let mind = d[j];
                    let h = c(i, j) - v[j] - mind;
                    let mut k = hi;
                    while k < n {
                        let j = cols[k];
                        let red = c(i, j) - v[j] - h;
                        if red < d[j] {
                            d[j] = red;
                            pred[j] = i;
                            if red == mind {
                                if y[j] == NONE {
                                    final_j = j;
                                    break;
                                }
                                cols[k] = cols[hi];
                                cols[hi] = j;
                                hi += 1;
                            }
                        }
                        k += 1;
                    }
                }
            }
        }
        for &j in &cols[..n_ready] {
            v[j] += d[j] - phase_min;
        }
        // Augment along the path back to the free row.
        let mut j = final_j;
        loop {
            let i = pred[j];
            y[j] = i;
            let next = x[i];
            x[i] = j;
            if i == fi {
                break;
            }
            j = next;
        }
    }
    if x.contains(&NONE) {
        return Err(Error::Training(
            "assignment: a row was left unassigned".into(),
        ));
    }
    Ok(x)
}

/// The exact minimum-cost assignment of a square cost matrix (row-major `[n, n]`): `col[i]` is
/// the column given to row i, and `Σ cost[i][col[i]]` is minimal over all permutations.
///
/// Shortest augmenting paths with dual potentials: each row is added by a Dijkstra search
/// over reduced costs, O(n³) in the worst case (about 9 CPU ms for 256 noise/data pairs, 0.1
/// ms for 64). Measured faster here than LAPJV ([`assignment_jv`]).
///
/// ```
/// use flow_matching::coupling::assignment;
/// // Row 0 prefers column 1 and row 1 column 0.
/// let cost = [4.0, 1.0, 2.0, 8.0];
/// assert_eq!(assignment(&cost, 2).unwrap(), vec![1, 0]);
/// ```
pub fn assignment(cost: &[f64], n: usize) -> Result<Vec<usize>> {
    check_square(cost, n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // 1-based arrays with a virtual column 0, as in the classic formulation.
    let inf = f64::INFINITY;
    let mut u = vec![0f64; n + 1];
    let mut v = vec![0f64; n + 1];
    let mut p = vec![0usize; n + 1]; // p[j]: the row holding column j (0: free)
    let mut way = vec![0usize; n + 1];
    let mut minv = vec![inf; n + 1];
    let mut used = vec![false; n + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        minv.iter_mut().for_each(|m| *m = inf);
        used.iter_mut().for_each(|b| *b = false);
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let row = &cost[(i0 - 1) * n..i0 * n];
            let ui0 = u[i0];
            let mut delta = inf;
            let mut j1 = 0usize;
            for j in 1..=n {
                if !used[j] {
                    let cur = row[j - 1] - ui0 - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            if j1 == 0 {
                // Only possible with NaN costs, which check_square rules out.
                return Err(Error::Training(
                    "assignment: no augmenting column found".into(),
                ));
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut col = vec![0usize; n];
    for j in 1..=n {
        col[p[j] - 1] = j - 1;
    }
    Ok(col)
}

/// Entropic OT between two uniform sets (Sinkhorn's iterations on the kernel
/// `exp(-cost / ε)` with ε = `epsilon` × the mean cost), rounded to a permutation: rows in
/// order of their largest plan entry take their best still-free column. Stops after
/// `iterations` or when the column marginals are within 1e-3 (relative) of uniform.
///
/// ```
/// use flow_matching::coupling::sinkhorn_assignment;
/// let cost = [4.0, 1.0, 2.0, 8.0];
/// assert_eq!(sinkhorn_assignment(&cost, 2, 0.05, 200).unwrap(), vec![1, 0]);
/// ```
pub fn sinkhorn_assignment(
    cost: &[f64],
    n: usize,
    epsilon: f64,
    iterations: usize,
) -> Result<Vec<usize>> {
    check_square(cost, n)?;
    if !(epsilon > 0.0 && epsilon.is_finite()) {
        return Err(Error::invalid(
            "Sinkhorn epsilon",
            epsilon,
            "a finite number > 0 (a fraction of the mean cost)",
        ));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mean = cost.iter().sum::<f64>() / (n * n) as f64;
    let eps = epsilon * mean.max(1e-12);
    // Subtract each row's minimum before exponentiating so no row underflows to all zeros;
    // the row scaling absorbs the shift.
    let mut k = vec![0f64; n * n];
    for i in 0..n {
        let row = &cost[i * n..(i + 1) * n];
        let m = row.iter().copied().fold(f64::INFINITY, f64::min);
        for j in 0..n {
            k[i * n + j] = (-(row[j] - m) / eps).exp();
        }
    }
    let mut a = vec![1f64; n];
    let mut b = vec![1f64; n];
    let mut kb = vec![0f64; n];
    let mut ka = vec![0f64; n];
    for _ in 0..iterations.max(1) {
        for i in 0..n {
            kb[i] = k[i * n..(i + 1) * n]
                .iter()
                .zip(&b)
                .map(|(x, y)| x * y)
                .sum();
        }
        for i in 0..n {
            a[i] = 1.0 / kb[i].max(1e-300);
        }
        ka.iter_mut().for_each(|x| *x = 0.0);
        for i in 0..n {
            let ai = a[i];
            for (kaj, kij) in ka.iter_mut().zip(&k[i * n..(i + 1) * n]) {
                *kaj += ai * kij;
            }
        }
        let mut err = 0f64;
        for j in 0..n {
            err = err.max((ka[j] * b[j] - 1.0).abs());
            b[j] = 1.0 / ka[j].max(1e-300);
        }
        if err < 1e-3 {
            break;
        }
    }
    // Round: rows whose best plan entry is largest choose first.
    let plan = |i: usize, j: usize| a[i] * k[i * n + j] * b[j];
    let mut order: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let best = (0..n).map(|j| plan(i, j)).fold(0f64, f64::max);
            (best, i)
        })
        .collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut taken = vec![false; n];
    let mut col = vec![0usize; n];
    for &(_, i) in &order {
        let mut best: Option<(f64, usize)> = None;
        for j in (0..n).filter(|&j| !taken[j]) {
            let score = plan(i, j);
            // Ties (plan entries underflowed to zero far from the mass) go to the lower cost.
            let better = match best {
                None => true,
                Some((s, b)) => score > s || (score == s && cost[i * n + j] < cost[i * n + b]),
            };
            if better {
                best = Some((score, j));
            }
        }
        let best = best.map_or(0, |(_, j)| j);
        taken[best] = true;
        col[i] = best;
    }
    Ok(col)
}

/// ε of [`sinkhorn_assignment`] under [`OtSolver::Auto`], as a fraction of the mean cost.
pub const SINKHORN_EPSILON: f64 = 0.01;
/// Iteration cap of [`sinkhorn_assignment`] under [`OtSolver::Auto`].
pub const SINKHORN_ITERATIONS: usize = 200;

/// The OT assignment of one group of `n` rows: `col[i]` is the noise row for data row i.
fn solve(x: &[f32], z: &[f32], n: usize, d: usize, solver: OtSolver) -> Result<Vec<usize>> {
    let cost = squared_cost(x, z, n, d);
    let exact = match solver {
        OtSolver::Exact => true,
        OtSolver::Sinkhorn => false,
        OtSolver::Auto => n <= EXACT_MAX_ROWS,
    };
    if exact {
        assignment(&cost, n)
    } else {
        sinkhorn_assignment(&cost, n, SINKHORN_EPSILON, SINKHORN_ITERATIONS)
    }
}

/// For each data row, the index of the noise row it is paired with: the identity for
/// [`Coupling::Independent`], else the OT assignment within each group (rows with equal
/// `groups[i]`; `None` puts every row in one group). `x` and `noise` are `[B, *x_dims]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::coupling::{pairing, Coupling};
/// let x = Tensor::new(&[[0f32, 0.0], [10.0, 10.0]], &Device::Cpu).unwrap();
/// let z = Tensor::new(&[[9f32, 9.0], [1.0, 1.0]], &Device::Cpu).unwrap();
/// let ot: Coupling = "ot".parse().unwrap();
/// assert_eq!(pairing(ot, &x, &z, None).unwrap(), vec![1, 0]);
/// // Different groups never exchange noise.
/// assert_eq!(pairing(ot, &x, &z, Some(&[0, 1])).unwrap(), vec![0, 1]);
/// ```
pub fn pairing(
    coupling: Coupling,
    x: &Tensor,
    noise: &Tensor,
    groups: Option<&[u32]>,
) -> Result<Vec<usize>> {
    if noise.dims() != x.dims() || x.rank() == 0 {
        return Err(Error::Shape {
            what: "noise to couple".into(),
            expected: format!("{:?} (the shape of the data batch)", x.dims()),
            got: noise.dims().to_vec(),
        });
    }
    let b = x.dim(0)?;
    let identity: Vec<usize> = (0..b).collect();
    let solver = match coupling {
        Coupling::Independent => return Ok(identity),
        Coupling::Ot(s) => s,
    };
    if let Some(g) = groups {
        if g.len() != b {
            return Err(Error::invalid(
                "coupling groups",
                format!("{} group ids", g.len()),
                format!("one per row of the batch ({b})"),
            ));
        }
    }
    let d = x.elem_count() / b.max(1);
    let xs = rows_f32(x)?;
    let zs = rows_f32(noise)?;
    // Members of each group, in row order.
    let mut members: Vec<(u32, Vec<usize>)> = Vec::new();
    match groups {
        None => members.push((0, identity.clone())),
        Some(g) => {
            let mut ids: Vec<u32> = g.to_vec();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                members.push((id, (0..b).filter(|&i| g[i] == id).collect()));
            }
        }
    }
    let mut out = identity;
    for (_, rows) in &members {
        let m = rows.len();
        if m < 2 {
            continue;
        }
        let gather = |src: &[f32]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| src[r * d..(r + 1) * d].iter().copied())
                .collect()
        };
        let col = solve(&gather(&xs), &gather(&zs), m, d, solver)?;
        for (k, &r) in rows.iter().enumerate() {
            out[r] = rows[col[k]];
        }
    }
    Ok(out)
}

fn rows_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Re-pairs a training batch's noise with its data by `coupling` (within `groups`, see
/// [`pairing`]), keeping its times and drop mask; independent coupling returns it unchanged.
pub fn couple_batch(
    coupling: Coupling,
    batch: TrainingBatch,
    groups: Option<&[u32]>,
) -> Result<TrainingBatch> {
    if coupling == Coupling::Independent {
        return Ok(batch);
    }
    let perm = pairing(coupling, &batch.x, &batch.noise, groups)?;
    let idx: Vec<u32> = perm.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, perm.len(), batch.noise.device())?;
    let noise = batch.noise.index_select(&idx, 0)?;
    let b = perm.len();
    TrainingBatch::from_parts(
        &batch.x,
        &batch.t.reshape(b)?,
        &noise,
        batch.drop_mask.clone(),
    )
}

/// Group ids for continuous conditions `[B, ...]`: rows sorted by their condition's
/// projection on its first coordinate-wise standardised direction of largest spread, then cut
/// into consecutive groups of about `group_size` rows. Pairing within such groups is an
/// approximation of conditional OT (exact when a group's conditions coincide); larger groups
/// straighten more and mix more distinct conditions.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let c = Tensor::new(&[[0.9f32], [0.1], [0.8], [0.2]], &Device::Cpu).unwrap();
/// let g = flow_matching::coupling::condition_groups(&c, 2).unwrap();
/// assert_eq!(g, vec![1, 0, 1, 0]);
/// ```
pub fn condition_groups(cond: &Tensor, group_size: usize) -> Result<Vec<u32>> {
    if group_size == 0 {
        return Err(Error::invalid(
            "coupling group size",
            0,
            "at least 1 row per group",
        ));
    }
    if cond.rank() == 0 {
        return Err(Error::Shape {
            what: "conditions to group".into(),
            expected: "[B, ...]".into(),
            got: vec![],
        });
    }
    let b = cond.dim(0)?;
    if b == 0 {
        return Ok(Vec::new());
    }
    let d = cond.elem_count() / b;
    let c = rows_f32(cond)?;
    // The standardised coordinate with the largest spread orders the rows (a cheap stand-in
    // for a principal direction that needs no eigen-solver).
    let mut key = vec![0f64; b];
    let mut best_var = -1.0;
    for k in 0..d {
        let col: Vec<f64> = (0..b).map(|i| c[i * d + k] as f64).collect();
        let mean = col.iter().sum::<f64>() / b as f64;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / b as f64;
        if var > best_var {
            best_var = var;
            key = col;
        }
    }
    let mut order: Vec<usize> = (0..b).collect();
    order.sort_by(|&i, &j| key[i].total_cmp(&key[j]).then(i.cmp(&j)));
    let groups = b.div_ceil(group_size).max(1);
    let mut out = vec![0u32; b];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = (rank * groups / b) as u32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn brute_force(cost: &[f64], n: usize) -> f64 {
        fn rec(cost: &[f64], n: usize, i: usize, used: &mut Vec<bool>) -> f64 {
            if i == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[i * n + j] + rec(cost, n, i + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        rec(cost, n, 0, &mut vec![false; n])
    }

    fn total(cost: &[f64], n: usize, col: &[usize]) -> f64 {
        (0..n).map(|i| cost[i * n + col[i]]).sum()
    }

    #[test]
    fn assignment_is_optimal_against_brute_force() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in 1..=7 {
            for _ in 0..20 {
                let cost: Vec<f64> = (0..n * n).map(|_| rng.random_range(0.0..10.0)).collect();
                let want = brute_force(&cost, n);
                for col in [
                    assignment(&cost, n).unwrap(),
                    assignment_jv(&cost, n).unwrap(),
                ] {
                    let mut seen = col.clone();
                    seen.sort_unstable();
                    assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
                    let got = total(&cost, n, &col);
                    assert!((got - want).abs() < 1e-9, "n={n}: {got} vs optimum {want}");
                }
            }
        }
    }

    #[test]
    fn jonker_volgenant_agrees_with_plain_augmenting_paths() {
        let mut rng = StdRng::seed_from_u64(11);
        for n in [8, 50, 200] {
            // Point clouds (the training case) and integer costs (many ties).
            let x: Vec<f32> = (0..2 * n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let z: Vec<f32> = (0..2 * n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let ints: Vec<f64> = (0..n * n).map(|_| rng.random_range(0..5) as f64).collect();
            for cost in [squared_cost(&x, &z, n, 2), ints] {
                let a = total(&cost, n, &assignment_jv(&cost, n).unwrap());
                let b = total(&cost, n, &assignment(&cost, n).unwrap());
                assert!((a - b).abs() < 1e-9 * b.max(1.0), "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn sinkhorn_is_a_permutation_close_to_optimal() {
        let mut rng = StdRng::seed_from_u64(5);
        let n = 64;
        let x: Vec<f32> = (0..2 * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let z: Vec<f32> = (0..2 * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let cost = squared_cost(&x, &z, n, 2);
        let exact = total(&cost, n, &assignment(&cost, n).unwrap());
        let col = sinkhorn_assignment(&cost, n, 0.01, 500).unwrap();
        let mut seen = col.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        let identity = total(&cost, n, &(0..n).collect::<Vec<_>>());
        let got = total(&cost, n, &col);
        assert!(got >= exact - 1e-9);
        // Far closer to the optimum than the independent pairing.
        assert!(
            got - exact < 0.1 * (identity - exact),
            "sinkhorn {got}, exact {exact}, identity {identity}"
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = assignment(&[1.0, 2.0, 3.0], 2).unwrap_err().to_string();
        assert!(e.contains("cost matrix") && e.contains("2 x 2"), "{e}");
        let e = assignment(&[1.0, f64::NAN, 3.0, 4.0], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("finite"), "{e}");
        let e = sinkhorn_assignment(&[1.0], 1, 0.0, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("epsilon"), "{e}");
    }

    #[test]
    fn labels_keep_noise_within_class() {
        let mut rng = StdRng::seed_from_u64(9);
        let b = 40;
        let x: Vec<f32> = (0..2 * b).map(|_| rng.random_range(-2.0..2.0)).collect();
        let z: Vec<f32> = (0..2 * b).map(|_| rng.random_range(-2.0..2.0)).collect();
        let xt = Tensor::from_vec(x, (b, 2), &Device::Cpu).unwrap();
        let zt = Tensor::from_vec(z, (b, 2), &Device::Cpu).unwrap();
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 3).collect();
        let p = pairing(Coupling::Ot(OtSolver::Exact), &xt, &zt, Some(&labels)).unwrap();
        for (i, &j) in p.iter().enumerate() {
            assert_eq!(labels[i], labels[j]);
        }
        let mut seen = p.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..b).collect::<Vec<_>>());
    }
}
