//! The seed's unicycle action space, exactly: logged poses to normalised (acceleration,
//! curvature) actions, the start speed v0 from the history, actions back to poses with
//! headings, and the bounds check.
//!
//! A drive is `H` history poses and `T` future poses at `dt` = 0.1 s in the ego frame at t0
//! (the last history pose is the origin, heading 0). Poses are positions `[.., T, 3]` (x, y,
//! z in metres; `[.., T, 2]` is taken as z = 0) and either rotation matrices `[.., T, 3, 3]`
//! or yaw `[.., T]` in radians; only the yaw, `atan2(R[1][0], R[0][0])`, is used.
//!
//! Logged poses → actions ([`UnicycleActionSpace::traj_to_action`]) follows the seed step by
//! step, each step a small Tikhonov-regularised least-squares problem solved by Cholesky:
//!
//! 1. **Heading.** The logged yaw is unwrapped (each step's change taken in (-π, π]) and
//!    smoothed: `θ_1..θ_T` minimise `Σ (θ_i - yaw_i)² + λ_θ/dt⁶ ‖D₃θ‖² + ridge_θ ‖θ‖²` with
//!    `θ_0 = 0` fixed, `D₃` the third difference.
//! 2. **Speed.** The trapezoid relation `p_{i+1} - p_i = dt/2 (v_i u_i + v_{i+1} u_{i+1})`,
//!    `u_i = (cos θ_i, sin θ_i)`, in least squares for `v_1..v_T` with `v_0` fixed, plus
//!    `λ_v/dt⁶ ‖D₃v‖²` and `ridge_v ‖v‖²`.
//! 3. **Acceleration.** `a_i ≈ (v_{i+1} - v_i)/dt` with `λ_a/dt⁴ ‖D₂a‖²`, `ridge_a ‖a‖²`.
//! 4. **Curvature.** `κ_i s_i ≈ θ_{i+1} - θ_i` over the arc `s_i = dt v_i + dt²/2 a_i`, with
//!    `λ_κ/dt⁴ ‖D₂κ‖²`, `ridge_κ ‖κ‖²`. Where steps 3 and 4 meet a matrix that is not
//!    positive definite (a car standing still makes every `s_i` 0), the ridge is multiplied
//!    by 10 until Cholesky succeeds, as the seed does.
//! 5. **Normalisation.** `(a - accel_mean)/accel_std`, the same for κ ([`ActionScales`]).
//!
//! v0 ([`UnicycleActionSpace::estimate_v0`]) is step 2 on the history with every speed free
//! (the raw unwrapped yaw, no smoothing): the last speed is v0. Actions → poses
//! ([`UnicycleActionSpace::action_to_traj`]) is the seed's integration from v0 at the origin,
//! heading 0 (see [`crate::trajectory`]), z carried from the last history pose, rotation
//! matrices yaw-only from the integrated heading.
//!
//! **Linear algebra.** The matrices are at most 65 × 65 and banded (half-bandwidth 3), so
//! any solver is fast: a dense Cholesky of one is about 0.1 ms. They are solved with
//! nalgebra's dense Cholesky, a well-kept crate, rather than a banded Cholesky of our own:
//! the banded one would save microseconds per drive that nobody can notice next to reading
//! the file, while nalgebra adds three small crates to the build (nalgebra, simba, approx;
//! its other dependencies were already in the tree) and keeps our code to building the
//! matrices the way the seed writes them. Its failure on a matrix that is not positive
//! definite is what drives the seed's ridge retry.
//!
//! ```
//! use flow_matching::unicycle::{Poses, UnicycleActionSpace};
//! // A car at 10 m/s straight along x: 16 history poses ending at the origin, 64 future ones.
//! let line = |from: i32, n: usize| -> Poses {
//!     let xyz = (0..n).map(|i| [(from + i as i32) as f64, 0.0, 0.0]).collect();
//!     Poses::from_yaw(vec![1], n, xyz, vec![0.0; n]).unwrap()
//! };
//! let (hist, fut) = (line(-15, 16), line(1, 64));
//! let space = UnicycleActionSpace::default();
//! let v0 = space.estimate_v0(&hist).unwrap();
//! assert!((v0[0] - 10.0).abs() < 1e-3);
//! let actions = space.traj_to_action(&hist, &fut).unwrap();
//! assert!(actions.values.iter().all(|[a, k]| a.abs() < 1e-2 && k.abs() < 1e-6));
//! let back = space.action_to_traj(&actions, &v0, &[0.0]).unwrap();
//! assert!((back.xyz[63][0] - 64.0).abs() < 1e-2);
//! ```

