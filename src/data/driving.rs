//! Synthetic ego-vehicle scenes with multimodal futures: the seed's own job in miniature.
//!
//! A [`Scene`] is what the car knows now: its speed, the distance to the next junction, which
//! turns that junction allows, whether its light is red, and the gap to and speed of a lead
//! vehicle. Its future is one of four [`Intent`]s — keep lane, turn left, turn right, stop —
//! drawn with probabilities that depend on the scene ([`Scene::intent_probs`]), and then
//! driven by a small closed-loop controller whose timing (reaction delay, braking comfort,
//! turn radius and speed, desired speed) is drawn afresh for every future. A future is 64
//! unicycle actions (acceleration, curvature) at 0.1 s, stored normalised by [`SCALES`]
//! as `[64, 2]`; the condition is [`Scene::features`], [`COND_DIM`] numbers.
//!
//! Everything is deterministic from a seed. Besides the training pairs
//! ([`draw_driving`]), the generator draws K fresh futures of a given scene
//! ([`Scene::futures`], the oracle of [`crate::trajectory`]) and the conditional mean of the
//! actions ([`Scene::mean_future`], by Monte Carlo).

use std::f64::consts::PI;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::trajectory::{ActionScales, DT};

/// Waypoints in a future (6.4 s at [`DT`]).
pub const HORIZON: usize = 64;

/// Numbers in a scene's condition vector (see [`Scene::features`]).
pub const COND_DIM: usize = 7;

/// The normalisation of the driving actions: acceleration / 2 m/s², curvature / 0.05 1/m
/// (means 0). A right-angle turn of radius 10 m is curvature 0.1, i.e. 2.0 normalised.
pub const SCALES: ActionScales = ActionScales {
    accel_mean: 0.0,
    accel_std: 2.0,
    curv_mean: 0.0,
    curv_std: 0.05,
};

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Intent {
    /// Follow the lane (and the lead vehicle, if any) through the junction.
    KeepLane,
    /// Turn left at the junction (90°, radius 10–16 m).
    TurnLeft,
    /// Turn right at the junction (90°, radius 6–10 m).
    TurnRight,
    /// Stop at the junction's stop line.
    Stop,
}

impl Intent {
    /// Every intent, in the order of [`Scene::intent_probs`].
    pub const ALL: [Intent; 4] = [
        Intent::KeepLane,
        Intent::TurnLeft,
        Intent::TurnRight,
        Intent::Stop,
    ];

    /// A short name: `keep`, `left`, `right`, `stop`.
    pub fn name(self) -> &'static str {
        match self {
            Intent::KeepLane => "keep",
            Intent::TurnLeft => "left",
            Intent::TurnRight => "right",
            Intent::Stop => "stop",
        }
    }
}

/// One ego scene: the car at the origin heading along +x at speed `v0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    /// Current speed, m/s, in [4, 14].
    pub v0: f64,
    /// Distance to the junction's stop line, m, in [5, 45].
    pub junction: f64,
    /// Whether the junction has a road to the left.
    pub left_ok: bool,
    /// Whether the junction has a road to the right.
    pub right_ok: bool,
    /// Whether the junction's light is red.
    pub red: bool,
    /// Gap to the lead vehicle (bumper to bumper), m, in [6, 50]; `None` when the lane is free.
    pub lead_gap: Option<f64>,
    /// The lead vehicle's (constant) speed, m/s (0 when there is none).
    pub lead_speed: f64,
}

/// Gap the features report for a free lane, m (anything beyond is treated as free).
const FREE_GAP: f64 = 60.0;

impl Scene {
    /// Draws a scene: speed, junction distance, layout (each turn allowed with probability
    /// 0.6), a red light with probability 0.3, a lead vehicle with probability 0.4.
    pub fn draw<R: Rng + ?Sized>(rng: &mut R) -> Scene {
        let v0 = rng.random_range(4.0..14.0);
        let junction = rng.random_range(5.0..45.0);
        let left_ok = rng.random_bool(0.6);
        let right_ok = rng.random_bool(0.6);
        let red = rng.random_bool(0.3);
        let (lead_gap, lead_speed) = if rng.random_bool(0.4) {
            (
                Some(rng.random_range(6.0..50.0)),
                v0 * rng.random_range(0.3..1.1),
            )
        } else {
            (None, 0.0)
        };
        Scene {
            v0,
            junction,
            left_ok,
            right_ok,
            red,
            lead_gap,
            lead_speed,
        }
    }

