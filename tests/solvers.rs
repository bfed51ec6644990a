//! Solvers and time grids: convergence orders, adaptive error control, step caps, schedules,
//! and the `sample` command's `--method`, `--rtol`/`--atol` and `--schedule` options.

use candle_core::{DType, Device, Tensor};
use flow_matching::solver::AdaptiveOptions;
use flow_matching::{Diffusion, Error, FlowMatching, Method, SampleOptions, Schedule, StepFn};

const FIXED: [(&str, f64); 4] = [
    ("euler", 1.0),
    ("midpoint", 2.0),
    ("heun", 2.0),
    ("rk4", 4.0),
];

fn x_init(values: &[f64]) -> Tensor {
    Tensor::from_vec(values.to_vec(), (values.len(), 1), &Device::Cpu).unwrap()
}

fn f64_options(x: &Tensor, method: Method, steps: usize) -> SampleOptions {
    SampleOptions {
        x_init: Some(x.clone()),
        method: Some(method),
        steps: Some(steps),
        dtype: DType::F64,
        ..Default::default()
    }
}

fn column(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Least-squares slope of log(err) against log(h).
fn slope(hs: &[f64], errs: &[f64]) -> f64 {
    let xs: Vec<f64> = hs.iter().map(|h| h.ln()).collect();
    let ys: Vec<f64> = errs.iter().map(|e| e.ln()).collect();
    let n = xs.len() as f64;
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    cov / var
}

/// The measured order of `method` on `field` from x(0) = x0 against the exact x(1).
fn measured_order(method: &str, field: &mut dyn StepFn, x0: f64, exact: f64) -> f64 {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[x0]);
    let steps = [8usize, 16, 32, 64];
    let mut errs = Vec::new();
    for &n in &steps {
        let opts = f64_options(&x, method.parse().unwrap(), n);
        let out = fm.sample(1, field, &Device::Cpu, &opts).unwrap();
        errs.push((column(&out.x)[0] - exact).abs());
    }
    let hs: Vec<f64> = steps.iter().map(|&n| 1.0 / n as f64).collect();
    slope(&hs, &errs)
}

#[test]
fn fixed_step_orders_on_decay() {
    for (name, order) in FIXED {
        let mut f = |x: &Tensor, _t: &Tensor| x.neg();
        let p = measured_order(name, &mut f, 1.0, (-1.0f64).exp());
        assert!(
            (p - order).abs() < 0.15,
            "{name}: slope {p}, expected {order}"
        );
    }
}

#[test]
fn fixed_step_orders_on_time_dependent_field() {
    // dx/dt = -x + t^2: x(t) = t^2 - 2t + 2 + (x0 - 2) e^-t; stages at the wrong time break
    // the order.
    for (name, order) in FIXED {
        let mut f = |x: &Tensor, t: &Tensor| x.neg()?.broadcast_add(&t.sqr()?);
        let p = measured_order(name, &mut f, 0.5, 1.0 - 1.5 / 1f64.exp());
        assert!(
            (p - order).abs() < 0.15,
            "{name}: slope {p}, expected {order}"
        );
    }
}

fn cubic(x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    (t.sqr()? * 3.0)?.broadcast_as(x.shape())?.contiguous()
}

#[test]
fn every_method_integrates_three_t_squared() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0, 0.0]);
    for name in ["euler", "midpoint", "heun", "rk4", "dopri5"] {
        let opts = f64_options(&x, name.parse().unwrap(), 256);
        let out = fm.sample(2, &mut cubic, &Device::Cpu, &opts).unwrap();
        let got = column(&out.x);
        assert!((got[0] - 2.0).abs() < 1e-2, "{name}: {got:?}");
        assert!((got[1] - 1.0).abs() < 1e-2, "{name}: {got:?}");
        assert!(out.reached_end);
    }
}

#[test]
fn nfe_counts_every_evaluation() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0]);
    for (name, per_step) in [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)] {
        let mut calls = 0usize;
        let mut f = |x: &Tensor, _t: &Tensor| {
            calls += 1;
            x.neg()
        };
        let out = fm
            .sample(
                1,
                &mut f,
                &Device::Cpu,
                &f64_options(&x, name.parse().unwrap(), 7),
            )
            .unwrap();
        assert_eq!(out.nfe, 7 * per_step, "{name}");
        assert_eq!(calls, out.nfe, "{name}");
        assert_eq!((out.accepted_steps, out.rejected_steps), (7, 0));
    }
    let mut calls = 0usize;
    let mut f = |x: &Tensor, _t: &Tensor| {
        calls += 1;
        x.neg()
    };
    let out = fm
        .sample(
            1,
            &mut f,
            &Device::Cpu,
            &f64_options(&x, "dopri5".parse().unwrap(), 1),
        )
        .unwrap();
    assert_eq!(calls, out.nfe);
    // FSAL: 1 evaluation at the start, 1 for the first-step guess, 6 per attempted step.
    assert_eq!(out.nfe, 2 + 6 * (out.accepted_steps + out.rejected_steps));
}

