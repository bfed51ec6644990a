//! Loading an ONNX network: the file's declared inputs and outputs read into an [`OnnxStep`]
//! (x, t and condition slots checked against the conventions), apart from running it.

use std::collections::HashMap;
use std::path::Path;

use tract_onnx::prelude as tp;
use tract_onnx::prelude::{Framework, InferenceModelExt};

use super::check::guarded;
use super::*;
use crate::error::{Error, Result};
use crate::XDims;

impl OnnxStep {
    /// Loads an ONNX velocity network; `x_dims` come from the declared shape of its `x` input.
    ///
    /// ```
    /// use flow_matching::onnx::OnnxStep;
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let mut v = OnnxStep::load("tests/data/onnx/mlp.onnx")?;
    /// let fm = FlowMatching::new(v.x_dims())?.with_method("rk4")?;
    /// let s = fm.sample(4, &mut v, &candle_core::Device::Cpu, &SampleOptions::seeded(0))?;
    /// assert_eq!(s.x.dims(), &[4, 3]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_x_dims(path, None)
    }

    /// Loads an ONNX velocity network with explicit `x_dims` (needed when `x` has a symbolic
    /// dimension besides the batch; checked against the declared shape otherwise).
    pub fn load_with_x_dims(path: impl AsRef<Path>, x_dims: Option<XDims>) -> Result<Self> {
        Self::load_with_runtime(path, x_dims, &Runtime::Tract)
    }

    /// Loads an ONNX velocity network with the given runtime (and explicit `x_dims` as in
    /// [`Self::load_with_x_dims`]). [`Runtime::Ort`] needs the feature `ort` and the ONNX
    /// Runtime library; a missing, unloadable or too old library is an
    /// [`Error::OnnxRuntimeLibrary`].
    pub fn load_with_runtime(
        path: impl AsRef<Path>,
        x_dims: Option<XDims>,
        runtime: &Runtime,
    ) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(onnx_err(path, "not a file"));
        }
        match runtime {
            Runtime::Tract => Self::load_tract(path, x_dims),
            #[cfg(feature = "ort")]
            Runtime::Ort(o) => {
                let (engine, declared) = super::check::guarded(path, "loading the model", || {
                    super::ort_engine::OrtEngine::open(path, o)
                })?;
                // ONNX Runtime loaded the file: its metadata is read with tract's reader.
                let convention = guarded(path, "reading the metadata", || {
                    let proto = tract_onnx::onnx()
                        .proto_model_for_path(path)
                        .map_err(|e| onnx_err(path, tract_msg(&e)))?;
                    metadata_convention(path, &proto)
                })?;
                Ok(
                    Self::from_declared(path, declared, x_dims, Engine::Ort(engine))?
                        .with_time_convention(convention),
                )
            }
            #[cfg(not(feature = "ort"))]
            Runtime::Ort(_) => Err(Error::invalid(
                "ONNX runtime",
                "ort",
                "tract: this build has no ONNX Runtime support (build the library with the \
                 feature `ort`, the CLI with --features ort)",
            )),
        }
    }

    fn load_tract(path: &Path, x_dims: Option<XDims>) -> Result<Self> {
        let onnx = tract_onnx::onnx();
        let mut proto = guarded(path, "reading the file", || {
            onnx.proto_model_for_path(path).map_err(|e| {
                onnx_err(
                    path,
                    format!(
                        "not a readable ONNX model (truncated or another format?): {}",
                        tract_msg(&e)
                    ),
                )
            })
        })?;
        let graph = match &proto.graph {
            Some(g) if !g.input.is_empty() && !g.output.is_empty() => g,
            _ => return Err(onnx_err(
                path,
                "not an ONNX model: no graph with inputs and outputs (empty or another format?)",
            )),
        };
        if let Some(node) = graph
            .node
            .iter()
            .find(|n| !onnx.op_register.0.contains_key(&n.op_type))
        {
            return Err(Error::OnnxUnsupportedOp {
                path: path.to_path_buf(),
                op: if node.domain.is_empty() {
                    node.op_type.clone()
                } else {
                    format!("{}.{}", node.domain, node.op_type)
                },
                node: node.name.clone(),
            });
        }
        // External data is read here, bounded, and inlined: tract gets no folder to read from.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        super::check::prepare_proto(path, dir, &mut proto)?;
        let convention = metadata_convention(path, &proto)?;
        let parsed = guarded(path, "building the graph", || {
            onnx.parse(&proto, None)
                .map_err(|e| onnx_err(path, format!("cannot build the graph: {}", tract_msg(&e))))
        })?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(onnx_err(
                path,
                format!(
                    "the graph uses values nothing defines: {:?}",
                    parsed.unresolved_inputs
                ),
            ));
        }
        let typed = guarded(path, "typing the graph", || {
            parsed
                .model
                .into_typed()
                .map_err(|e| onnx_err(path, format!("cannot type the graph: {}", tract_msg(&e))))
        })?;
        // Before tract's optimiser evaluates anything: the declared shapes at batch 1 must fit.
        super::check::check_facts(path, &typed, Some(1), "at batch 1")?;
        let model = guarded(path, "simplifying the graph", || {
            typed
                .into_decluttered()
                .map_err(|e| onnx_err(path, format!("cannot type the graph: {}", tract_msg(&e))))
        })?;
        let err = |e: tp::TractError| onnx_err(path, tract_msg(&e));
        if model.output_outlets().map_err(err)?.is_empty() {
            return Err(onnx_err(path, "the model has no output"));
        }
        let outlets = model.input_outlets().map_err(err)?.to_vec();
        let mut declared = Vec::with_capacity(outlets.len());
        for o in &outlets {
            let fact = model.outlet_fact(*o).map_err(err)?;
            declared.push((
                model.node(o.node).name.clone(),
                fact.shape.dims().to_vec(),
                fact.datum_type,
            ));
        }
        Ok(
            Self::from_declared(path, declared, x_dims, Engine::Tract(model))?
                .with_time_convention(convention),
        )
    }

    /// The step function over the declared inputs (name, dimensions, type) of either engine.
    fn from_declared(
        path: &Path,
        declared: Vec<(String, Vec<tp::TDim>, tp::DatumType)>,
        x_dims: Option<XDims>,
        engine: Engine,
    ) -> Result<Self> {
        let mut facts = Vec::with_capacity(declared.len());
        let mut inputs = Vec::with_capacity(declared.len());
        for (name, dims, datum) in declared {
            inputs.push(InputInfo {
                name,
                shape: dims.iter().map(dim_of).collect(),
                dtype: dtype_name(datum),
                batched: false,
            });
            facts.push(Fact { dims, datum });
        }
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        let find = |n: &str| {
            inputs.iter().position(|i| i.name == n).ok_or_else(|| {
                onnx_err(
                    path,
                    format!(
                        "no input named {n:?}; the step-function convention needs inputs \"x\" \
                         and \"t\" (its inputs: {})",
                        names.join(", ")
                    ),
                )
            })
        };
        let x_input = find("x")?;
        let t_input = find("t")?;
        // x: [B, *x_dims]
        let x_fact = &facts[x_input];
        let xd = x_fact.dims.clone();
        if xd.len() < 2 {
            return Err(onnx_err(
                path,
                format!(
                    "input x is declared {}; expected [batch, *x_dims] (at least 2 dimensions)",
                    inputs[x_input].shape_text()
                ),
            ));
        }
        let x_datum = x_fact.datum;
        if !matches!(x_datum, tp::DatumType::F32 | tp::DatumType::F64) {
            return Err(onnx_err(
                path,
                format!("input x has type {x_datum:?}; expected F32 or F64"),
            ));
        }
        let mut batch_symbols = Vec::new();
        let fixed_batch = match xd[0].as_i64() {
            Some(n) => Some(n.max(1) as usize),
            None => {
                batch_symbols.extend(xd[0].symbols());
                None
            }
        };
        let declared: Vec<Option<usize>> = xd[1..]
            .iter()
            .map(|d| d.as_i64().map(|n| n.max(0) as usize))
            .collect();
        let x_dims = match x_dims {
            Some(given) => {
                let ok = given.dims().len() == declared.len()
                    && given
                        .dims()
                        .iter()
                        .zip(&declared)
                        .all(|(g, d)| d.is_none_or(|d| d == *g));
                if !ok {
                    return Err(Error::Shape {
                        what: format!("x_dims for {}", path.display()),
                        expected: format!(
                            "the model's declared x shape without the batch, {:?}",
                            &inputs[x_input].shape[1..]
                                .iter()
                                .map(|d| d.to_string())
                                .collect::<Vec<_>>()
                        ),
                        got: given.dims().to_vec(),
                    });
                }
                given
            }
            None => {
                if let Some(i) = declared.iter().position(|d| d.is_none()) {
                    return Err(onnx_err(
                        path,
                        format!(
                            "input x is declared {} with the symbolic dimension {} besides the \
                             batch; give x_dims explicitly (--x-dims)",
                            inputs[x_input].shape_text(),
                            xd[i + 1]
                        ),
                    ));
                }
                XDims::new(declared.iter().map(|d| d.unwrap_or(1)).collect::<Vec<_>>())?
            }
        };
        let mut x_symbols = HashMap::new();
        for (d, &n) in xd[1..].iter().zip(x_dims.dims()) {
            if let tp::TDim::Sym(s) = d {
                x_symbols.insert(s.clone(), n);
            }
        }
        // t: [B], [B, 1, ..., 1], or shared
        let t_fact = &facts[t_input];
        let td = t_fact.dims.as_slice();
        let is_batch = |d: &tp::TDim| match (d.as_i64(), fixed_batch) {
            (Some(n), Some(f)) => n as usize == f,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let t_layout = if td.iter().all(|d| d.as_i64() == Some(1)) && fixed_batch != Some(1) {
            TimeLayout::Shared(td.len())
        } else if !td.is_empty()
            && is_batch(&td[0])
            && td[1..].iter().all(|d| d.as_i64() == Some(1))
        {
            if td[0].as_i64().is_none() {
                batch_symbols.extend(td[0].symbols());
            }
            TimeLayout::PerRow(td.len())
        } else {
            return Err(onnx_err(
                path,
                format!(
                    "input t is declared {}; expected [batch] or [batch, 1, ..., 1] (or a scalar)",
                    inputs[t_input].shape_text()
                ),
            ));
        };
        let t_datum = t_fact.datum;
        if !matches!(t_datum, tp::DatumType::F32 | tp::DatumType::F64) {
            return Err(onnx_err(
                path,
                format!("input t has type {t_datum:?}; expected F32 or F64"),
            ));
        }
        let mut conds = Vec::new();
        for (i, fact) in facts.iter().enumerate() {
            if i == x_input || i == t_input {
                continue;
            }
            let dims = fact.dims.clone();
            let batched = dims.first().is_some_and(|d| {
                d.as_i64().is_none() || fixed_batch.is_some_and(|f| d.as_i64() == Some(f as i64))
            });
            if batched && dims[0].as_i64().is_none() {
                batch_symbols.extend(dims[0].symbols());
            }
            inputs[i].batched = batched;
            conds.push(CondSlot {
                input: i,
                info: inputs[i].clone(),
                dims,
                datum: fact.datum,
                batched,
            });
        }
        batch_symbols.sort_by_key(|s| s.to_string());
        batch_symbols.dedup();
        Ok(OnnxStep {
            path: path.to_path_buf(),
            engine,
            inputs,
            x_input,
            x_datum,
            x_dims,
            x_symbols,
            batch_symbols,
            fixed_batch,
            t_input,
            t_layout,
            t_datum,
            conds,
            values: HashMap::new(),
            nulls: HashMap::new(),
            weight: 1.0,
            plans: HashMap::new(),
            live: false,
            optimised: 0,
            convention: TimeConvention::NoiseAt0,
            t_model: Vec::new(),
            x2: Vec::new(),
            t2: Vec::new(),
        })
    }
}

/// The time convention the file's metadata names (`time_convention`: `noise_at_0` or
/// `noise_at_1`, as `onnx.helper.set_model_props` writes it); noise at 0 when it names none.
pub(super) fn metadata_convention(
    path: &Path,
    proto: &tract_onnx::pb::ModelProto,
) -> Result<TimeConvention> {
    match proto
        .metadata_props
        .iter()
        .find(|p| p.key == "time_convention")
    {
        None => Ok(TimeConvention::NoiseAt0),
        Some(p) => p.value.parse().map_err(|_| {
            onnx_err(
                path,
                format!(
                    "metadata time_convention {:?}: expected one of {}",
                    crate::describe::excerpt(&p.value),
                    TimeConvention::ALL.map(|c| c.name()).join(", ")
                ),
            )
        }),
    }
}
