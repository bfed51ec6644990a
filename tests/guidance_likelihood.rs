//! Classifier-free guidance, log-likelihoods and encoding (data back to noise).

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use flow_matching::guidance::{Guided, GuidedFn};
use flow_matching::io::read_npy;
use flow_matching::likelihood::{
    log_likelihood, standard_normal_log_density, Divergence, LikelihoodOptions, ProbeKind,
};
use flow_matching::solver::AdaptiveOptions;
use flow_matching::{Diffusion, FlowMatching, Method, SampleOptions, StepFn, VelocityMlp};

const COND: &str = "tests/data/golden/mlp-cond/model.safetensors";
const MLP2D: &str = "tests/data/golden/mlp-2d/model.safetensors";

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn points() -> Tensor {
    let v: Vec<f32> = vec![
        0.3, -1.2, 1.5, 0.4, -0.7, -0.9, 2.0, 0.1, 0.0, 0.8, -1.6, 1.1,
    ];
    Tensor::from_vec(v, (6, 2), &Device::Cpu).unwrap()
}

const LABELS: [u32; 6] = [0, 1, 2, 0, 1, 2];

#[test]
fn guidance_weight_zero_is_unconditional_and_one_is_conditional() {
    let dev = Device::Cpu;
    let model = VelocityMlp::load(COND, &dev).unwrap();
    assert_eq!(model.config().num_classes, 3);
    let x = points();
    let labels = model.labels_tensor(&LABELS, 6).unwrap();
    for t in [0.0, 0.3, 0.9] {
        let tt = Tensor::full(t as f32, (6, 1), &dev).unwrap();
        let cond = model.forward(&x, &tt, Some(&labels)).unwrap();
        let uncond = model.forward(&x, &tt, None).unwrap();
        assert!(
            max_abs_diff(&cond, &uncond) > 1e-3,
            "the classes must matter"
        );
        let at = |w: f64| {
            Guided::new(&model, &LABELS, w)
                .unwrap()
                .step_at(&x, t)
                .unwrap()
        };
        assert!(max_abs_diff(&at(0.0), &uncond) < 1e-6);
        assert!(max_abs_diff(&at(1.0), &cond) < 1e-6);
        // w = 2.5 from the single batched call equals the formula on two separate calls.
        let want = (&uncond + ((&cond - &uncond).unwrap() * 2.5).unwrap()).unwrap();
        assert!(max_abs_diff(&at(2.5), &want) < 1e-5);
    }
}

#[test]
fn generic_guidance_calls_the_field_once_per_evaluation_with_doubled_rows() {
    let dev = Device::Cpu;
    let model = VelocityMlp::load(COND, &dev).unwrap();
    let calls: RefCell<Vec<(usize, Vec<u32>)>> = RefCell::new(Vec::new());
    let field = |x: &Tensor, t: &Tensor, l: &Tensor| {
        calls.borrow_mut().push((x.dim(0)?, l.to_vec1::<u32>()?));
        model.forward(x, t, Some(l))
    };
    let mut guided = GuidedFn::new(field, &LABELS, 3, 2.0, &dev).unwrap();
    let fm = FlowMatching::new(2).unwrap().with_method("rk4").unwrap();
    let opts = SampleOptions {
        steps: Some(3),
        x_init: Some(points()),
        ..Default::default()
    };
    let out = fm.sample(6, &mut guided, &dev, &opts).unwrap();
    let calls = calls.into_inner();
    assert_eq!(out.nfe, 12);
    assert_eq!(calls.len(), out.nfe);
    for (rows, labels) in &calls {
        assert_eq!(*rows, 12);
        assert_eq!(labels[..6], LABELS);
        assert_eq!(labels[6..], [3; 6]);
    }
    // The model-specific step function gives the same samples.
    let fm = fm.with_guidance(2.0).unwrap();
    let mut guided = fm.guided(&model, &LABELS).unwrap();
    let again = fm.sample(6, &mut guided, &dev, &opts).unwrap();
    assert!(max_abs_diff(&out.x, &again.x) < 1e-6);
}