fn dopri(rtol: f64, atol: f64) -> AdaptiveOptions {
    AdaptiveOptions {
        rtol,
        atol,
        ..Default::default()
    }
}

#[test]
fn adaptive_meets_tight_tolerance_and_takes_fewer_steps_when_loose() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0, -2.0, 0.5]);
    let run = |o: AdaptiveOptions| {
        let mut f = |x: &Tensor, _t: &Tensor| x.neg();
        fm.sample(
            3,
            &mut f,
            &Device::Cpu,
            &f64_options(&x, Method::Dopri5(o), 1),
        )
        .unwrap()
    };
    let tight = run(dopri(1e-7, 1e-7));
    for (got, x0) in column(&tight.x).iter().zip([1.0, -2.0, 0.5]) {
        let want = (-1.0f64).exp() * x0;
        assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
    }
    let loose = run(dopri(1e-3, 1e-3));
    assert!(
        loose.accepted_steps < tight.accepted_steps,
        "loose {} vs tight {} steps",
        loose.accepted_steps,
        tight.accepted_steps
    );
    assert!(loose.nfe < tight.nfe);
    // Error control and FSAL: the loose run's error is larger but still near its tolerance.
    let err = (column(&loose.x)[0] - (-1.0f64).exp()).abs();
    assert!(err < 1e-2 && err > 1e-10, "loose error {err}");
}

#[test]
fn adaptive_rejects_steps_that_are_too_large() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0]);
    let o = AdaptiveOptions {
        first_step: Some(1.0),
        ..dopri(1e-9, 1e-9)
    };
    // A stiff-ish decay: a first step of 1 cannot meet 1e-9 and must be rejected.
    let mut f = |x: &Tensor, _t: &Tensor| x * -20.0;
    let out = fm
        .sample(
            1,
            &mut f,
            &Device::Cpu,
            &f64_options(&x, Method::Dopri5(o), 1),
        )
        .unwrap();
    assert!(out.rejected_steps >= 1);
    let want = (-20.0f64).exp();
    assert!((column(&out.x)[0] - want).abs() < 1e-9);
}

#[test]
fn step_cap_errors_by_default_and_returns_the_reached_state_when_asked() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0]);
    let capped = AdaptiveOptions {
        max_steps: 3,
        first_step: Some(0.01),
        max_step: 0.05,
        ..dopri(1e-8, 1e-8)
    };
    let mut f = |x: &Tensor, _t: &Tensor| x.neg();
    let err = fm
        .sample(
            1,
            &mut f,
            &Device::Cpu,
            &f64_options(&x, Method::Dopri5(capped.clone()), 1),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::MaxStepsReached { steps: 3, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .starts_with("adaptive solver stopped after 3 steps at t = 0."));

    let o = AdaptiveOptions {
        return_on_max_steps: true,
        ..capped
    };
    let opts = SampleOptions {
        return_all_steps: true,
        ..f64_options(&x, Method::Dopri5(o), 1)
    };
    let out = fm.sample(1, &mut f, &Device::Cpu, &opts).unwrap();
    assert!(!out.reached_end);
    assert_eq!(out.accepted_steps + out.rejected_steps, 3);
    let times = column(out.times.as_ref().unwrap());
    let t_end = *times.last().unwrap();
    assert!(t_end > 0.0 && t_end <= 0.15, "{times:?}");
    assert!((column(&out.x)[0] - (-t_end).exp()).abs() < 1e-8);
}

#[test]
fn adaptive_trajectory_follows_the_accepted_steps() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0]);
    let opts = SampleOptions {
        return_all_steps: true,
        ..f64_options(&x, Method::Dopri5(dopri(1e-6, 1e-6)), 1)
    };
    let mut f = |x: &Tensor, _t: &Tensor| x.neg();
    let out = fm.sample(1, &mut f, &Device::Cpu, &opts).unwrap();
    let times = column(out.times.as_ref().unwrap());
    assert_eq!(times.len(), out.accepted_steps + 1);
    assert_eq!((times[0], *times.last().unwrap()), (0.0, 1.0));
    assert!(times.windows(2).all(|w| w[1] > w[0]));
    let traj = out.trajectory.unwrap();
    assert_eq!(traj.dims(), &[1, times.len(), 1]);
    for (s, t) in column(&traj).iter().zip(&times) {
        assert!((s - (-t).exp()).abs() < 1e-6, "state {s} at t = {t}");
    }
}

