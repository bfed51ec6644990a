//! train's chosen sizes, coupling and early stopping; reflow, encode and loglik --out, end to
//! end on small runs.

mod support;

use candle_core::Device;
use flow_matching::io::read_npy;
use flow_matching::likelihood::{log_likelihood, LikelihoodOptions};
use flow_matching::{FlowMatching, SampleOptions, VelocityMlp};
use support::{golden_str, tmp};

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = support::run(args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn train_prints_the_sizes_it_chose() {
    let out = tmp("sized.safetensors");
    let o = out.to_str().unwrap();
    let (ok, _, err) = cli(&["train", "--data", "moons", "--steps", "3", "--out", o]);
    assert!(ok, "{err}");
    assert!(
        err.contains("sizes: velocity-mlp hidden 128, depth 3, batch 256, 3 steps (chosen from the data: endless samples of dimension 2"),
        "{err}"
    );
    let m = VelocityMlp::load(&out, &Device::Cpu).unwrap();
    assert_eq!((m.config().hidden, m.config().depth), (128, 3));
    // Everything given: nothing to print.
    let (ok, _, err) = cli(&[
        "train", "--data", "moons", "--steps", "3", "--batch", "8", "--hidden", "16", "--depth",
        "1", "--out", o,
    ]);
    assert!(ok, "{err}");
    assert!(!err.contains("sizes:"), "{err}");
}

#[test]
fn train_with_ot_coupling_and_early_stopping() {
    let out = tmp("ot.safetensors");
    let o = out.to_str().unwrap();
    let small = [
        "--hidden", "16", "--depth", "1", "--batch", "32", "--steps", "40",
    ];
    let mut args = vec![
        "train",
        "--data",
        "8gaussians",
        "--coupling",
        "ot",
        "--out",
        o,
    ];
    args.extend(small);
    let (ok, _, err) = cli(&args);
    assert!(ok, "{err}");
    args.extend(["--early-stop", "--val-every", "10", "--patience", "2"]);
    let (ok, _, err) = cli(&args);
    assert!(ok, "{err}");
    assert!(err.contains("early stopping: best held-out loss"), "{err}");
    let (ok, _, err) = cli(&[
        "train",
        "--data",
        "moons",
        "--coupling",
        "nearest",
        "--out",
        o,
    ]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: unknown coupling \"nearest\"; expected one of: independent, ot, ot:exact, ot:sinkhorn"
    );
}

#[test]
fn reflow_writes_an_ordinary_model_with_its_provenance() {
    let model = golden_str("mlp-2d/model.safetensors");
    let out = tmp("reflowed.safetensors");
    let o = out.to_str().unwrap();
    let (ok, _, err) = cli(&[
        "reflow",
        "--model",
        &model,
        "--out",
        o,
        "--pairs",
        "256",
        "--solver-steps",
        "4",
        "--steps",
        "10",
        "--batch",
        "32",
        "--rounds",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("round 2: 16 solver evaluations per pair"),
        "{err}"
    );
    let a = VelocityMlp::load(&model, &Device::Cpu).unwrap();
    let b = VelocityMlp::load(&out, &Device::Cpu).unwrap();
    assert_eq!(a.config(), b.config());
    // The safetensors header: an 8-byte length, then JSON with the metadata.
    let bytes = std::fs::read(&out).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let meta = &header["__metadata__"];
    assert_eq!(meta["reflow.rounds"], "2");
    assert_eq!(meta["reflow.solver"], "rk4:4");
    assert_eq!(meta["format"], "velocity-mlp");
    let (ok, _, err) = cli(&["reflow", "--model", &model, "--out", o, "--rounds", "0"]);
    assert!(!ok);
    assert_eq!(err.trim(), "error: invalid --rounds 0: at least 1");
}

#[test]
fn encode_matches_the_library_and_loglik_writes_rows() {
    let (model, data) = (
        golden_str("mlp-2d/model.safetensors"),
        golden_str("mlp-2d/train_x.npy"),
    );
    let noise = tmp("noise.npy");
    let (ok, _, err) = cli(&[
        "encode",
        "--model",
        &model,
        "--data",
        &data,
        "--steps",
        "8",
        "--out",
        noise.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut m = VelocityMlp::load(&model, &Device::Cpu).unwrap();
    let x = read_npy(&data, &Device::Cpu).unwrap();
    let fm = FlowMatching::new(m.config().x_dims.dims()).unwrap();
    let opts = SampleOptions {
        steps: Some(8),
        method: Some("rk4".parse().unwrap()),
        ..Default::default()
    };
    let want = fm.encode(&x, &mut m, &opts).unwrap().x;
    let got = read_npy(&noise, &Device::Cpu).unwrap();
    assert!(support::max_abs_diff(&want, &got) < 1e-6);

    let (lp, bpd) = (tmp("logp.npy"), tmp("bpd.npy"));
    let (ok, _, err) = cli(&[
        "loglik",
        "--model",
        &model,
        "--data",
        &data,
        "--steps",
        "16",
        "--out",
        lp.to_str().unwrap(),
        "--bpd-out",
        bpd.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut det = m.detach();
    let ll = log_likelihood(
        &mut det,
        &x,
        &LikelihoodOptions {
            steps: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let lp = read_npy(&lp, &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bpd = read_npy(&bpd, &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(lp.len(), ll.log_p.len());
    for ((a, b), (c, d)) in lp
        .iter()
        .zip(&ll.log_p)
        .zip(bpd.iter().zip(ll.bits_per_dim()))
    {
        assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
        assert!((*c as f64 - d).abs() < 1e-4, "{c} vs {d}");
    }
}