use nalgebra::{Cholesky, DMatrix, DVector};

use crate::error::{Error, Result};
use crate::trajectory::ActionScales;
pub use crate::trajectory::NamedArray;

/// The largest entry of `|RᵀR - I|` accepted for a rotation matrix: logs stored in float32
/// are good to about 1e-7, a matrix that is not a rotation is off by far more.
pub const ROTATION_TOLERANCE: f64 = 1e-4;

/// How often a least-squares problem may multiply its ridge by 10 before giving up (the seed
/// retries without a limit; a limit turns a hopeless input into an error, not a hang).
const MAX_RIDGE_RETRIES: usize = 30;

/// The weight of one least-squares problem's smoothness term and its ridge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smoothing {
    /// λ of the Tikhonov smoothness term (divided by dt to the power of twice its order).
    pub lambda: f64,
    /// The ridge added to the diagonal.
    pub ridge: f64,
}

/// The seed's `UnicycleAccelCurvatureActionSpace`: its constants, all settable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnicycleActionSpace {
    /// The normalisation of the actions (the seed's default: identity).
    pub scales: ActionScales,
    /// Acceleration bounds of [`Self::within_bounds`], m/s² (the seed: ±9.8).
    pub accel_bounds: [f64; 2],
    /// Curvature bounds of [`Self::within_bounds`], 1/m (the seed: ±0.2).
    pub curv_bounds: [f64; 2],
    /// Seconds between poses (the seed: 0.1).
    pub dt: f64,
    /// Heading smoothing (the seed: λ 1e-6, ridge 1e-8).
    pub theta: Smoothing,
    /// Speed from positions (the seed: λ 1e-6, ridge 1e-4).
    pub v: Smoothing,
    /// Acceleration from speed (the seed: λ 1e-4, ridge 1e-4).
    pub accel: Smoothing,
    /// Curvature from heading (the seed: λ 1e-4, ridge 1e-4).
    pub curv: Smoothing,
    /// Round the normalisation's means and scales to float32 before use, as the seed does
    /// (it keeps them as float32 buffers: `torch.tensor(0.04)` is 0.03999999910593033, which
    /// moves a normalised curvature by 2e-8 relative and a pose 6 s out by 2e-6 m).
    pub f32_stats: bool,
}

impl Default for UnicycleActionSpace {
    /// The seed's constructor defaults.
    fn default() -> Self {
        UnicycleActionSpace {
            scales: ActionScales::IDENTITY,
            accel_bounds: [-9.8, 9.8],
            curv_bounds: [-0.2, 0.2],
            dt: 0.1,
            theta: Smoothing {
                lambda: 1e-6,
                ridge: 1e-8,
            },
            v: Smoothing {
                lambda: 1e-6,
                ridge: 1e-4,
            },
            accel: Smoothing {
                lambda: 1e-4,
                ridge: 1e-4,
            },
            curv: Smoothing {
                lambda: 1e-4,
                ridge: 1e-4,
            },
            f32_stats: true,
        }
    }
}

/// Pose sequences: `drives` drives of `t` poses each, positions and headings.
#[derive(Debug, Clone, PartialEq)]
pub struct Poses {
    /// The leading (batch) dimensions; their product is the number of drives.
    pub batch: Vec<usize>,
    /// Poses per drive.
    pub t: usize,
    /// Positions in metres, drive-major: pose i of drive d is `xyz[d * t + i]`.
    pub xyz: Vec<[f64; 3]>,
    /// Headings (yaw, radians), drive-major.
    pub yaw: Vec<f64>,
}