    /// The condition vector, each entry roughly in [-1.5, 1.5]:
    ///
    /// | index | feature |
    /// | ---: | --- |
    /// | 0 | `(v0 - 9) / 3` (speed, m/s) |
    /// | 1 | `(junction - 25) / 12` (distance to the stop line, m) |
    /// | 2 | `+1` when a left turn exists, else `-1` |
    /// | 3 | `+1` when a right turn exists, else `-1` |
    /// | 4 | `+1` when the light is red, else `-1` |
    /// | 5 | `(min(gap, 60) - 30) / 15` (lead gap, m; a free lane reads as 60) |
    /// | 6 | `(lead_speed - v0) / 3` (closing speed, m/s; 0 for a free lane) |
    pub fn features(&self) -> [f32; COND_DIM] {
        let pm = |b: bool| if b { 1.0 } else { -1.0 };
        let gap = self.lead_gap.unwrap_or(FREE_GAP).min(FREE_GAP);
        let closing = if self.lead_gap.is_some() {
            self.lead_speed - self.v0
        } else {
            0.0
        };
        [
            ((self.v0 - 9.0) / 3.0) as f32,
            ((self.junction - 25.0) / 12.0) as f32,
            pm(self.left_ok),
            pm(self.right_ok),
            pm(self.red),
            ((gap - 30.0) / 15.0) as f32,
            (closing / 3.0) as f32,
        ]
    }

    /// The start speed, in m/s, recovered from [`Scene::features`] (feature 0).
    pub fn speed_from_features(features: &[f32]) -> f64 {
        features.first().map_or(0.0, |&f| 9.0 + 3.0 * f as f64)
    }

    /// The probability of each intent, in [`Intent::ALL`]'s order.
    ///
    /// Unnormalised weights: keep 1 (0.3 at a red light); each allowed turn 0.8 (a right turn
    /// on red 0.5, a left turn on red 0.15); stop 0.15 (3 at a red light). A turn is 5x less
    /// likely when slowing to turning speed needs more than 3 m/s² (too fast, too close), and
    /// stopping 5x less likely when it needs more than 5 m/s² (the driver runs the light).
    ///
    /// ```
    /// use flow_matching::data::driving::Scene;
    /// let s = Scene { v0: 10.0, junction: 30.0, left_ok: true, right_ok: false, red: false,
    ///                 lead_gap: None, lead_speed: 0.0 };
    /// let p = s.intent_probs();
    /// assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12 && p[2] == 0.0);
    /// ```
    pub fn intent_probs(&self) -> [f64; 4] {
        let v2 = self.v0 * self.v0;
        let d = self.junction.max(1.0);
        let turn_decel = (v2 - 36.0).max(0.0) / (2.0 * d);
        let stop_decel = v2 / (2.0 * d);
        let turn_factor = if turn_decel > 3.0 { 0.2 } else { 1.0 };
        let stop_factor = if stop_decel > 5.0 { 0.2 } else { 1.0 };
        let (keep, left, right, stop) = if self.red {
            (0.3, 0.15, 0.5, 3.0)
        } else {
            (1.0, 0.8, 0.8, 0.15)
        };
        let w = [
            keep,
            if self.left_ok {
                left * turn_factor
            } else {
                0.0
            },
            if self.right_ok {
                right * turn_factor
            } else {
                0.0
            },
            stop * stop_factor,
        ];
        let total: f64 = w.iter().sum();
        w.map(|x| x / total)
    }

    /// Draws an intent from [`Scene::intent_probs`].
    pub fn draw_intent<R: Rng + ?Sized>(&self, rng: &mut R) -> Intent {
        let p = self.intent_probs();
        let mut u: f64 = rng.random();
        for (i, &pi) in p.iter().enumerate() {
            if u < pi {
                return Intent::ALL[i];
            }
            u -= pi;
        }
        // Rounding left a sliver: the last intent with positive probability takes it.
        let last = p.iter().rposition(|&x| x > 0.0).unwrap_or(0);
        Intent::ALL[last]
    }

    /// Draws one future: an intent and its [`HORIZON`] physical actions (a in m/s², κ in 1/m).
    pub fn draw_future<R: Rng + ?Sized>(&self, rng: &mut R) -> (Intent, Vec<[f64; 2]>) {
        let intent = self.draw_intent(rng);
        (intent, self.drive(intent, rng))
    }

