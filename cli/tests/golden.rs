//! The PyTorch reference cases in tests/data/golden, through the command line.

#[path = "../../tests/support/golden.rs"]
mod golden_support;

use std::process::Command;

use candle_core::Device;
use flow_matching::io::read_npy;
use golden_support::{assert_close, cases, Case};

#[test]
fn every_model_case_matches_through_the_cli() {
    let tmp = std::env::temp_dir().join(format!("fm-golden-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for dir in cases() {
        let case = Case::load(&dir);
        if case.json["model"] != "velocity-mlp" {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let (fin, traj, times) = (
            tmp.join(format!("{name}-final.npy")),
            tmp.join(format!("{name}-traj.npy")),
            tmp.join(format!("{name}-times.npy")),
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flow-matching"));
        cmd.arg("sample")
            .arg("--model")
            .arg(dir.join("model.safetensors"))
            .arg("--x-init")
            .arg(dir.join("x_init.npy"))
            .args([
                "--steps",
                &case.usize("steps").to_string(),
                "--method",
                "euler",
            ])
            .arg("--out")
            .arg(&fin)
            .arg("--trajectory")
            .arg(&traj)
            .arg("--times")
            .arg(&times);
        if let Some(l) = case.labels() {
            let l: Vec<String> = l.iter().map(|v| v.to_string()).collect();
            cmd.args(["--labels", &l.join(",")]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = Device::Cpu;
        assert_close(
            &name,
            &read_npy(&fin, &dev).unwrap(),
            &case.npy("expected_final.npy"),
            case.tol(),
        );
        assert_close(
            &name,
            &read_npy(&traj, &dev).unwrap(),
            &case.npy("expected_traj.npy"),
            case.tol(),
        );
        assert_close(
            &name,
            &read_npy(&times, &dev).unwrap(),
            &case.npy("expected_times.npy"),
            case.tol(),
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
}