/// Normalised actions `(acceleration, curvature)`: `drives` drives of `t` steps each.
#[derive(Debug, Clone, PartialEq)]
pub struct Actions {
    /// The leading (batch) dimensions; their product is the number of drives.
    pub batch: Vec<usize>,
    /// Steps per drive.
    pub t: usize,
    /// The actions, drive-major: step i of drive d is `values[d * t + i]`.
    pub values: Vec<[f64; 2]>,
}

/// `[i, j, ..]`: the multi-index of element `flat` in an array of shape `dims`.
fn index_of(mut flat: usize, dims: &[usize]) -> String {
    let mut idx = vec![0; dims.len()];
    for (slot, &d) in idx.iter_mut().zip(dims).rev() {
        if d > 0 {
            *slot = flat % d;
            flat /= d;
        }
    }
    let parts: Vec<String> = idx.iter().map(|i| i.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// A shape written as `[a, b, ..]`.
fn shape_text(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl Poses {
    /// Poses from positions and yaw (radians), drive-major; refuses wrong lengths and
    /// non-finite values.
    pub fn from_yaw(
        batch: Vec<usize>,
        t: usize,
        xyz: Vec<[f64; 3]>,
        yaw: Vec<f64>,
    ) -> Result<Poses> {
        let drives: usize = batch.iter().product();
        if t == 0 || drives == 0 || xyz.len() != drives * t || yaw.len() != drives * t {
            let mut dims = batch.clone();
            dims.push(t);
            return Err(Error::Shape {
                what: "poses".into(),
                expected: format!(
                    "{} positions and headings (batch {} of {t} poses, none empty)",
                    drives * t,
                    shape_text(&batch)
                ),
                got: vec![xyz.len(), yaw.len()],
            });
        }
        let p = Poses { batch, t, xyz, yaw };
        p.check_finite("positions", "headings")?;
        Ok(p)
    }

    /// Poses from a positions array `[.., T, 3]` (or `[.., T, 2]`: z = 0) and either rotation
    /// matrices `[.., T, 3, 3]` or yaw `[.., T]` (radians); every error names the array, the
    /// element, what was expected and what was found.
    ///
    /// ```
    /// use flow_matching::unicycle::{NamedArray, Poses};
    /// let xyz = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    /// let bad = [2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0].repeat(2);
    /// let e = Poses::from_arrays(
    ///     NamedArray { name: "--fut-xyz F.npy", shape: &[1, 2, 3], data: &xyz },
    ///     NamedArray { name: "--fut-rot FR.npy", shape: &[1, 2, 3, 3], data: &bad },
    /// )
    /// .unwrap_err();
    /// assert!(e.to_string().starts_with("--fut-rot FR.npy at [0, 0]: not a rotation matrix"));
    /// ```
    pub fn from_arrays(xyz: NamedArray<'_>, rot: NamedArray<'_>) -> Result<Poses> {
        let d = xyz.shape;
        if d.len() < 2 || !matches!(d[d.len() - 1], 2 | 3) || d.contains(&0) {
            return Err(Error::Shape {
                what: xyz.name.into(),
                expected: "[.., T, 3] (positions x, y, z in metres; or [.., T, 2]), no dimension 0"
                    .into(),
                got: d.to_vec(),
            });
        }
        let c = d[d.len() - 1];
        let lead = &d[..d.len() - 1];
        let t = lead[lead.len() - 1];
        let batch = lead[..lead.len() - 1].to_vec();
        let n = lead.iter().product::<usize>();
        let is_matrices = rot.shape.len() == lead.len() + 2
            && rot.shape[..lead.len()] == *lead
            && rot.shape[lead.len()..] == [3, 3];
        let is_yaw = rot.shape == lead;
        if !is_matrices && !is_yaw {
            let l = shape_text(lead);
            let l = &l[1..l.len() - 1];
            return Err(Error::Shape {
                what: rot.name.into(),
                expected: format!(
                    "[{l}, 3, 3] (rotation matrices) or [{l}] (yaw in radians), one per pose of {} {}",
                    xyz.name,
                    shape_text(d)
                ),
                got: rot.shape.to_vec(),
            });
        }
        if xyz.data.len() != n * c || rot.data.len() != rot.shape.iter().product::<usize>() {
            return Err(Error::Shape {
                what: format!("{} / {}", xyz.name, rot.name),
                expected: "as many values as their shapes declare".into(),
                got: vec![xyz.data.len(), rot.data.len()],
            });
        }
        if let Some(i) = xyz.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::BadValue {
                what: format!("{} at {}", xyz.name, index_of(i, d)),
                reason: format!(
                    "found {}, expected a finite position in metres",
                    xyz.data[i]
                ),
            });
        }
        let positions: Vec<[f64; 3]> = xyz
            .data
            .chunks_exact(c)
            .map(|p| [p[0], p[1], if c == 3 { p[2] } else { 0.0 }])
            .collect();
        let yaw = if is_yaw {
            if let Some(i) = rot.data.iter().position(|v| !v.is_finite()) {
                return Err(Error::BadValue {
                    what: format!("{} at {}", rot.name, index_of(i, rot.shape)),
                    reason: format!("found {}, expected a finite yaw in radians", rot.data[i]),
                });
            }
            rot.data.to_vec()
        } else {
            let mut yaw = Vec::with_capacity(n);
            for (i, m) in rot.data.chunks_exact(9).enumerate() {
                check_rotation(m).map_err(|reason| Error::BadValue {
                    what: format!("{} at {}", rot.name, index_of(i, lead)),
                    reason,
                })?;
                // The seed's so3_to_yaw: yaw of a z-y-x rotation.
                yaw.push(m[3].atan2(m[0]));
            }
            yaw
        };
        Ok(Poses {
            batch,
            t,
            xyz: positions,
            yaw,
        })
    }

    /// The number of drives.
    pub fn drives(&self) -> usize {
        self.xyz.len() / self.t.max(1)
    }

    /// The shape of the positions, `batch + [t, 3]`.
    pub fn xyz_shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.t, 3]);
        s
    }

    /// The shape of the rotation matrices, `batch + [t, 3, 3]`.
    pub fn rot_shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.t, 3, 3]);
        s
    }

    /// The positions flat, in C order of [`Self::xyz_shape`].
    pub fn xyz_flat(&self) -> Vec<f64> {
        self.xyz.iter().flatten().copied().collect()
    }

    /// The yaw-only rotation matrices of the headings, flat in C order of
    /// [`Self::rot_shape`]: `[[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]`.
    pub fn rot_flat(&self) -> Vec<f64> {
        self.yaw
            .iter()
            .flat_map(|&th| {
                let (s, c) = (th.sin(), th.cos());
                [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]
            })
            .collect()
    }

    /// Refuses a non-finite position or heading, naming it.
    fn check_finite(&self, xyz_name: &str, yaw_name: &str) -> Result<()> {
        if let Some(i) = self
            .xyz
            .iter()
            .position(|p| p.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::BadValue {
                what: format!("{xyz_name}: drive {}, pose {}", i / self.t, i % self.t),
                reason: format!(
                    "found {:?}, expected finite positions in metres",
                    self.xyz[i]
                ),
            });
        }
        if let Some(i) = self.yaw.iter().position(|v| !v.is_finite()) {
            return Err(Error::BadValue {
                what: format!("{yaw_name}: drive {}, pose {}", i / self.t, i % self.t),
                reason: format!("found {}, expected a finite yaw in radians", self.yaw[i]),
            });
        }
        Ok(())
    }
}

