//! Unicycle actions to positions, and the seed's trajectory metrics minADE_K / minFDE_K.
//!
//! A future is `T` actions (acceleration a in m/s², curvature κ in 1/m) at [`DT`] = 0.1 s,
//! stored normalised per channel ([`ActionScales`]). [`integrate`] turns physical actions
//! into `T` ground-plane positions (metres, the car starting at the origin heading along +x
//! at speed v0) exactly as the seed does (trapezoid rule, speed not clamped at zero):
//!
//! ```text
//! v[k+1] = v[k] + a[k] dt
//! θ[k+1] = θ[k] + κ[k] v[k] dt + κ[k] a[k] dt² / 2
//! x[k+1] = x[k] + (v[k] cos θ[k] + v[k+1] cos θ[k+1]) dt / 2     (the same with sin for y)
//! ```
//!
//! minADE is scored as the seed scores it ([`seed_min_ade`], [`min_ade_fde`]): for each scene
//! (and each set of K samples) ONE sample is kept, the one with the lowest mean ground-plane
//! (x, y) distance to the truth over the WHOLE horizon, and that sample's mean distance over
//! waypoints 1..=n is reported at every horizon n (0.5, 1, 3, 5 s and the whole); with several
//! sets, the mean over sets and its spread `_std`; then the mean over scenes. minFDE is, as in
//! the seed, each horizon's own best distance at waypoint n. The convention this crate used
//! before (each horizon picking its own best sample, 13-37% lower at the short horizons) is
//! kept as an extra under its own name, `min_ade_per_horizon` / `minADE_ph`.
//!
//! Logged poses to actions and back, with the seed's smoothing, are in [`crate::unicycle`].

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// An array read from a file or given by a caller, with the name its errors use.
#[derive(Debug, Clone, Copy)]
pub struct NamedArray<'a> {
    /// How errors name it, e.g. `--hist-xyz H.npy`.
    pub name: &'a str,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its values in C order.
    pub data: &'a [f64],
}

/// Time between waypoints, seconds.
pub const DT: f64 = 0.1;

/// The seed's report horizons in seconds: 0.5, 1, 3, 5 s and the whole 6.4 s.
pub const HORIZONS_S: [f64; 5] = [0.5, 1.0, 3.0, 5.0, 6.4];

/// The normalisation of the two action channels: `a = a_norm * accel_std + accel_mean`, the
/// same for curvature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActionScales {
    /// Mean acceleration, m/s².
    pub accel_mean: f64,
    /// Acceleration scale, m/s² (> 0).
    pub accel_std: f64,
    /// Mean curvature, 1/m.
    pub curv_mean: f64,
    /// Curvature scale, 1/m (> 0).
    pub curv_std: f64,
}

impl ActionScales {
    /// Identity scales: actions are already physical.
    pub const IDENTITY: ActionScales = ActionScales {
        accel_mean: 0.0,
        accel_std: 1.0,
        curv_mean: 0.0,
        curv_std: 1.0,
    };

    /// Physical `(a, κ)` from normalised values.
    pub fn denormalise(&self, n: [f64; 2]) -> [f64; 2] {
        [
            n[0] * self.accel_std + self.accel_mean,
            n[1] * self.curv_std + self.curv_mean,
        ]
    }

    /// Normalised values from physical `(a, κ)`.
    pub fn normalise(&self, p: [f64; 2]) -> [f64; 2] {
        [
            (p[0] - self.accel_mean) / self.accel_std,
            (p[1] - self.curv_mean) / self.curv_std,
        ]
    }
}

/// The waypoint count of each horizon in seconds (`round(h / DT)`), e.g. 0.5 s is 5.
pub fn horizon_steps(seconds: &[f64]) -> Vec<usize> {
    seconds.iter().map(|h| (h / DT).round() as usize).collect()
}

