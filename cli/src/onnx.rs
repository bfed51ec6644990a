//! ONNX velocity networks on the command line: loading with `--x-dims`, binding `--cond`,
//! `--per-cond` and `--null-cond` to the model's condition inputs.

use std::path::Path;

use candle_core::{Device, Tensor};
use flow_matching::condition::{expand_rows, repeat_per_cond};
use flow_matching::io::read_npy;
use flow_matching::onnx::{OnnxStep, OrtOptions, Runtime};
use flow_matching::{Error, Result, XDims};

use crate::cond::{CondArg, CondFlags};
use crate::RuntimeFlags;

/// The runtime `--runtime`, `--ort-lib` and `--ort-threads` name.
pub fn runtime(flags: &RuntimeFlags) -> Result<Runtime> {
    match flags.runtime.as_str() {
        "ort" => {
            if flags.ort_threads == Some(0) {
                return Err(Error::invalid("--ort-threads", 0, "at least 1 thread"));
            }
            Ok(Runtime::Ort(OrtOptions {
                library: flags.ort_lib.clone(),
                threads: flags.ort_threads.unwrap_or(1),
                spin: flags.ort_spin,
            }))
        }
        "tract" => {
            if let Some(p) = &flags.ort_lib {
                return Err(Error::invalid(
                    "--ort-lib",
                    p.display(),
                    "--runtime ort with it (the default runtime, tract, needs no library)",
                ));
            }
            if let Some(n) = flags.ort_threads {
                return Err(Error::invalid(
                    "--ort-threads",
                    n,
                    "--runtime ort with it (tract splits the rows over the machine's threads itself)",
                ));
            }
            if flags.ort_spin {
                return Err(Error::invalid(
                    "--ort-spin",
                    "given",
                    "--runtime ort with it (tract has no spinning threads)",
                ));
            }
            Ok(Runtime::Tract)
        }
        other => Err(Error::invalid("--runtime", other, "tract or ort")),
    }
}

/// Loads the network with the chosen runtime, with `--x-dims` when given.
pub fn load(path: &Path, x_dims: Option<&str>, flags: &RuntimeFlags) -> Result<OnnxStep> {
    let runtime = runtime(flags)?;
    let x_dims = x_dims.map(XDims::parse).transpose()?;
    OnnxStep::load_with_runtime(path, x_dims, &runtime)
}

/// One condition read from its file: the input it binds, the flag text for messages, its value.
struct Cond {
    name: String,
    what: String,
    value: Tensor,
    batched: bool,
}

/// Reads `--cond` / `--null-cond` values and names the input each binds: `FILE.npy` alone binds
/// the model's only condition input.
fn read_conds(step: &OnnxStep, args: &[CondArg], flag: &str) -> Result<Vec<Cond>> {
    let inputs = step.condition_inputs();
    let mut out: Vec<Cond> = Vec::new();
    for a in args {
        let name = match (&a.name, inputs.as_slice()) {
            (Some(n), _) => n.clone(),
            (None, [only]) => only.name.clone(),
            (None, []) => {
                return Err(Error::invalid(
                    "--cond",
                    a.path.display(),
                    "no condition: the model takes only x and t",
                ))
            }
            (None, many) => {
                let names: Vec<String> = many
                    .iter()
                    .map(|i| format!("{} {}", i.name, i.shape_text()))
                    .collect();
                return Err(Error::invalid(
                    "--cond",
                    a.path.display(),
                    format!(
                        "NAME=FILE.npy: the model has several condition inputs ({})",
                        names.join(", ")
                    ),
                ));
            }
        };
        let info = step.condition_input(&name)?;
        if out.iter().any(|c| c.name == name) {
            return Err(Error::invalid(
                "--cond",
                format!("{name} given twice"),
                format!("one {flag} per input"),
            ));
        }
        let batched = info.batched;
        out.push(Cond {
            what: format!("{flag} {name}={}", a.path.display()),
            value: read_npy(&a.path, &Device::Cpu)?,
            name,
            batched,
        });
    }
    Ok(out)
}

/// Loads an ONNX network and binds its conditions for `sample`; returns it with the batch.
///
/// The batch is the rows of `--x-init` when given; else the condition rows N times `--per-cond
/// K` (N = 1 when every condition has one row); else N when a condition has N > 1 rows; else
/// `batch`. Conditions of one row are shared by every sample.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    model: &Path,
    x_dims: Option<&str>,
    runtime: &RuntimeFlags,
    flags: &CondFlags,
    null_cond: &[CondArg],
    guidance: Option<f64>,
    batch: usize,
    x_init_rows: Option<usize>,
) -> Result<(OnnxStep, usize)> {
    if flags.per_cond == Some(0) {
        return Err(Error::invalid(
            "--per-cond",
            0,
            "at least 1 sample per condition",
        ));
    }
    let mut step = load(model, x_dims, runtime)?;
    let conds = read_conds(&step, &flags.cond, "--cond")?;
    let nulls = read_conds(&step, null_cond, "--null-cond")?;
    let mut rows: Option<(usize, &str)> = None;
    for c in conds.iter().filter(|c| c.batched) {
        let r = c.value.dim(0)?;
        if r <= 1 {
            continue;
        }
        match rows {
            Some((m, other)) if m != r => {
                return Err(Error::Shape {
                    what: c.what.clone(),
                    expected: format!("{m} rows like {other}, or 1 row"),
                    got: c.value.dims().to_vec(),
                })
            }
            _ => rows = Some((r, &c.what)),
        }
    }
    let batch =
        crate::bounds::implied_batch(batch, x_init_rows, rows.map(|(r, _)| r), flags.per_cond)?;
    // Every condition expanded to the batch, and the state, bounded before any is built.
    let cond_values: usize = conds
        .iter()
        .chain(&nulls)
        .filter(|c| c.batched)
        .map(|c| c.value.dims()[1..].iter().product::<usize>())
        .fold(0, usize::saturating_add);
    crate::bounds::sampling_with_cond(
        batch,
        step.x_dims().numel(),
        cond_values,
        flags.per_cond,
        1,
        false,
    )?;
    let shape = |c: &Cond| -> Result<Tensor> {
        if !c.batched {
            return Ok(c.value.clone());
        }
        let v = match flags.per_cond {
            Some(k) if c.value.dim(0)? > 1 => repeat_per_cond(&c.value, k)?,
            _ => c.value.clone(),
        };
        expand_rows(&v, batch, &c.what)
    };
    for c in &conds {
        step.set_condition(&c.name, &shape(c)?)?;
    }
    match (guidance, nulls.is_empty()) {
        (Some(w), false) => {
            let values: Vec<(String, Tensor)> = nulls
                .iter()
                .map(|c| Ok((c.name.clone(), shape(c)?)))
                .collect::<Result<_>>()?;
            let refs: Vec<(&str, &Tensor)> = values.iter().map(|(n, v)| (n.as_str(), v)).collect();
            step = step.with_guidance(w, &refs)?;
        }
        (Some(w), true) => return Err(Error::invalid(
            "--guidance",
            w,
            "--null-cond NAME=FILE.npy as well: the unconditional value guidance steers away from",
        )),
        (None, false) => {
            return Err(Error::invalid(
                "--null-cond",
                "given without --guidance",
                "--guidance W with it",
            ))
        }
        (None, true) => {}
    }
    step.check_batch(batch)?;
    Ok((step, batch))
}