#[test]
fn invalid_adaptive_options_are_refused() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0]);
    let mut f = |x: &Tensor, _t: &Tensor| x.neg();
    let err = fm
        .sample(
            1,
            &mut f,
            &Device::Cpu,
            &f64_options(&x, Method::Dopri5(dopri(0.0, 1e-6)), 1),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid rtol 0: a finite number greater than 0"
    );
}

#[test]
fn methods_parse_by_name() {
    for name in ["euler", "midpoint", "heun", "rk4", "dopri5"] {
        let m: Method = name.parse().unwrap();
        assert_eq!(m.to_string(), name);
        assert_eq!(m.is_adaptive(), name == "dopri5");
    }
    assert_eq!("RK4".parse::<Method>().unwrap(), Method::Rk4);
    let err = "rk45".parse::<Method>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown integration method \"rk45\"; expected one of: euler, midpoint, heun, rk4, dopri5"
    );
}

#[test]
fn shift_one_is_uniform_and_shift_three_starts_smaller() {
    for dtype in [DType::F32, DType::F64] {
        let uniform = Schedule::Uniform.grid(10, dtype).unwrap();
        assert_eq!(Schedule::Shift(1.0).grid(10, dtype).unwrap(), uniform);
        let shifted = Schedule::Shift(3.0).grid(10, dtype).unwrap();
        assert!(shifted[1] - shifted[0] < uniform[1] - uniform[0]);
        assert!((shifted[1] - 0.1 / (0.1 + 3.0 * 0.9)).abs() < 1e-7);
        assert_eq!((shifted[0], shifted[10]), (0.0, 1.0));
    }
    let cosine = Schedule::Cosine.grid(4, DType::F64).unwrap();
    let want = [
        0.0,
        0.5 - 0.5 / 2f64.sqrt(),
        0.5,
        0.5 + 0.5 / 2f64.sqrt(),
        1.0,
    ];
    for (g, w) in cosine.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{cosine:?}");
    }
}

#[test]
fn custom_grids_are_validated() {
    let err = |g: Vec<f64>| {
        Schedule::Custom(g)
            .grid(0, DType::F64)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(vec![0.1, 0.5, 1.0]),
        "invalid time grid [0.1, 0.5, 1.0]: a grid that starts at 0 and ends at 1"
    );
    assert_eq!(
        err(vec![0.0, 0.6, 0.5, 1.0]),
        "invalid time grid [0.0, 0.6, 0.5, 1.0]: strictly increasing times"
    );
    assert_eq!(
        err(vec![0.0]),
        "invalid time grid [0.0]: at least two times, from 0 to 1"
    );
    let close = Schedule::Custom(vec![0.0, 0.5, 0.5 + 1e-12, 1.0]);
    assert!(close.grid(0, DType::F64).is_ok());
    assert!(close
        .grid(0, DType::F32)
        .unwrap_err()
        .to_string()
        .contains("strictly increasing times in F32 precision"));
    assert_eq!(
        "0,0.2,1".parse::<Schedule>().unwrap(),
        Schedule::Custom(vec![0.0, 0.2, 1.0])
    );
    assert!("0,0.2".parse::<Schedule>().is_err());
    assert_eq!(
        "shift:0".parse::<Schedule>().unwrap_err().to_string(),
        "invalid schedule shift 0: a finite number greater than 0"
    );
}

#[test]
fn returned_times_are_the_grid_used() {
    let fm = FlowMatching::new(1).unwrap();
    let x = x_init(&[1.0, 2.0]);
    for (schedule, method) in [
        (Schedule::Shift(3.0), "euler"),
        (Schedule::Cosine, "rk4"),
        (Schedule::Custom(vec![0.0, 0.1, 0.45, 1.0]), "heun"),
    ] {
        let opts = SampleOptions {
            return_all_steps: true,
            schedule: Some(schedule.clone()),
            ..f64_options(&x, method.parse().unwrap(), 6)
        };
        let mut f = |x: &Tensor, _t: &Tensor| x.neg();
        let out = fm.sample(2, &mut f, &Device::Cpu, &opts).unwrap();
        let grid = schedule.grid(6, DType::F64).unwrap();
        assert_eq!(column(out.times.as_ref().unwrap()), grid);
        let traj = out.trajectory.unwrap();
        assert_eq!(traj.dims(), &[2, grid.len(), 1]);
        // Euler on dx/dt = -x: each state is the previous one times (1 - dt).
        if method == "euler" {
            let states = column(&traj.narrow(0, 0, 1).unwrap());
            for (i, w) in grid.windows(2).enumerate() {
                let want = states[i] * (1.0 - (w[1] - w[0]));
                assert!((states[i + 1] - want).abs() < 1e-12);
            }
        }
    }
}