/// Positions of the `T` waypoints reached by physical actions `(a, κ)` from speed `v0`
/// (origin, heading +x): waypoint k+1 is the position after action k.
///
/// ```
/// // Constant speed 10 m/s, no curvature: 1 m a step along x.
/// let p = flow_matching::trajectory::integrate(&[[0.0, 0.0]; 3], 10.0);
/// assert!((p[2][0] - 3.0).abs() < 1e-12 && p[2][1] == 0.0);
/// ```
pub fn integrate(actions: &[[f64; 2]], v0: f64) -> Vec<[f64; 2]> {
    let (mut v, mut th, mut x, mut y) = (v0, 0.0f64, 0.0f64, 0.0f64);
    let mut out = Vec::with_capacity(actions.len());
    for &[a, k] in actions {
        let v1 = v + a * DT;
        let th1 = th + k * v * DT + k * a * DT * DT / 2.0;
        x += (v * th.cos() + v1 * th1.cos()) * DT / 2.0;
        y += (v * th.sin() + v1 * th1.sin()) * DT / 2.0;
        (v, th) = (v1, th1);
        out.push([x, y]);
    }
    out
}

/// Normalised actions `[N, T, 2]` to positions `[N, T, 2]` (f32, metres), row n starting at
/// speed `v0[n]`; computed in f64 on the CPU.
pub fn positions(actions: &Tensor, v0: &[f64], scales: &ActionScales) -> Result<Tensor> {
    let rows = rows_3d(actions, "actions")?;
    if rows.len() != v0.len() {
        return Err(Error::invalid(
            "start speeds",
            format!("{} speeds", v0.len()),
            format!("one per trajectory ({})", rows.len()),
        ));
    }
    let t = actions.dims()[1];
    let mut out = Vec::with_capacity(rows.len() * t * 2);
    for (row, &v) in rows.iter().zip(v0) {
        let phys: Vec<[f64; 2]> = row.iter().map(|&a| scales.denormalise(a)).collect();
        for p in integrate(&phys, v) {
            out.push(p[0] as f32);
            out.push(p[1] as f32);
        }
    }
    Ok(Tensor::from_vec(out, (rows.len(), t, 2), &Device::Cpu)?)
}

/// The rows of a `[N, T, 2]` tensor as f64 pairs.
fn rows_3d(t: &Tensor, what: &str) -> Result<Vec<Vec<[f64; 2]>>> {
    let d = t.dims();
    if d.len() != 3 || d[2] != 2 || d[0] == 0 || d[1] == 0 {
        return Err(Error::Shape {
            what: what.into(),
            expected: "[N, T, 2] with N, T >= 1".into(),
            got: d.to_vec(),
        });
    }
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec3::<f64>()?;
    Ok(v.into_iter()
        .map(|r| r.into_iter().map(|p| [p[0], p[1]]).collect())
        .collect())
}

/// minADE_K and minFDE_K at several horizons, averaged over scenes (metres).
#[derive(Debug, Clone, PartialEq)]
pub struct MinAde {
    /// Samples per scene K.
    pub k: usize,
    /// Scenes averaged over.
    pub scenes: usize,
    /// Waypoints per trajectory (the whole horizon, which picks the sample).
    pub t: usize,
    /// Horizons, in waypoints.
    pub horizons: Vec<usize>,
    /// minADE_K at each horizon, the seed's way: the error of the one sample per scene with
    /// the lowest whole-horizon mean.
    pub ade: Vec<f64>,
    /// minADE_K at each horizon with each horizon's own best sample (not the seed's; lower).
    pub ade_per_horizon: Vec<f64>,
    /// minFDE_K at each horizon (each horizon's own best sample, as the seed's minFDE).
    pub fde: Vec<f64>,
}

impl MinAde {
    /// minADE_K over the longest horizon.
    pub fn ade_full(&self) -> f64 {
        self.ade.last().copied().unwrap_or(f64::NAN)
    }

    /// minFDE_K at the longest horizon.
    pub fn fde_full(&self) -> f64 {
        self.fde.last().copied().unwrap_or(f64::NAN)
    }
}

