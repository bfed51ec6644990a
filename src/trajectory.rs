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
//! [`min_ade_fde`] scores K samples per scene against the true future: for each scene and
//! horizon of n waypoints, ADE is the mean L2 distance over waypoints 1..=n and FDE the
//! distance at waypoint n; minADE_K keeps the best of the K samples for that horizon (each
//! horizon picks its own best sample, as the seed's per-horizon report does), and the report
//! is the mean over scenes.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

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
    /// Horizons, in waypoints.
    pub horizons: Vec<usize>,
    /// minADE_K at each horizon.
    pub ade: Vec<f64>,
    /// minFDE_K at each horizon.
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
/// horizon in `horizons` (waypoint counts, 1..=T). A non-finite sample counts as infinitely
/// far, so a scene whose samples all diverged makes the report infinite, not NaN.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flow_matching::trajectory::min_ade_fde;
/// // One scene, one waypoint at (0, 0); samples at distance 3 and 1: minADE = minFDE = 1.
/// let truth = Tensor::new(&[[[0f32, 0.0]]], &Device::Cpu).unwrap();
/// let samples = Tensor::new(&[[[3f32, 0.0]], [[0.0, 1.0]]], &Device::Cpu).unwrap();
/// let m = min_ade_fde(&samples, &truth, 2, &[1]).unwrap();
/// assert_eq!((m.ade[0], m.fde[0]), (1.0, 1.0));
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
    let mut fde = vec![0.0; horizons.len()];
    for (scene, gt) in truth.iter().enumerate() {
        let mut best_ade = vec![f64::INFINITY; horizons.len()];
        let mut best_fde = vec![f64::INFINITY; horizons.len()];
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
                best_ade[i] = best_ade[i].min(c / h as f64);
                best_fde[i] = best_fde[i].min(d);
            }
        }
        for i in 0..horizons.len() {
            ade[i] += best_ade[i];
            fde[i] += best_fde[i];
        }
    }
    Ok(MinAde {
        k,
        scenes: n,
        horizons: horizons.to_vec(),
        ade: ade.into_iter().map(|x| x / n as f64).collect(),
        fde: fde.into_iter().map(|x| x / n as f64).collect(),
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
/// columns are the first report's, labelled in seconds.
pub fn minade_table(rows: &[(String, MinAde)]) -> String {
    let Some((_, first)) = rows.first() else {
        return String::new();
    };
    let secs: Vec<String> = first
        .horizons
        .iter()
        .map(|&h| format!("{}s", (h as f64 * DT * 10.0).round() / 10.0))
        .collect();
    let mut s = String::from("| model |");
    for h in &secs {
        s.push_str(&format!(" minADE@{h} |"));
    }
    for h in &secs {
        s.push_str(&format!(" minFDE@{h} |"));
    }
    s.push_str("\n| --- |");
    s.push_str(&" ---: |".repeat(2 * secs.len()));
    s.push('\n');
    for (name, m) in rows {
        s.push_str(&format!("| {name} |"));
        for v in m.ade.iter().chain(&m.fde) {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push('\n');
    }
    s
}
