//! The `loglik` command against the library's figures, and its one-line errors.

mod support;

use candle_core::Device;
use flow_matching::io::read_npy;
use flow_matching::likelihood::{log_likelihood, LikelihoodOptions};
use flow_matching::VelocityMlp;
use support::golden_str;

fn cli(args: &[&str]) -> std::process::Output {
    support::run(args)
}

fn figure(out: &str, after: &str) -> f64 {
    let rest = &out[out.find(after).unwrap() + after.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn cli_loglik_prints_the_figures() {
    let (mlp2d, data) = (
        golden_str("mlp-2d/model.safetensors"),
        golden_str("mlp-2d/train_x.npy"),
    );
    let o = cli(&[
        "loglik", "--model", &mlp2d, "--data", &data, "--exact", "--steps", "16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let mut model = VelocityMlp::load(&mlp2d, &Device::Cpu).unwrap().detach();
    let x = read_npy(&data, &Device::Cpu).unwrap();
    let ll = log_likelihood(
        &mut model,
        &x,
        &LikelihoodOptions {
            steps: 16,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        (figure(&out, "log p(x): mean") - ll.mean()).abs() < 1e-5,
        "{out}"
    );
    assert!(
        (figure(&out, "standard error") - ll.std_err()).abs() < 1e-5,
        "{out}"
    );
    assert!(
        (figure(&out, "bits/dim:") - ll.mean_bits_per_dim()).abs() < 1e-5,
        "{out}"
    );
    assert!(out.contains("(N = 8, D = 2)"), "{out}");
    assert!(
        out.contains("exact divergence, rk4, 64 function evaluations"),
        "{out}"
    );

    let o = cli(&[
        "loglik", "--model", &mlp2d, "--data", &data, "--probes", "3", "--seed", "5",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains("Hutchinson estimator, 3 Rademacher probe(s), rk4, 128 function evaluations"),
        "{out}"
    );
}

#[test]
fn cli_loglik_bad_arguments_give_one_line_errors() {
    let (mlp2d, data) = (
        golden_str("mlp-2d/model.safetensors"),
        golden_str("mlp-2d/train_x.npy"),
    );
    let err = |args: &[&str]| {
        let mut all = vec!["loglik", "--model", &mlp2d];
        all.extend_from_slice(args);
        let o = cli(&all);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert_eq!(
        err(&["--data", &data, "--probes", "0"]),
        "error: invalid --probes 0: at least 1 (or --exact)\n"
    );
    assert_eq!(
        err(&["--data", &data, "--probes", "2", "--exact"]),
        "error: invalid --exact with --probes both given: one of them: --exact, or --probes K for Hutchinson's estimator\n"
    );
    assert_eq!(
        err(&["--data", "../tests/data/golden/mlp-traj/x_init.npy"]),
        "error: data ../tests/data/golden/mlp-traj/x_init.npy: expected shape [N, 2] with N >= 1 (the model's x_dims), got [4, 16, 2]\n"
    );
    assert_eq!(
        err(&["--data", &data, "--method", "rk5"]),
        "error: unknown integration method \"rk5\"; expected one of: euler, midpoint, heun, rk4, dopri5\n"
    );
    assert_eq!(
        err(&["--data", &data, "--labels", "1"]),
        "error: invalid labels [1, 1, 1, 1, 1, 1, 1, 1]: no labels: this model is unconditional (num_classes = 0)\n"
    );
    assert_eq!(
        err(&["--data", &data, "--probes", "1", "--probe-kind", "uniform"]),
        "error: unknown probe distribution \"uniform\"; expected one of: rademacher, gaussian\n"
    );
}