/// minADE_K / minFDE_K of `samples` `[N * K, T, 2]` (condition-major: row `n * K + j` is
/// sample j of scene n) against `truth` `[N, T, 2]`, both positions in metres, at each
/// horizon in `horizons` (waypoint counts, 1..=T); minADE the seed's way (see the module
/// docs), with the per-horizon best as [`MinAde::ade_per_horizon`]. A non-finite sample
/// counts as infinitely far, so a scene whose samples all diverged makes the report
/// infinite, not NaN.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::trajectory::min_ade_fde;
/// // One scene, two waypoints at the origin; sample a is off by (0, 4), sample b by (1, 1).
/// let truth = Tensor::new(&[[[0f32, 0.0], [0.0, 0.0]]], &Device::Cpu).unwrap();
/// let samples =
///     Tensor::new(&[[[0f32, 0.0], [0.0, 4.0]], [[1.0, 0.0], [1.0, 0.0]]], &Device::Cpu).unwrap();
/// let m = min_ade_fde(&samples, &truth, 2, &[1, 2]).unwrap();
/// // b has the lower whole-horizon mean (1 against 2), so the seed reports b at both horizons.
/// assert_eq!(m.ade, vec![1.0, 1.0]);
/// // Each horizon's own best: a at one waypoint.
/// assert_eq!(m.ade_per_horizon, vec![0.0, 1.0]);
/// ```
pub fn min_ade_fde(
    samples: &Tensor,
    truth: &Tensor,
    k: usize,
    horizons: &[usize],
) -> Result<MinAde> {
    let truth = rows_3d(truth, "ground-truth positions")?;
    let samples = rows_3d(samples, "sampled positions")?;
    let (n, t) = (truth.len(), truth[0].len());
    if k == 0 {
        return Err(Error::invalid("samples per scene K", 0, "at least 1"));
    }
    if samples.len() != n * k || samples[0].len() != t {
        return Err(Error::Shape {
            what: "sampled positions".into(),
            expected: format!("[{} (= {n} scenes x K = {k}), {t}, 2]", n * k),
            got: vec![samples.len(), samples[0].len(), 2],
        });
    }
    if horizons.is_empty() {
        return Err(Error::invalid("horizons", "none", "at least one horizon"));
    }
    if let Some(&h) = horizons.iter().find(|&&h| h == 0 || h > t) {
        return Err(Error::invalid(
            "horizon",
            h,
            format!("a waypoint count in 1..={t}"),
        ));
    }
    let mut ade = vec![0.0; horizons.len()];
    let mut ade_ph = vec![0.0; horizons.len()];
    let mut fde = vec![0.0; horizons.len()];
    for (scene, gt) in truth.iter().enumerate() {
        let mut best_ph = vec![f64::INFINITY; horizons.len()];
        let mut best_fde = vec![f64::INFINITY; horizons.len()];
        // The seed's pick: the lowest whole-horizon mean (the first such sample on a tie).
        let mut pick: Option<(f64, Vec<(f64, f64)>)> = None;
        for s in &samples[scene * k..(scene + 1) * k] {
            // Distances per waypoint, with a running sum for every horizon at once.
            let mut cum = 0.0;
            let mut dists = Vec::with_capacity(t);
            for (p, q) in s.iter().zip(gt) {
                let d = ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt();
                let d = if d.is_finite() { d } else { f64::INFINITY };
                cum += d;
                dists.push((d, cum));
            }
            for (i, &h) in horizons.iter().enumerate() {
                let (d, c) = dists[h - 1];
                best_ph[i] = best_ph[i].min(c / h as f64);
                best_fde[i] = best_fde[i].min(d);
            }
            let whole = cum / t as f64;
            if pick.as_ref().is_none_or(|(m, _)| whole < *m) {
                pick = Some((whole, dists));
            }
        }
        let picked = pick.map(|(_, d)| d).unwrap_or_default();
        for (i, &h) in horizons.iter().enumerate() {
            ade[i] += picked
                .get(h - 1)
                .map_or(f64::INFINITY, |&(_, c)| c / h as f64);
            ade_ph[i] += best_ph[i];
            fde[i] += best_fde[i];
        }
    }
    let mean = |v: Vec<f64>| v.into_iter().map(|x| x / n as f64).collect();
    Ok(MinAde {
        k,
        scenes: n,
        t,
        horizons: horizons.to_vec(),
        ade: mean(ade),
        ade_per_horizon: mean(ade_ph),
        fde: mean(fde),
    })
}