/// Why the 3 × 3 matrix `m` (row-major) is not a rotation; `Ok` when it is one.
fn check_rotation(m: &[f64]) -> std::result::Result<(), String> {
    if let Some(v) = m.iter().find(|v| !v.is_finite()) {
        return Err(format!("found {v}, expected a finite rotation matrix"));
    }
    let mut err: f64 = 0.0;
    for i in 0..3 {
        for j in 0..3 {
            let dot: f64 = (0..3).map(|k| m[3 * k + i] * m[3 * k + j]).sum();
            err = err.max((dot - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    let det = m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6])
        + m[2] * (m[3] * m[7] - m[4] * m[6]);
    if err > ROTATION_TOLERANCE || det <= 0.0 {
        return Err(format!(
            "not a rotation matrix: max |RᵀR - I| = {err:.3e} and det = {det:.6}, expected orthonormal with det +1 (within {ROTATION_TOLERANCE:e})"
        ));
    }
    Ok(())
}

/// The seed's `round_2pi`: an angle brought into (-π, π] through atan2.
fn round_2pi(x: f64) -> f64 {
    x.sin().atan2(x.cos())
}

/// The seed's `unwrap_angle`: the first angle, then the running sum of the steps, each taken
/// in (-π, π].
fn unwrap_angle(phi: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(phi.len());
    let mut cum = 0.0;
    for (i, &p) in phi.iter().enumerate() {
        if i == 0 {
            out.push(p);
        } else {
            cum += round_2pi(p - phi[i - 1]);
            out.push(phi[0] + cum);
        }
    }
    out
}

/// `λ / dt^(2 order) · DᵀD` for the difference matrix D of `order` (1 to 3) on `n` values:
/// the normal-equation term of a smoothness penalty on the order-th time derivative.
fn smoothness(n: usize, order: usize, lambda: f64, dt: f64) -> DMatrix<f64> {
    let coef: &[f64] = match order {
        1 => &[-1.0, 1.0],
        2 => &[-1.0, 2.0, -1.0],
        _ => &[-1.0, 3.0, -3.0, 1.0],
    };
    let mut m = DMatrix::zeros(n, n);
    for r in 0..n.saturating_sub(order) {
        for (a, ca) in coef.iter().enumerate() {
            for (b, cb) in coef.iter().enumerate() {
                m[(r + a, r + b)] += ca * cb;
            }
        }
    }
    // The seed's scale, `lam / dt**(2 order)` (C's pow, as Python's `**` on floats).
    m * (lambda / dt.powf((2 * order) as f64))
}

/// Solves `lhs x = rhs` by Cholesky; an error naming `what` when `lhs` is not positive
/// definite.
fn cholesky_solve(lhs: DMatrix<f64>, rhs: &DVector<f64>, what: &str) -> Result<DVector<f64>> {
    Cholesky::new(lhs)
        .map(|c| c.solve(rhs))
        .ok_or_else(|| Error::BadValue {
            what: what.into(),
            reason: "the least-squares matrix is not positive definite (non-finite or degenerate poses); expected finite, distinct poses".into(),
        })
}

/// The seed's `solve_xs_eq_y` with second-order smoothing: `x` minimising
/// `Σ (s_i x_i - y_i)² + λ/dt⁴ ‖D₂x‖² + ridge ‖x‖²`, the ridge multiplied by 10 while the
/// matrix is not positive definite.
fn solve_xs_eq_y(s: &[f64], y: &[f64], sm: Smoothing, dt: f64, what: &str) -> Result<Vec<f64>> {
    let n = y.len();
    let mut ata = smoothness(n, 2, sm.lambda, dt);
    let mut rhs = DVector::zeros(n);
    for i in 0..n {
        ata[(i, i)] += s[i] * s[i];
        rhs[i] = s[i] * y[i];
    }
    let mut ridge = sm.ridge;
    for _ in 0..=MAX_RIDGE_RETRIES {
        let mut lhs = ata.clone();
        for i in 0..n {
            lhs[(i, i)] += ridge;
        }
        if let Some(c) = Cholesky::new(lhs) {
            return Ok(c.solve(&rhs).iter().copied().collect());
        }
        ridge *= 10.0;
    }
    Err(Error::BadValue {
        what: what.into(),
        reason: format!(
            "the least-squares matrix stayed singular with the ridge raised to {ridge:e}; expected finite poses"
        ),
    })
}

/// The trapezoid design matrix of the speed problem: rows 2i and 2i+1 hold
/// `cos θ_i, cos θ_{i+1}` and `sin θ_i, sin θ_{i+1}` in columns i and i+1; and the data
/// `2/dt · (p_{i+1} - p_i)` interleaved the same way.
fn trapezoid(dxy: &[[f64; 2]], theta: &[f64], dt: f64) -> (DMatrix<f64>, DVector<f64>) {
    let n = dxy.len();
    let mut a = DMatrix::zeros(2 * n, n + 1);
    let mut b = DVector::zeros(2 * n);
    for i in 0..n {
        a[(2 * i, i)] = theta[i].cos();
        a[(2 * i, i + 1)] = theta[i + 1].cos();
        a[(2 * i + 1, i)] = theta[i].sin();
        a[(2 * i + 1, i + 1)] = theta[i + 1].sin();
        b[2 * i] = 2.0 / dt * dxy[i][0];
        b[2 * i + 1] = 2.0 / dt * dxy[i][1];
    }
    (a, b)
}

impl UnicycleActionSpace {
    /// The normalisation as applied: [`Self::scales`], through float32 with
    /// [`Self::f32_stats`].
    pub fn applied_scales(&self) -> ActionScales {
        let r = |v: f64| {
            if self.f32_stats {
                f64::from(v as f32)
            } else {
                v
            }
        };
        ActionScales {
            accel_mean: r(self.scales.accel_mean),
            accel_std: r(self.scales.accel_std),
            curv_mean: r(self.scales.curv_mean),
            curv_std: r(self.scales.curv_std),
        }
    }

    /// The start speed v0 (m/s) of each drive from its history (at least 2 poses): the seed's
    /// `estimate_t0_states`.
    pub fn estimate_v0(&self, hist: &Poses) -> Result<Vec<f64>> {
        if hist.t < 2 {
            return Err(Error::invalid(
                "history length",
                hist.t,
                "at least 2 poses to estimate the start speed",
            ));
        }
        let t = hist.t;
        (0..hist.drives())
            .map(|d| {
                let xyz = &hist.xyz[d * t..(d + 1) * t];
                let dxy: Vec<[f64; 2]> = xyz
                    .windows(2)
                    .map(|w| [w[1][0] - w[0][0], w[1][1] - w[0][1]])
                    .collect();
                let theta = unwrap_angle(&hist.yaw[d * t..(d + 1) * t]);
                let (a, b) = trapezoid(&dxy, &theta, self.dt);
                let mut lhs = a.transpose() * &a + smoothness(t, 3, self.v.lambda, self.dt);
                for i in 0..t {
                    lhs[(i, i)] += self.v.ridge;
                }
                let rhs = a.transpose() * b;
                let v = cholesky_solve(lhs, &rhs, &format!("history of drive {d}"))?;
                Ok(v[t - 1])
            })
            .collect()
    }

    /// Normalised actions `batch + [T, 2]` of the logged futures, v0 estimated from the
    /// history: the seed's `traj_to_action`.
    pub fn traj_to_action(&self, hist: &Poses, fut: &Poses) -> Result<Actions> {
        let v0 = self.estimate_v0(hist)?;
        self.traj_to_action_with_v0(hist, fut, &v0)
    }

    /// [`Self::traj_to_action`] from given start speeds `v0` (one per drive); the history
    /// gives only each drive's start position (its last pose).
    pub fn traj_to_action_with_v0(&self, hist: &Poses, fut: &Poses, v0: &[f64]) -> Result<Actions> {
        let n = fut.drives();
        if hist.drives() != n || hist.batch != fut.batch {
            return Err(Error::Shape {
                what: "future poses".into(),
                expected: format!(
                    "the drives of the history, batch {}",
                    shape_text(&hist.batch)
                ),
                got: fut.batch.clone(),
            });
        }
        if v0.len() != n {
            return Err(Error::Shape {
                what: "start speeds".into(),
                expected: format!("[{n}] (one per drive)"),
                got: vec![v0.len()],
            });
        }
        let (t, dt) = (fut.t, self.dt);
        let scales = self.applied_scales();
        let mut values = Vec::with_capacity(n * t);
        for (d, &v0) in v0.iter().enumerate() {
            let what = format!("future of drive {d}");
            let start = hist.xyz[(d + 1) * hist.t - 1];
            let xyz = &fut.xyz[d * t..(d + 1) * t];
            let mut prev = [start[0], start[1]];
            let dxy: Vec<[f64; 2]> = xyz
                .iter()
                .map(|p| {
                    let step = [p[0] - prev[0], p[1] - prev[1]];
                    prev = [p[0], p[1]];
                    step
                })
                .collect();
            // 1. The heading, smoothed with θ_0 = 0 fixed (the seed's theta_smooth).
            let target = unwrap_angle(&fut.yaw[d * t..(d + 1) * t]);
            let full = smoothness(t + 1, 3, self.theta.lambda, dt);
            let mut lhs = full.view((1, 1), (t, t)).into_owned();
            for i in 0..t {
                // (AᵀA = I) + DᵀD + ridge, in the seed's order.
                lhs[(i, i)] = 1.0 + lhs[(i, i)] + self.theta.ridge;
            }
            let th = cholesky_solve(lhs, &DVector::from_column_slice(&target), &what)?;
            let theta: Vec<f64> = std::iter::once(0.0).chain(th.iter().copied()).collect();
            // 2. The speed, v_0 fixed (the seed's dxy_theta_to_v).
            let (a, b) = trapezoid(&dxy, &theta, dt);
            let ata = a.transpose() * &a;
            let dtd = smoothness(t + 1, 3, self.v.lambda, dt);
            let atb = a.transpose() * b;
            let mut rhs = DVector::zeros(t);
            let mut lhs = DMatrix::zeros(t, t);
            for i in 0..t {
                rhs[i] = atb[i + 1] - ata[(i + 1, 0)] * v0 - dtd[(i + 1, 0)] * v0;
                for j in 0..t {
                    lhs[(i, j)] = ata[(i + 1, j + 1)] + dtd[(i + 1, j + 1)];
                }
                lhs[(i, i)] += self.v.ridge;
            }
            let vs = cholesky_solve(lhs, &rhs, &what)?;
            let v: Vec<f64> = std::iter::once(v0).chain(vs.iter().copied()).collect();
            // 3. The acceleration from the speed steps.
            let dv: Vec<f64> = v.windows(2).map(|w| (w[1] - w[0]) / dt).collect();
            let accel = solve_xs_eq_y(&vec![1.0; t], &dv, self.accel, dt, &what)?;
            // 4. The curvature from the heading change over the arc of each step.
            let dtheta: Vec<f64> = theta.windows(2).map(|w| w[1] - w[0]).collect();
            let s: Vec<f64> = (0..t)
                .map(|i| dt * v[i] + dt.powf(2.0) / 2.0 * accel[i])
                .collect();
            let kappa = solve_xs_eq_y(&s, &dtheta, self.curv, dt, &what)?;
            // 5. Normalised.
            values.extend(
                accel
                    .iter()
                    .zip(&kappa)
                    .map(|(&a, &k)| scales.normalise([a, k])),
            );
        }
        Ok(Actions {
            batch: fut.batch.clone(),
            t,
            values,
        })
    }

    /// The poses that normalised `actions` drive to from start speeds `v0` (one per drive) at
    /// the origin, heading 0, z = `z0` (one per drive): the seed's `action_to_traj`.
    pub fn action_to_traj(&self, actions: &Actions, v0: &[f64], z0: &[f64]) -> Result<Poses> {
        let n = actions.values.len() / actions.t.max(1);
        if actions.t == 0 || n == 0 || actions.values.len() != n * actions.t {
            return Err(Error::Shape {
                what: "actions".into(),
                expected: "[.., T, 2] with T >= 1 and at least one drive".into(),
                got: vec![actions.values.len(), actions.t],
            });
        }
        for (what, len) in [("start speeds", v0.len()), ("start heights z", z0.len())] {
            if len != n {
                return Err(Error::Shape {
                    what: what.into(),
                    expected: format!("[{n}] (one per drive of the actions)"),
                    got: vec![len],
                });
            }
        }
        if let Some(i) = v0.iter().chain(z0).position(|v| !v.is_finite()) {
            return Err(Error::BadValue {
                what: if i < n {
                    "start speeds"
                } else {
                    "start heights z"
                }
                .into(),
                reason: format!("drive {}: expected a finite value", i % n),
            });
        }
        let (t, dt) = (actions.t, self.dt);
        let dt2 = 0.5 * dt.powf(2.0);
        let half = 0.5 * dt;
        let scales = self.applied_scales();
        let mut xyz = Vec::with_capacity(n * t);
        let mut yaw = Vec::with_capacity(n * t);
        for d in 0..n {
            let phys: Vec<[f64; 2]> = actions.values[d * t..(d + 1) * t]
                .iter()
                .map(|&a| scales.denormalise(a))
                .collect();
            // The seed's cumulative sums, each kept separately as it writes them.
            let mut vel = Vec::with_capacity(t + 1);
            vel.push(v0[d]);
            let mut c = 0.0;
            for &[a, _] in &phys {
                c += a * dt;
                vel.push(v0[d] + c);
            }
            let mut theta = Vec::with_capacity(t + 1);
            theta.push(0.0);
            let (mut c1, mut c2) = (0.0, 0.0);
            for (i, &[a, k]) in phys.iter().enumerate() {
                c1 += k * vel[i] * dt;
                c2 += k * a * dt2;
                theta.push(0.0 + c1 + c2);
            }
            let (mut x0, mut x1, mut y0, mut y1) = (0.0, 0.0, 0.0, 0.0);
            for i in 0..t {
                x0 += vel[i] * theta[i].cos() * half;
                x1 += vel[i + 1] * theta[i + 1].cos() * half;
                y0 += vel[i] * theta[i].sin() * half;
                y1 += vel[i + 1] * theta[i + 1].sin() * half;
                xyz.push([0.0 + x0 + x1, 0.0 + y0 + y1, z0[d]]);
                yaw.push(theta[i + 1]);
            }
        }
        Ok(Poses {
            batch: actions.batch.clone(),
            t,
            xyz,
            yaw,
        })
    }

    /// [`Self::action_to_traj`] with v0 estimated from the history and z carried from its
    /// last pose.
    pub fn action_to_traj_from_history(&self, actions: &Actions, hist: &Poses) -> Result<Poses> {
        if hist.batch != actions.batch {
            return Err(Error::Shape {
                what: "history poses".into(),
                expected: format!(
                    "the drives of the actions, batch {}",
                    shape_text(&actions.batch)
                ),
                got: hist.batch.clone(),
            });
        }
        let v0 = self.estimate_v0(hist)?;
        let z0: Vec<f64> = (0..hist.drives())
            .map(|d| hist.xyz[(d + 1) * hist.t - 1][2])
            .collect();
        self.action_to_traj(actions, &v0, &z0)
    }

    /// Whether every step of each drive's normalised actions, de-normalised, lies within the
    /// acceleration and curvature bounds (inclusive): the seed's `is_within_bounds`.
    pub fn within_bounds(&self, actions: &Actions) -> Vec<bool> {
        let [alo, ahi] = self.accel_bounds;
        let [klo, khi] = self.curv_bounds;
        let scales = self.applied_scales();
        actions
            .values
            .chunks(actions.t.max(1))
            .map(|drive| {
                drive.iter().all(|&n| {
                    let [a, k] = scales.denormalise(n);
                    a >= alo && a <= ahi && k >= klo && k <= khi
                })
            })
            .collect()
    }
}

impl Actions {
    /// Actions from an array `[.., T, 2]` (normalised acceleration, curvature).
    pub fn from_array(a: NamedArray<'_>) -> Result<Actions> {
        let d = a.shape;
        if d.len() < 2
            || d[d.len() - 1] != 2
            || d.contains(&0)
            || a.data.len() != d.iter().product::<usize>()
        {
            return Err(Error::Shape {
                what: a.name.into(),
                expected: "[.., T, 2] (normalised acceleration, curvature), no dimension 0".into(),
                got: d.to_vec(),
            });
        }
        if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::BadValue {
                what: format!("{} at {}", a.name, index_of(i, d)),
                reason: format!("found {}, expected a finite normalised action", a.data[i]),
            });
        }
        Ok(Actions {
            batch: d[..d.len() - 2].to_vec(),
            t: d[d.len() - 2],
            values: a.data.chunks_exact(2).map(|p| [p[0], p[1]]).collect(),
        })
    }

    /// The shape, `batch + [t, 2]`.
    pub fn shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.t, 2]);
        s
    }

    /// The values flat, in C order of [`Self::shape`].
    pub fn flat(&self) -> Vec<f64> {
        self.values.iter().flatten().copied().collect()
    }
}