    /// Drives `intent` with freshly drawn timing: the physical actions of the future.
    pub fn drive<R: Rng + ?Sized>(&self, intent: Intent, rng: &mut R) -> Vec<[f64; 2]> {
        // Per-future randomness: how late the driver reacts, how hard they brake, how fast
        // they want to go, and a slow lateral wobble within the lane.
        let delay = rng.random_range(0.0..0.8);
        let comfort = rng.random_range(1.5..3.5);
        let v_des = (self.v0 * rng.random_range(0.95..1.2)).min(16.0);
        let wobble_amp = rng.random_range(0.0..0.003);
        let wobble_period = rng.random_range(3.0..8.0);
        let wobble_phase = rng.random_range(0.0..2.0 * PI);
        let (turn_speed, radius) = match intent {
            Intent::TurnLeft => (rng.random_range(5.0..8.0), rng.random_range(10.0..16.0)),
            Intent::TurnRight => (rng.random_range(3.5..6.0), rng.random_range(6.0..10.0)),
            _ => (0.0, 1.0),
        };
        let stop_margin = rng.random_range(0.0..3.0);
        // A lead follower's time headway (IDM), per future.
        let headway = rng.random_range(1.0..2.0);

        // The turn's curvature profile along arc length: a 3 m linear ramp in and out around a
        // constant arc, 90° in total.
        let ramp = 3.0;
        let hold = (PI / 2.0 * radius - ramp).max(0.0);
        let sign = if intent == Intent::TurnLeft {
            1.0
        } else {
            -1.0
        };
        let turn_curv = |s: f64| -> f64 {
            let u = s - self.junction;
            let k = 1.0 / radius;
            if u <= 0.0 {
                0.0
            } else if u < ramp {
                k * u / ramp
            } else if u < ramp + hold {
                k
            } else if u < 2.0 * ramp + hold {
                k * (2.0 * ramp + hold - u) / ramp
            } else {
                0.0
            }
        };

        let (mut v, mut s) = (self.v0, 0.0f64);
        let mut out = Vec::with_capacity(HORIZON);
        for k in 0..HORIZON {
            let time = k as f64 * DT;
            let reacting = time >= delay;
            let wobble = wobble_amp * (2.0 * PI * time / wobble_period + wobble_phase).sin();
            let cruise = (0.6 * (v_des - v)).clamp(-comfort, 1.5);
            let (mut a, kappa) = match intent {
                Intent::KeepLane => {
                    let a = match self.lead_gap {
                        // The intelligent driver model behind the lead vehicle.
                        Some(g0) => {
                            let gap = (g0 + self.lead_speed * time - s).max(0.5);
                            let dv = v - self.lead_speed;
                            let s_star =
                                2.0 + v * headway + v * dv / (2.0 * (1.5 * comfort).sqrt());
                            1.5 * (1.0
                                - (v / v_des.max(0.1)).powi(4)
                                - (s_star.max(0.0) / gap).powi(2))
                        }
                        None => cruise,
                    };
                    (a, wobble)
                }
                Intent::TurnLeft | Intent::TurnRight => {
                    let kappa = sign * turn_curv(s) + wobble;
                    let a = if s < self.junction {
                        if reacting {
                            let left = (self.junction - s).max(1.0);
                            (turn_speed * turn_speed - v * v) / (2.0 * left)
                        } else {
                            0.0
                        }
                    } else if turn_curv(s) > 0.0 {
                        0.5 * (turn_speed - v)
                    } else {
                        cruise.min(1.5)
                    };
                    (a.min(1.5), kappa)
                }
                Intent::Stop => {
                    let line = (self.junction - stop_margin).max(0.5);
                    let a = if !reacting {
                        0.0
                    } else if s < line && v > 0.3 {
                        -(v * v) / (2.0 * (line - s).max(0.3))
                    } else {
                        // At the line (or nearly still): brake to exactly zero and hold.
                        -v / DT
                    };
                    (a, wobble * (v / self.v0))
                }
            };
            // Never reverse: the integrator does not clamp speed at zero, so the actions must.
            a = a.clamp(-8.0, 3.0).max(-v / DT);
            out.push([a, kappa]);
            let v_next = v + a * DT;
            s += 0.5 * (v + v_next) * DT;
            v = v_next;
        }
        out
    }