/// Scores normalised action samples `[N * K, T, 2]` against normalised true actions
/// `[N, T, 2]`: both integrated from each scene's start speed `v0[n]`, then
/// [`min_ade_fde`] at `horizons` (waypoints).
pub fn score_actions(
    samples: &Tensor,
    truth: &Tensor,
    v0: &[f64],
    k: usize,
    scales: &ActionScales,
    horizons: &[usize],
) -> Result<MinAde> {
    if k == 0 {
        return Err(Error::invalid("samples per scene K", 0, "at least 1"));
    }
    let repeated: Vec<f64> = v0.iter().flat_map(|&v| std::iter::repeat_n(v, k)).collect();
    let truth_pos = positions(truth, v0, scales)?;
    let sample_pos = positions(samples, &repeated, scales)?;
    min_ade_fde(&sample_pos, &truth_pos, k, horizons)
}

/// A Markdown table of minADE/minFDE reports, one row per `(name, report)`; the horizon
/// columns are the first report's, labelled in seconds: minADE the seed's way, minFDE, then
/// `minADE_ph` (each horizon's own best sample) at the horizons shorter than the whole, and a
/// line saying so.
pub fn minade_table(rows: &[(String, MinAde)]) -> String {
    let Some((_, first)) = rows.first() else {
        return String::new();
    };
    let label = |h: usize| format!("{}s", (h as f64 * DT * 10.0).round() / 10.0);
    let secs: Vec<String> = first.horizons.iter().map(|&h| label(h)).collect();
    // The per-horizon best equals the seed's minADE at the whole horizon: not repeated.
    let short: Vec<usize> = (0..first.horizons.len())
        .filter(|&i| first.horizons[i] < first.t)
        .collect();
    let mut s = String::from("| model |");
    for h in &secs {
        s.push_str(&format!(" minADE@{h} |"));
    }
    for h in &secs {
        s.push_str(&format!(" minFDE@{h} |"));
    }
    for &i in &short {
        s.push_str(&format!(" minADE_ph@{} |", secs[i]));
    }
    s.push_str("\n| --- |");
    s.push_str(&" ---: |".repeat(2 * secs.len() + short.len()));
    s.push('\n');
    for (name, m) in rows {
        s.push_str(&format!("| {name} |"));
        let ph = short.iter().filter_map(|&i| m.ade_per_horizon.get(i));
        for v in m.ade.iter().chain(&m.fde).chain(ph) {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push('\n');
    }
    s.push_str(
        "\nminADE as the seed scores it: per scene, the one sample with the lowest mean distance over the whole horizon, its error at each horizon. minADE_ph: each horizon's own best sample (not the seed's convention; lower). minFDE: each horizon's own best.\n",
    );
    s
}

/// The horizons of the seed's `compute_minade`, in waypoints (0.5, 1, 3, 5 s at 0.1 s);
/// those longer than the trajectory are left out, as the seed does.
pub const SEED_HORIZONS: [usize; 4] = [5, 10, 30, 50];

/// minADE as the seed's `compute_minade` reports it, with extras under names of their own.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedMinAde {
    /// Scenes B.
    pub scenes: usize,
    /// Sets N of K samples per scene.
    pub sets: usize,
    /// Samples per set K.
    pub k: usize,
    /// Waypoints T.
    pub t: usize,
    /// The seed's keys in its order (`min_ade`, `min_ade_std`, `min_ade/by_t=0.5`, ...; the
    /// `_std` keys only with more than one set), each with its mean over scenes.
    pub keys: Vec<(String, f64)>,
    /// Each scene's values of [`Self::keys`], scene-major.
    pub per_scene: Vec<Vec<f64>>,
    /// Not the seed's `compute_minade`: `min_fde` and `min_fde/by_t=..` (the seed's
    /// `compute_minfde`: each horizon's own best sample), `min_ade_per_horizon/by_t=..` (each
    /// horizon's own best sample for the mean distance), with `_std` over sets likewise;
    /// means over scenes.
    pub extra: Vec<(String, f64)>,
}