#[test]
fn guidance_refuses_bad_labels_and_weights() {
    let model = VelocityMlp::load(COND, &Device::Cpu).unwrap();
    assert_eq!(
        Guided::new(&model, &[0, 4], 2.0).unwrap_err().to_string(),
        "invalid label 4: a class in 0..3 or 3 for no condition"
    );
    assert_eq!(
        Guided::new(&model, &[0], f64::NAN).unwrap_err().to_string(),
        "invalid guidance weight NaN: a finite number (0 = unconditional, 1 = conditional, > 1 = stronger guidance)"
    );
    assert!(FlowMatching::new(2)
        .unwrap()
        .with_guidance(f64::INFINITY)
        .is_err());
    let mut g = Guided::new(&model, &[0, 1], 2.0).unwrap();
    let err = g.step_at(&points(), 0.5).unwrap_err();
    assert_eq!(
        err.to_string(),
        "x for the guided field: expected shape 2 rows, one per label, got [6, 2]"
    );
}

fn f64_likelihood(divergence: Divergence, steps: usize) -> LikelihoodOptions {
    LikelihoodOptions {
        divergence,
        steps,
        dtype: DType::F64,
        ..Default::default()
    }
}

#[test]
fn exact_log_likelihood_of_a_linear_flow_has_the_closed_form() {
    // v(x, t) = x: x1 = e x0, div v = D, so log p(x1) = log N(x1 / e; 0, I) - D.
    let x = Tensor::new(&[[0.5f64, -1.0, 2.0], [0.0, 0.3, -0.4]], &Device::Cpu).unwrap();
    let mut v = |x: &Tensor, _t: &Tensor| Ok::<_, candle_core::Error>(x.clone());
    let ll = log_likelihood(&mut v, &x, &f64_likelihood(Divergence::Exact, 16)).unwrap();
    let x0 = (&x * (-1.0f64).exp()).unwrap();
    let want: Vec<f64> = standard_normal_log_density(&x0)
        .unwrap()
        .iter()
        .map(|l| l - 3.0)
        .collect();
    for (got, want) in ll.log_p.iter().zip(&want) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    assert!(max_abs_diff(&ll.noise, &x0) < 1e-6);
    assert!(ll.delta_log_p.iter().all(|d| (d + 3.0).abs() < 1e-9));
    let bpd = ll.bits_per_dim();
    assert!((bpd[0] + want[0] / (3.0 * std::f64::consts::LN_2)).abs() < 1e-3);
    assert_eq!(ll.nfe, 16 * 4);
}

#[test]
fn exact_divergence_of_the_model_matches_finite_differences() {
    // One Euler step back from t = 1: x0 = x1 - v(x1, 1), log p = log N(x0) - div v(x1, 1).
    let mut model = VelocityMlp::load(MLP2D, &Device::Cpu).unwrap().detach();
    let x1 = Tensor::new(&[[0.7f64, -0.4]], &Device::Cpu).unwrap();
    let opts = LikelihoodOptions {
        method: "euler".parse().unwrap(),
        ..f64_likelihood(Divergence::Exact, 1)
    };
    let ll = log_likelihood(&mut model, &x1, &opts).unwrap();
    let h = 1e-3;
    let mut div = 0.0;
    for i in 0..2 {
        let mut plus = vec![0.7, -0.4];
        let mut minus = plus.clone();
        plus[i] += h;
        minus[i] -= h;
        let mut vi = |p: Vec<f64>| {
            let x = Tensor::new(&[[p[0], p[1]]], &Device::Cpu).unwrap();
            let v = model.step_at(&x, 1.0).unwrap();
            v.flatten_all().unwrap().to_vec1::<f64>().unwrap()[i]
        };
        div += (vi(plus) - vi(minus)) / (2.0 * h);
    }
    assert!(div.abs() > 0.1, "a non-trivial divergence: {div}");
    assert!(
        (ll.delta_log_p[0] + div).abs() < 1e-2,
        "{:?} vs {div}",
        ll.delta_log_p
    );
    let v = model.step_at(&x1, 1.0).unwrap();
    let x0 = (&x1 - v).unwrap();
    let want = standard_normal_log_density(&x0).unwrap()[0] - div;
    assert!((ll.log_p[0] - want).abs() < 1e-2);
}