    /// `k` fresh futures of this scene, normalised, `[k, 64, 2]` (the oracle's draws).
    pub fn futures(&self, k: usize, seed: u64) -> Result<Tensor> {
        if k == 0 {
            return Err(Error::invalid("futures per scene", 0, "at least 1"));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut v = Vec::with_capacity(k * HORIZON * 2);
        for _ in 0..k {
            push_normalised(&mut v, &self.draw_future(&mut rng).1);
        }
        Ok(Tensor::from_vec(v, (k, HORIZON, 2), &Device::Cpu)?)
    }

    /// The conditional mean of the normalised actions `[64, 2]`, estimated from `m` draws
    /// (the best a plain regression on actions can do; its standard error shrinks as 1/√m).
    pub fn mean_future(&self, m: usize, seed: u64) -> Result<Tensor> {
        let all = self.futures(m, seed)?;
        Ok(all.mean(0)?)
    }
}

/// Appends physical actions to `out`, normalised by [`SCALES`], as f32.
fn push_normalised(out: &mut Vec<f32>, actions: &[[f64; 2]]) {
    for a in actions {
        let n = SCALES.normalise(*a);
        out.push(n[0] as f32);
        out.push(n[1] as f32);
    }
}

/// A table of driving scenes with one drawn future each.
#[derive(Debug, Clone)]
pub struct DrivingSet {
    /// The scenes.
    pub scenes: Vec<Scene>,
    /// The intent each future was drawn with.
    pub intents: Vec<Intent>,
    /// Normalised futures, `[N, 64, 2]`, f32.
    pub x: Tensor,
    /// Conditions, `[N, COND_DIM]`, f32.
    pub cond: Tensor,
}

impl DrivingSet {
    /// The start speeds of the scenes, m/s.
    pub fn speeds(&self) -> Vec<f64> {
        self.scenes.iter().map(|s| s.v0).collect()
    }
}

/// Draws `n` scenes and one future for each, deterministically from `seed`.
///
/// ```
/// let d = flow_matching::data::driving::draw_driving(8, 0).unwrap();
/// assert_eq!((d.x.dims(), d.cond.dims()), (&[8, 64, 2][..], &[8, 7][..]));
/// ```
pub fn draw_driving(n: usize, seed: u64) -> Result<DrivingSet> {
    draw_driving_with(n, &mut StdRng::seed_from_u64(seed))
}

/// As [`draw_driving`], from a given generator (for fresh batches during training).
pub fn draw_driving_with<R: Rng + ?Sized>(n: usize, rng: &mut R) -> Result<DrivingSet> {
    if n == 0 {
        return Err(Error::ZeroBatch);
    }
    let mut scenes = Vec::with_capacity(n);
    let mut intents = Vec::with_capacity(n);
    let mut x = Vec::with_capacity(n * HORIZON * 2);
    let mut c = Vec::with_capacity(n * COND_DIM);
    for _ in 0..n {
        let scene = Scene::draw(rng);
        let (intent, actions) = scene.draw_future(rng);
        push_normalised(&mut x, &actions);
        c.extend_from_slice(&scene.features());
        scenes.push(scene);
        intents.push(intent);
    }
    Ok(DrivingSet {
        scenes,
        intents,
        x: Tensor::from_vec(x, (n, HORIZON, 2), &Device::Cpu)?,
        cond: Tensor::from_vec(c, (n, COND_DIM), &Device::Cpu)?,
    })
}

/// The oracle's samples for each scene: `k` fresh futures per scene, condition-major
/// `[N * k, 64, 2]` (row `n * k + j` belongs to scene n). Scene n draws from its own stream
/// (`seed` mixed with n), so the result does not depend on how scenes are batched.
pub fn oracle_futures(scenes: &[Scene], k: usize, seed: u64) -> Result<Tensor> {
    let parts: Vec<Tensor> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| s.futures(k, scene_seed(seed, i)))
        .collect::<Result<_>>()?;
    if parts.is_empty() {
        return Err(Error::ZeroBatch);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The Monte Carlo conditional mean of each scene's normalised actions (`m` draws a scene),
/// `[N, 64, 2]`.
pub fn conditional_means(scenes: &[Scene], m: usize, seed: u64) -> Result<Tensor> {
    let parts: Vec<Tensor> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.mean_future(m, scene_seed(seed, i))?
                .unsqueeze(0)
                .map_err(Into::into)
        })
        .collect::<Result<_>>()?;
    if parts.is_empty() {
        return Err(Error::ZeroBatch);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// A per-scene seed: `seed` and the scene index mixed by SplitMix64.
fn scene_seed(seed: u64, i: usize) -> u64 {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
