//! The driving scenes and the trajectory metrics: closed forms, hand-computed scores, and the
//! generator's promises (shapes, determinism, scene-dependent intents, bounds).

use candle_core::{Device, Tensor};
use flow_matching::data::driving::{
    conditional_means, draw_driving, oracle_futures, Intent, Scene, COND_DIM, HORIZON, SCALES,
};
use flow_matching::trajectory::{
    horizon_steps, integrate, min_ade_fde, positions, score_actions, ActionScales, DT, HORIZONS_S,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn straight_line_at_constant_speed() {
    let p = integrate(&[[0.0, 0.0]; 64], 7.5);
    for (k, q) in p.iter().enumerate() {
        assert!(
            (q[0] - 7.5 * DT * (k + 1) as f64).abs() < 1e-9,
            "{k}: {q:?}"
        );
        assert_eq!(q[1], 0.0);
    }
}

#[test]
fn constant_acceleration_is_exact() {
    // The trapezoid rule is exact for a linear speed: x = v0 t + a t² / 2.
    let p = integrate(&[[1.5, 0.0]; 64], 2.0);
    let t = 6.4;
    assert!((p[63][0] - (2.0 * t + 0.75 * t * t)).abs() < 1e-9);
}

#[test]
fn constant_curvature_follows_a_circle() {
    // Speed 10 m/s on curvature 1/20: the heading turns by δ = κ v dt a step, and each
    // trapezoid step is the exact circle's chord scaled by f = (δ/2) / tan(δ/2). So waypoint
    // k is exactly f (R sin kδ, R (1 - cos kδ)): a circle of radius f R (f = 0.99979 here).
    let (v, r) = (10.0, 20.0);
    let p = integrate(&[[0.0, 1.0 / r]; 64], v);
    let delta = v * DT / r;
    let f = (delta / 2.0) / (delta / 2.0).tan();
    for (k, q) in p.iter().enumerate() {
        let th = delta * (k + 1) as f64;
        let exact = [f * r * th.sin(), f * r * (1.0 - th.cos())];
        assert!(
            (q[0] - exact[0]).abs() < 1e-9 && (q[1] - exact[1]).abs() < 1e-9,
            "{k}: {q:?} vs {exact:?}"
        );
    }
    // Heading after 6.4 s is v t / R = 3.2 rad: the car has turned past a half circle.
    assert!(p[63][0] < 0.0 && p[63][1] > 2.0 * r - 0.5);
}

#[test]
fn positions_denormalise_and_use_each_rows_speed() {
    let scales = ActionScales {
        accel_mean: 1.0,
        accel_std: 2.0,
        curv_mean: 0.0,
        curv_std: 0.05,
    };
    // Normalised (-0.5, 0) is physical (0, 0): constant speed.
    let a = Tensor::from_vec([-0.5f32, 0.0].repeat(2 * 10), (2, 10, 2), &Device::Cpu).unwrap();
    let p = positions(&a, &[3.0, 6.0], &scales)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    assert!((p[0][9][0] - 3.0).abs() < 1e-5 && (p[1][9][0] - 6.0).abs() < 1e-5);
    let err = positions(&a, &[3.0], &scales).unwrap_err().to_string();
    assert!(
        err.contains("1 speeds") && err.contains("one per trajectory (2)"),
        "{err}"
    );
}

#[test]
fn hand_computed_min_ade() {
    // Two scenes, K = 2, T = 2. Truth: scene 0 at (1,0),(2,0); scene 1 at (0,1),(0,2).
    let truth = Tensor::new(
        &[[[1f32, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 2.0]]],
        &Device::Cpu,
    )
    .unwrap();
    let samples = Tensor::new(
        &[
            // scene 0, sample a: errors 0 then 4 (ADE@1 0, ADE@2 2, FDE@2 4)
            [[1f32, 0.0], [2.0, 4.0]],
            // scene 0, sample b: errors 1 then 1 (ADE@1 1, ADE@2 1, FDE@2 1)
            [[1.0, 1.0], [2.0, 1.0]],
            // scene 1, samples c, d: errors (3, 4) and (5, 0)
            [[3.0, 1.0], [0.0, 6.0]],
            [[0.0, -4.0], [0.0, 2.0]],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let m = min_ade_fde(&samples, &truth, 2, &[1, 2]).unwrap();
    // The seed's minADE: per scene the sample with the lowest whole-horizon mean (b, then d),
    // its error at every horizon. Scene 0: b, ADE@1 1, ADE@2 1. Scene 1: d, ADE@1 5, ADE@2 2.5.
    assert_eq!(m.ade, vec![3.0, 1.75]);
    // Each horizon's own best (the old convention): scene 0 a at @1 (0), scene 1 c at @1 (3).
    assert_eq!(m.ade_per_horizon, vec![1.5, 1.75]);
    // minFDE, each horizon's own best: scene 0 0 and 1, scene 1 3 and 0.
    assert_eq!(m.fde, vec![1.5, 0.5]);
    assert_eq!((m.k, m.scenes), (2, 2));
}

#[test]
fn min_ade_errors_name_the_problem() {
    let truth = Tensor::zeros((2, 4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let samples = Tensor::zeros((5, 4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = min_ade_fde(&samples, &truth, 2, &[4])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 scenes x K = 2") && e.contains("[5, 4, 2]"),
        "{e}"
    );
    let samples = Tensor::zeros((4, 4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = min_ade_fde(&samples, &truth, 2, &[5])
        .unwrap_err()
        .to_string();
    assert!(e.contains("horizon 5") && e.contains("1..=4"), "{e}");
    let e = min_ade_fde(&samples, &truth, 0, &[1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("K 0"), "{e}");
}

#[test]
fn non_finite_samples_count_as_far_away() {
    let truth = Tensor::zeros((1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let samples = Tensor::new(
        &[[[f32::NAN, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]],
        &Device::Cpu,
    )
    .unwrap();
    let m = min_ade_fde(&samples, &truth, 2, &[2]).unwrap();
    assert_eq!(m.ade, vec![1.0]);
}

#[test]
fn horizons_are_the_seeds() {
    assert_eq!(horizon_steps(&HORIZONS_S), vec![5, 10, 30, 50, 64]);
}

#[test]
fn driving_set_is_deterministic_and_shaped() {
    let a = draw_driving(64, 3).unwrap();
    let b = draw_driving(64, 3).unwrap();
    let c = draw_driving(64, 4).unwrap();
    assert_eq!(a.x.dims(), &[64, HORIZON, 2]);
    assert_eq!(a.cond.dims(), &[64, COND_DIM]);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&a.x), flat(&b.x));
    assert_eq!(flat(&a.cond), flat(&b.cond));
    assert_ne!(flat(&a.x), flat(&c.x));
    // The condition holds the start speed, so a user of the features alone can integrate.
    let cond = a.cond.to_vec2::<f32>().unwrap();
    for (s, c) in a.scenes.iter().zip(&cond) {
        assert!((Scene::speed_from_features(c) - s.v0).abs() < 1e-5);
        assert_eq!(&s.features()[..], &c[..]);
    }
}

#[test]
fn actions_stay_within_the_seeds_bounds_and_never_reverse() {
    let d = draw_driving(2000, 1).unwrap();
    let x = d.x.to_vec3::<f32>().unwrap();
    for (row, s) in x.iter().zip(&d.scenes) {
        let mut v = s.v0;
        for a in row {
            let [acc, k] = SCALES.denormalise([a[0] as f64, a[1] as f64]);
            assert!(acc.abs() <= 9.8 && k.abs() <= 0.2, "action ({acc}, {k})");
            v += acc * DT;
            assert!(v > -1e-6, "speed went negative: {v}");
        }
    }
}

#[test]
fn intents_depend_on_the_scene() {
    let base = Scene {
        v0: 8.0,
        junction: 30.0,
        left_ok: true,
        right_ok: true,
        red: false,
        lead_gap: None,
        lead_speed: 0.0,
    };
    let p = base.intent_probs();
    let red = Scene { red: true, ..base }.intent_probs();
    assert!(
        red[3] > 0.7 && p[3] < 0.1,
        "stop: green {}, red {}",
        p[3],
        red[3]
    );
    let no_left = Scene {
        left_ok: false,
        ..base
    }
    .intent_probs();
    assert_eq!(no_left[1], 0.0);
    // Too fast, too close: turning is much less likely.
    let rushed = Scene {
        v0: 14.0,
        junction: 8.0,
        ..base
    }
    .intent_probs();
    assert!(rushed[1] < 0.5 * p[1], "{rushed:?} vs {p:?}");
    // Drawn intents follow the probabilities.
    let mut rng = StdRng::seed_from_u64(0);
    let n = 20_000;
    let lefts = (0..n)
        .filter(|_| base.draw_intent(&mut rng) == Intent::TurnLeft)
        .count();
    assert!((lefts as f64 / n as f64 - p[1]).abs() < 0.015);
}

#[test]
fn each_intent_goes_where_it_says() {
    let s = Scene {
        v0: 8.0,
        junction: 15.0,
        left_ok: true,
        right_ok: true,
        red: false,
        lead_gap: None,
        lead_speed: 0.0,
    };
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..20 {
        let mut end = |i| *integrate(&s.drive(i, &mut rng), s.v0).last().unwrap();
        let (keep, left, right, stop) = (
            end(Intent::KeepLane),
            end(Intent::TurnLeft),
            end(Intent::TurnRight),
            end(Intent::Stop),
        );
        assert!(keep[0] > 40.0 && keep[1].abs() < 3.0, "keep {keep:?}");
        assert!(left[1] > 8.0, "left {left:?}");
        assert!(right[1] < -5.0, "right {right:?}");
        assert!(
            stop[0] > 9.0 && stop[0] < 16.5 && stop[1].abs() < 1.0,
            "stop {stop:?}"
        );
    }
}

#[test]
fn oracle_and_mean_references() {
    let d = draw_driving(40, 9).unwrap();
    let k = 6;
    let oracle = oracle_futures(&d.scenes, k, 1).unwrap();
    assert_eq!(oracle.dims(), &[40 * k, HORIZON, 2]);
    // Per-scene streams: the first 10 scenes' draws do not depend on the other 30.
    let first = oracle_futures(&d.scenes[..10], k, 1).unwrap();
    let head = oracle.narrow(0, 0, 10 * k).unwrap();
    assert_eq!(
        first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        head.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let mean = conditional_means(&d.scenes, 200, 2).unwrap();
    assert_eq!(mean.dims(), &[40, HORIZON, 2]);
    let h = horizon_steps(&HORIZONS_S);
    let v0 = d.speeds();
    let o = score_actions(&oracle, &d.x, &v0, k, &SCALES, &h).unwrap();
    let m = score_actions(&mean, &d.x, &v0, 1, &SCALES, &h).unwrap();
    // Six draws of the true distribution beat its single mean, by a wide margin at 6.4 s
    // where the modes have separated.
    assert!(o.ade_full() < 0.6 * m.ade_full(), "oracle {o:?} mean {m:?}");
    // Errors grow with the horizon.
    assert!(o.ade.windows(2).all(|w| w[0] <= w[1]) && m.fde.windows(2).all(|w| w[0] <= w[1]));
}