#[test]
fn hutchinson_is_unbiased_for_the_exact_value() {
    let mut model = VelocityMlp::load(MLP2D, &Device::Cpu).unwrap().detach();
    let point = Tensor::new(&[[0.6f32, -0.8]], &Device::Cpu).unwrap();
    let exact = log_likelihood(
        &mut model,
        &point,
        &LikelihoodOptions {
            steps: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let (exact, exact_delta) = (exact.log_p[0], exact.delta_log_p[0]);
    // Every row is the same point with its own probe: the rows are independent estimates.
    let rows = point.repeat((800, 1)).unwrap();
    for kind in [ProbeKind::Rademacher, ProbeKind::Gaussian] {
        let opts = LikelihoodOptions {
            divergence: Divergence::Hutchinson {
                probes: 1,
                kind,
                seed: 7,
            },
            steps: 8,
            ..Default::default()
        };
        let est = log_likelihood(&mut model, &rows, &opts).unwrap();
        let (m, se) = (est.mean(), est.std_err());
        // The estimates vary, yet little enough to tell a sign error in the divergence.
        assert!(
            se > 1e-4 && 3.0 * se < exact_delta.abs(),
            "{kind:?}: se {se}, exact change {exact_delta}"
        );
        assert!(
            (m - exact).abs() < 3.0 * se,
            "{kind:?}: {m} ± {se} vs {exact}"
        );
        // Seeded: the same seed gives the same estimates.
        let again = log_likelihood(&mut model, &rows, &opts).unwrap();
        assert_eq!(est.log_p, again.log_p);
    }
    assert_eq!(
        log_likelihood(
            &mut model,
            &point,
            &LikelihoodOptions {
                divergence: Divergence::Hutchinson {
                    probes: 0,
                    kind: ProbeKind::Rademacher,
                    seed: 0
                },
                ..Default::default()
            }
        )
        .unwrap_err()
        .to_string(),
        "invalid number of probes 0: at least 1 (or the exact divergence)"
    );
}

#[test]
fn encoding_inverts_sampling() {
    let dev = Device::Cpu;
    let mut model = VelocityMlp::load(MLP2D, &dev).unwrap().detach();
    let x_init = read_npy("tests/data/golden/mlp-2d/x_init.npy", &dev).unwrap();
    let b = x_init.dim(0).unwrap();
    let fm = FlowMatching::new(2)
        .unwrap()
        .with_method("rk4")
        .unwrap()
        .with_steps(64)
        .unwrap();
    let opts = SampleOptions {
        x_init: Some(x_init.clone()),
        return_all_steps: true,
        ..Default::default()
    };
    let data = fm.sample(b, &mut model, &dev, &opts).unwrap();
    let back = fm.encode(&data.x, &mut model, &opts).unwrap();
    assert!(max_abs_diff(&back.x, &x_init) < 1e-3);
    assert!(
        max_abs_diff(&data.x, &x_init) > 0.1,
        "the flow must move the points"
    );
    let times = back.times.unwrap().to_vec1::<f32>().unwrap();
    assert_eq!((times[0], times[64]), (1.0, 0.0));
    assert!(times.windows(2).all(|w| w[1] < w[0]));
    let traj = back.trajectory.unwrap();
    assert_eq!(traj.dims(), &[b, 65, 2]);
    assert!(max_abs_diff(&traj.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(), &data.x) == 0.0);
    // The adaptive solver runs backwards as well. Its path is not RK4's at 64 steps (the time
    // features reach 100 oscillations over [0, 1]), so it makes its own samples; its global
    // error is about 100 times its tolerance on this field, hence the tight tolerance.
    let tight = AdaptiveOptions {
        rtol: 1e-7,
        atol: 1e-7,
        ..Default::default()
    };
    let o = SampleOptions {
        method: Some(Method::Dopri5(tight)),
        dtype: DType::F64,
        ..opts
    };
    let data = fm.sample(b, &mut model, &dev, &o).unwrap();
    let back = fm.encode(&data.x, &mut model, &o).unwrap();
    assert!(back.reached_end);
    assert!(max_abs_diff(&back.x, &x_init) < 1e-4);
    let times = back.times.unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(times.len(), back.accepted_steps + 1);
    assert_eq!((times[0], *times.last().unwrap()), (1.0, 0.0));
}