impl SeedMinAde {
    /// The mean over scenes of one of the seed's keys or of an extra.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.keys
            .iter()
            .chain(&self.extra)
            .find(|(k, _)| k == key)
            .map(|&(_, v)| v)
    }
}

/// The seed's `summarize_metric` for one scene: each metric's mean over the sets and, with
/// more than one set, its spread `sqrt(mean(x²) - mean(x)²)` (clamped at 0 where rounding
/// makes the difference negative: the seed would print NaN for identical sets).
fn summarize(names: &[String], per_set: &[Vec<f64>], out_names: &mut Vec<String>) -> Vec<f64> {
    let sets = per_set.len() as f64;
    let mut values = Vec::new();
    out_names.clear();
    for (i, name) in names.iter().enumerate() {
        let mean = per_set.iter().map(|s| s[i]).sum::<f64>() / sets;
        out_names.push(name.clone());
        values.push(mean);
        if per_set.len() > 1 {
            let mean_sq = per_set.iter().map(|s| s[i].powi(2)).sum::<f64>() / sets;
            out_names.push(format!("{name}_std"));
            values.push((mean_sq - mean.powi(2)).max(0.0).sqrt());
        }
    }
    values
}

/// The seed's minADE of predictions `pred` `[B, N, K, T, 2|3]` (B scenes, N sets of K
/// samples) against `gt` `[B, T, 2|3]`, in the ground plane (x, y), at `dt` seconds a
/// waypoint (the seed: 0.1, which labels the keys `min_ade/by_t=0.5` ...). A non-finite
/// prediction counts as infinitely far; the truth must be finite.
///
/// ```
/// use flow_matching::trajectory::seed_min_ade;
/// use flow_matching::unicycle::NamedArray;
/// // One scene, 2 sets of 2 samples, 10 waypoints at the origin; samples off by a constant.
/// let offs = [1.0, 3.0, 2.0, 0.5];
/// let pred: Vec<f64> = offs.iter().flat_map(|&o| [o, 0.0].repeat(10)).collect();
/// let gt = vec![0.0; 20];
/// let m = seed_min_ade(
///     NamedArray { name: "pred", shape: &[1, 2, 2, 10, 2], data: &pred },
///     NamedArray { name: "gt", shape: &[1, 10, 2], data: &gt },
///     0.1,
/// )
/// .unwrap();
/// assert_eq!(m.get("min_ade"), Some(0.75)); // sets pick 1.0 and 0.5
/// assert_eq!(m.get("min_ade_std"), Some(0.25));
/// assert_eq!(m.get("min_ade/by_t=0.5"), Some(0.75));
/// ```
pub fn seed_min_ade(pred: NamedArray<'_>, gt: NamedArray<'_>, dt: f64) -> Result<SeedMinAde> {
    let g = gt.shape;
    if g.len() != 3 || !matches!(g[2], 2 | 3) || g[0] == 0 || g[1] == 0 {
        return Err(Error::Shape {
            what: gt.name.into(),
            expected: "[B, T, 2|3] (true positions in metres), no dimension 0".into(),
            got: g.to_vec(),
        });
    }
    let (b, t, gc) = (g[0], g[1], g[2]);
    let p = pred.shape;
    if p.len() != 5 || p[0] != b || p[1] == 0 || p[2] == 0 || p[3] != t || !matches!(p[4], 2 | 3) {
        return Err(Error::Shape {
            what: pred.name.into(),
            expected: format!(
                "[{b}, N, K, {t}, 2|3] (the scenes and waypoints of {} {g:?}, N sets of K samples)",
                gt.name
            ),
            got: p.to_vec(),
        });
    }
    let (n, k, pc) = (p[1], p[2], p[4]);
    if gt.data.len() != b * t * gc || pred.data.len() != b * n * k * t * pc {
        return Err(Error::Shape {
            what: format!("{} / {}", pred.name, gt.name),
            expected: "as many values as their shapes declare".into(),
            got: vec![pred.data.len(), gt.data.len()],
        });
    }
    if let Some(i) = gt.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::BadValue {
            what: format!(
                "{} at [{}, {}, {}]",
                gt.name,
                i / (t * gc),
                i / gc % t,
                i % gc
            ),
            reason: format!("found {}, expected a finite position in metres", gt.data[i]),
        });
    }
    let horizons: Vec<usize> = SEED_HORIZONS.iter().copied().filter(|&h| h <= t).collect();
    let label = |h: usize| format!("{:.1}", h as f64 * dt);
    let mut names = vec!["min_ade".to_string()];
    names.extend(
        horizons
            .iter()
            .map(|&h| format!("min_ade/by_t={}", label(h))),
    );
    let mut extra_names = vec!["min_fde".to_string()];
    extra_names.extend(
        horizons
            .iter()
            .map(|&h| format!("min_fde/by_t={}", label(h))),
    );
    extra_names.extend(
        horizons
            .iter()
            .map(|&h| format!("min_ade_per_horizon/by_t={}", label(h))),
    );
    let (mut keys, mut extra_keys) = (Vec::new(), Vec::new());
    let mut per_scene = Vec::with_capacity(b);
    let mut extra_sum: Vec<f64> = Vec::new();
    for scene in 0..b {
        let truth = &gt.data[scene * t * gc..(scene + 1) * t * gc];
        let mut seed_sets = Vec::with_capacity(n);
        let mut extra_sets = Vec::with_capacity(n);
        for set in 0..n {
            // l2[j][i]: ground-plane distance of sample j at waypoint i.
            let l2: Vec<Vec<f64>> = (0..k)
                .map(|j| {
                    let base = ((scene * n + set) * k + j) * t * pc;
                    (0..t)
                        .map(|i| {
                            let q = &pred.data[base + i * pc..];
                            let r = &truth[i * gc..];
                            let d = ((q[0] - r[0]).powi(2) + (q[1] - r[1]).powi(2)).sqrt();
                            if d.is_finite() {
                                d
                            } else {
                                f64::INFINITY
                            }
                        })
                        .collect()
                })
                .collect();
            let mean_to = |row: &[f64], h: usize| row[..h].iter().sum::<f64>() / h as f64;
            // The seed's argmin over K of the whole-horizon mean: the first lowest.
            let mut best = 0;
            let mut best_mean = f64::INFINITY;
            for (j, row) in l2.iter().enumerate() {
                let m = mean_to(row, t);
                if m < best_mean {
                    (best, best_mean) = (j, m);
                }
            }
            let chosen = &l2[best];
            let mut vals = vec![mean_to(chosen, t)];
            vals.extend(horizons.iter().map(|&h| mean_to(chosen, h)));
            seed_sets.push(vals);
            let min_at = |i: usize| l2.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min);
            let mut ex = vec![min_at(t - 1)];
            ex.extend(horizons.iter().map(|&h| min_at(h - 1)));
            ex.extend(horizons.iter().map(|&h| {
                l2.iter()
                    .map(|r| mean_to(r, h))
                    .fold(f64::INFINITY, f64::min)
            }));
            extra_sets.push(ex);
        }
        per_scene.push(summarize(&names, &seed_sets, &mut keys));
        let ex = summarize(&extra_names, &extra_sets, &mut extra_keys);
        if extra_sum.is_empty() {
            extra_sum = vec![0.0; ex.len()];
        }
        for (s, v) in extra_sum.iter_mut().zip(ex) {
            *s += v;
        }
    }
    let mean_over = |i: usize| per_scene.iter().map(|s| s[i]).sum::<f64>() / b as f64;
    let keys = keys
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), mean_over(i)))
        .collect();
    let extra = extra_keys
        .into_iter()
        .zip(extra_sum)
        .map(|(name, s)| (name, s / b as f64))
        .collect();
    Ok(SeedMinAde {
        scenes: b,
        sets: n,
        k,
        t,
        keys,
        per_scene,
        extra,
    })
}