// ---- the golden Euler cases (PyTorch, float32) still hold after the solver rework ----

fn allclose(got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (a, b) in g.iter().zip(&w) {
        assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "{a} vs {b}");
    }
}

#[test]
fn golden_euler_cases_match() {
    let dev = Device::Cpu;
    let dir = "tests/data/golden";
    let npy = |case: &str, f: &str| Tensor::read_npy(format!("{dir}/{case}/{f}.npy")).unwrap();
    let run = |case: &str, f: &mut dyn StepFn, x_dims: &[usize], steps: usize| {
        let x = npy(case, "x_init");
        let fm = FlowMatching::new(x_dims.to_vec()).unwrap();
        let opts = SampleOptions {
            x_init: Some(x.clone()),
            steps: Some(steps),
            return_all_steps: true,
            ..Default::default()
        };
        let out = fm.sample(x.dim(0).unwrap(), f, &dev, &opts).unwrap();
        allclose(&out.x, &npy(case, "expected_final"));
        allclose(
            out.trajectory.as_ref().unwrap(),
            &npy(case, "expected_traj"),
        );
        allclose(out.times.as_ref().unwrap(), &npy(case, "expected_times"));
    };
    let mut linear = |x: &Tensor, t: &Tensor| x.neg()?.broadcast_add(t);
    run("analytic-linear", &mut linear, &[3], 7);
    let mut model =
        flow_matching::VelocityMlp::load(format!("{dir}/mlp-traj/model.safetensors"), &dev)
            .unwrap();
    run("mlp-traj", &mut model, &[16, 2], 5);
}

#[test]
fn time_grids_are_computed_bit_for_bit_and_run_both_ways() {
    // torch.linspace(0, 1, T + 1) in float32, written out independently of the crate.
    let torch_f32 = |i: usize, steps: usize| {
        let step = 1.0f32 / steps as f32;
        if i < steps.div_ceil(2) {
            (i as f32 * step) as f64
        } else {
            (-((steps - i) as f32)).mul_add(step, 1.0) as f64
        }
    };
    for steps in [1, 2, 3, 7, 10, 1000, 99_999] {
        let g = Schedule::Uniform.time_grid(steps, DType::F32).unwrap();
        assert_eq!(g.len(), steps + 1);
        for i in [0, 1, steps / 2, steps.saturating_sub(1), steps] {
            assert_eq!(g.get(i), Some(torch_f32(i, steps)), "step {i} of {steps}");
        }
        assert_eq!(g.get(steps + 1), None);
        for schedule in [Schedule::Shift(3.0), Schedule::Cosine, Schedule::Uniform] {
            for dtype in [DType::F32, DType::F64] {
                let g = schedule.time_grid(steps, dtype);
                if schedule == Schedule::Cosine && dtype == DType::F32 && steps > 1000 {
                    // cos flattens at both ends: float32 merges the last times.
                    assert!(g.is_err());
                    continue;
                }
                let g = g.unwrap();
                let v = g.to_vec();
                let mut back = v.clone();
                back.reverse();
                assert_eq!(g.clone().reversed().to_vec(), back);
                assert_eq!(g.windows().count(), steps);
                assert!(g.windows().all(|(a, b)| b > a));
                assert_eq!((v[0], v[steps]), (0.0, 1.0));
            }
        }
    }
    let shifted = Schedule::Shift(3.0).time_grid(10, DType::F64).unwrap();
    assert_eq!(shifted.get(1), Some(0.1 / (0.1 + 3.0 * 0.9)));
}

#[test]
fn a_grid_whose_rounded_times_coincide_is_refused_with_a_short_message() {
    // shift 0.2 squeezes the last steps to a fifth of 2^-24: below float32's spacing near 1.
    let e = Schedule::Shift(0.2)
        .time_grid(1 << 24, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("strictly increasing times in F32 precision"),
        "{e}"
    );
    assert!(e.contains("shift:0.2: times"), "{e}");
    assert!(e.len() < 300, "{e}");
    assert!(Schedule::Shift(0.2).time_grid(1 << 24, DType::F64).is_ok());
}
