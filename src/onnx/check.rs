//! What tract is never trusted with: a pass over the ONNX protobuf before tract sees it, a
//! bound on the memory the typed graph's declared shapes imply, and a guard that turns a panic
//! inside the runtime into an error.
//!
//! - [`prepare_proto`] reads external data itself (regular files only, bounded by each tensor's
//!   declared size), refuses tensor types tract cannot build, graphs without nodes, size ops
//!   (`ConstantOfShape`, `Expand`, `Tile`, `Range`) whose constant inputs ask for more memory
//!   than the limit, and collapses chains of `Identity` nodes (tract's optimiser is quadratic in
//!   them) in one linear pass.
//! - [`check_facts`] walks a typed graph in evaluation order and refuses it when the tensors
//!   its declared shapes imply, alive at once, exceed the memory limit: at load with every
//!   symbolic size (the batch) at 1, and again for each plan at its batch, before tract
//!   optimises (and so evaluates) anything.
//! - [`guarded`] runs a tract (or ONNX Runtime) call under `catch_unwind`, silencing the panic
//!   hook for it, so an internal error of the runtime is one line naming the model.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude as tp;

use super::fold;
use crate::error::{Error, Result};
use crate::limits::{check_memory, memory_limit};

/// The most nodes a graph may have once `Identity` chains are collapsed: tract's optimiser
/// grows faster than the graph, and a velocity network has a few thousand nodes at most.
pub const MAX_NODES: usize = 50_000;

fn err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Onnx {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

thread_local! {
    /// Guarded calls running on this thread: while above 0, the panic hook stays silent.
    static QUIET: Cell<usize> = const { Cell::new(0) };
    /// Where the last silenced panic happened, for the error message.
    static WHERE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: std::sync::Once = std::sync::Once::new();

/// Runs `f`, a call into the ONNX runtime while `doing` something, and turns a panic inside it
/// into an [`Error::Onnx`] naming the model; nothing is printed for such a panic (the previous
/// panic hook still reports every other panic).
pub(crate) fn guarded<T>(path: &Path, doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) > 0 {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                WHERE.with(|w| *w.borrow_mut() = at);
                return;
            }
            previous(info);
        }));
    });
    QUIET.with(|q| q.set(q.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get().saturating_sub(1)));
    match r {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            let at = WHERE.with(|w| w.borrow_mut().take());
            Err(err(
                path,
                format!(
                    "the runtime failed while {doing} ({}{}); this graph is refused",
                    crate::describe::excerpt(msg.lines().next().unwrap_or_default()),
                    at.map_or(String::new(), |a| format!(", at {a}"))
                ),
            ))
        }
    }
}

/// Bytes of one element of an ONNX `TensorProto.DataType` that tract builds; `None` for the
/// types it cannot (strings, complex numbers, bfloat16, undefined).
fn elem_bytes(data_type: i32) -> Option<u64> {
    Some(match data_type {
        2 | 3 | 9 => 1,   // uint8, int8, bool
        4 | 5 | 10 => 2,  // uint16, int16, float16
        1 | 6 | 12 => 4,  // float, int32, uint32
        7 | 11 | 13 => 8, // int64, double, uint64
        _ => return None,
    })
}

fn type_name(data_type: i32) -> String {
    pb::tensor_proto::DataType::try_from(data_type).map_or_else(
        |_| format!("type {data_type}"),
        |t| t.as_str_name().to_string(),
    )
}

/// The declared element count of a tensor, refusing negative dimensions and overflow.
fn declared_elems(path: &Path, t: &pb::TensorProto, what: &str) -> Result<u64> {
    t.dims.iter().try_fold(1u64, |acc, &d| {
        let d = u64::try_from(d)
            .map_err(|_| err(path, format!("{what} has the negative dimension {d}")))?;
        acc.checked_mul(d).ok_or_else(|| {
            err(
                path,
                format!("{what}: its dimensions {:?} overflow 64 bits", t.dims),
            )
        })
    })
}

/// Prepares a parsed model for tract: see the module documentation. `dir` is the model's
/// folder, where external data must live.
pub(crate) fn prepare_proto(path: &Path, dir: &Path, proto: &mut pb::ModelProto) -> Result<()> {
    let Some(graph) = proto.graph.as_mut() else {
        return Err(err(path, "no graph"));
    };
    if graph.node.is_empty() {
        return Err(err(
            path,
            "the graph has no nodes: its outputs are not computed from its inputs",
        ));
    }
    let mut budget = memory_limit()?;
    prepare_graph(path, dir, graph, &mut budget)?;
    collapse_identities(graph);
    if graph.node.len() > MAX_NODES {
        return Err(err(
            path,
            format!(
                "the graph has {} nodes (after removing Identity chains); at most {MAX_NODES} are loaded",
                graph.node.len()
            ),
        ));
    }
    check_size_ops(path, graph)
}

/// Every tensor of `graph` and its subgraphs: its type checked, external data inlined.
fn prepare_graph(
    path: &Path,
    dir: &Path,
    graph: &mut pb::GraphProto,
    budget: &mut u64,
) -> Result<()> {
    for t in &mut graph.initializer {
        prepare_tensor(path, dir, t, budget)?;
    }
    for node in &mut graph.node {
        let name = node.name.clone();
        for a in &mut node.attribute {
            for t in a.t.iter_mut().chain(a.tensors.iter_mut()) {
                prepare_tensor(path, dir, t, budget).map_err(|e| match e {
                    Error::Onnx { path, reason } => Error::Onnx {
                        path,
                        reason: format!("node {name:?}: {reason}"),
                    },
                    e => e,
                })?;
            }
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                prepare_graph(path, dir, g, budget)?;
            }
        }
    }
    Ok(())
}

/// One tensor: a type tract builds (strings only as string data, never raw bytes), its
/// declared size within what is left of the memory limit, external data read and inlined.
fn prepare_tensor(
    path: &Path,
    dir: &Path,
    t: &mut pb::TensorProto,
    budget: &mut u64,
) -> Result<()> {
    let what = format!("tensor {:?}", crate::describe::excerpt(&t.name));
    let elems = declared_elems(path, t, &what)?;
    let Some(size) = elem_bytes(t.data_type) else {
        return Err(err(
            path,
            format!(
                "{what} has element type {}; a velocity network's tensors are numbers (float, integer or bool)",
                type_name(t.data_type)
            ),
        ));
    };
    let bytes = elems.checked_mul(size);
    check_memory(
        &format!("ONNX model {}: {what} {:?}", path.display(), t.dims),
        bytes,
    )?;
    let bytes = bytes.unwrap_or(u64::MAX);
    // Tensors stay in memory for the model's life: together they must fit too.
    *budget = budget.checked_sub(bytes).ok_or_else(|| Error::TooLarge {
        what: format!("ONNX model {}: its tensors up to {what}", path.display()),
        needed: None,
        available: memory_limit().unwrap_or(0),
    })?;
    let external = t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
    if !external {
        if !t.raw_data.is_empty() && t.raw_data.len() as u64 != bytes {
            return Err(err(
                path,
                format!(
                    "{what} {:?} holds {} bytes of data, expected {bytes}",
                    t.dims,
                    t.raw_data.len()
                ),
            ));
        }
        return Ok(());
    }
    let data = read_external(path, dir, t, &what, bytes)?;
    t.raw_data = data;
    t.external_data.clear();
    t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
    Ok(())
}

/// The external data of `t`: `location` must name a regular file inside `dir` (no link out of
/// it, no FIFO or device), and exactly the tensor's declared `bytes` are read from `offset`.
fn read_external(
    path: &Path,
    dir: &Path,
    t: &pb::TensorProto,
    what: &str,
    bytes: u64,
) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let entry = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let location = entry("location")
        .ok_or_else(|| err(path, format!("{what} is external but names no location")))?;
    let number = |k: &str| -> Result<Option<u64>> {
        entry(k)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    err(
                        path,
                        format!(
                            "{what}: external data {k} {:?} is not a byte count",
                            crate::describe::excerpt(v)
                        ),
                    )
                })
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    if let Some(length) = number("length")? {
        if length != bytes {
            return Err(err(
                path,
                format!("{what} {:?}: external data length {length}, expected {bytes} (its declared size)", t.dims),
            ));
        }
    }
    let rel = Path::new(location);
    if rel.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) {
        return Err(err(
            path,
            format!("{what}: external data location {:?} must be a relative path inside the model's folder", crate::describe::excerpt(location)),
        ));
    }
    let file_err = |e: std::io::Error| {
        err(
            path,
            format!(
                "{what}: external data {}: {e}",
                crate::describe::excerpt(location)
            ),
        )
    };
    let root = std::fs::canonicalize(dir).map_err(file_err)?;
    let data_path = std::fs::canonicalize(root.join(rel)).map_err(file_err)?;
    if !data_path.starts_with(&root) {
        return Err(err(
            path,
            format!(
                "{what}: external data {:?} resolves outside the model's folder",
                crate::describe::excerpt(location)
            ),
        ));
    }
    // Opened without blocking (a FIFO would wait for a writer forever), then checked to be a
    // regular file on the open handle itself, so a file swapped in after a check is caught.
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc_o_nonblock());
    }
    let mut file = opts.open(&data_path).map_err(file_err)?;
    let meta = file.metadata().map_err(file_err)?;
    if !meta.is_file() {
        return Err(err(
            path,
            format!(
                "{what}: external data {} is {}; only regular files are read",
                crate::describe::excerpt(location),
                crate::describe::file_kind(&meta)
            ),
        ));
    }
    let end = offset.checked_add(bytes);
    if end.is_none_or(|e| e > meta.len()) {
        return Err(err(
            path,
            format!("{what} {:?}: external data {} holds {} bytes, fewer than offset {offset} + {bytes}", t.dims, crate::describe::excerpt(location), meta.len()),
        ));
    }
    let cap = usize::try_from(bytes).map_err(|_| {
        err(
            path,
            format!("{what}: larger than this platform's address space"),
        )
    })?;
    file.seek(std::io::SeekFrom::Start(offset))
        .map_err(file_err)?;
    let mut data = Vec::with_capacity(cap);
    file.take(bytes).read_to_end(&mut data).map_err(file_err)?;
    if data.len() != cap {
        return Err(err(
            path,
            format!(
                "{what}: external data {} ended after {} of {bytes} bytes",
                crate::describe::excerpt(location),
                data.len()
            ),
        ));
    }
    Ok(data)
}

/// `O_NONBLOCK` on Linux and the BSDs (std has no constant for it).
#[cfg(unix)]
fn libc_o_nonblock() -> i32 {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        0o4000
    } else {
        0x0004
    }
}

/// Removes `Identity` nodes, wiring their consumers to their input, except those whose output
/// is a graph output (one stays per output). Linear: each name is resolved once, memoised.
/// Skipped for graphs with subgraphs, whose bodies may name outer values.
fn collapse_identities(graph: &mut pb::GraphProto) {
    let has_subgraphs = graph.node.iter().any(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    });
    if has_subgraphs {
        return;
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    for n in &graph.node {
        if n.op_type == "Identity"
            && n.domain.is_empty()
            && n.input.len() == 1
            && n.output.len() == 1
            && !outputs.contains(n.output[0].as_str())
        {
            alias.insert(n.output[0].clone(), n.input[0].clone());
        }
    }
    if alias.is_empty() {
        return;
    }
    let mut resolved: HashMap<String, String> = HashMap::with_capacity(alias.len());
    let mut resolve = |name: &str| -> String {
        let mut chain = Vec::new();
        let mut cur = name.to_string();
        let root = loop {
            if let Some(r) = resolved.get(&cur) {
                break r.clone();
            }
            match alias.get(&cur) {
                // A cycle of Identities is left for tract to refuse.
                Some(next) if chain.len() <= alias.len() => {
                    chain.push(cur);
                    cur = next.clone();
                }
                _ => break cur,
            }
        };
        for c in chain {
            resolved.insert(c, root.clone());
        }
        root
    };
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .filter(|n| {
            !(n.output.len() == 1 && alias.contains_key(&n.output[0]) && n.op_type == "Identity")
        })
        .map(|mut n| {
            for i in &mut n.input {
                if !i.is_empty() {
                    *i = resolve(i);
                }
            }
            n
        })
        .collect();
}

/// The static shape of a graph input (`None` when any dimension is symbolic).
fn input_dims(i: &pb::ValueInfoProto) -> Option<Vec<usize>> {
    use pb::tensor_shape_proto::dimension::Value as Dim;
    use pb::type_proto::Value;
    let Some(Value::TensorType(t)) = i.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    t.shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) => usize::try_from(v).ok(),
            _ => None,
        })
        .collect()
}

/// Refuses size ops whose inputs, folded from the graph's constants, ask for a tensor beyond
/// the memory limit, naming the node: tract evaluates constant subgraphs while loading, before
/// any shape is checked. A size computed from constants by ops the fold does not know is
/// refused too (it could be anything).
fn check_size_ops(path: &Path, graph: &pb::GraphProto) -> Result<()> {
    let dims: HashMap<&str, Vec<usize>> = graph
        .input
        .iter()
        .filter_map(|i| Some((i.name.as_str(), input_dims(i)?)))
        .collect();
    let vals = fold::fold_graph(graph, &dims);
    let graph_inputs: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let mut consts: HashSet<&str> = graph
        .initializer
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !graph_inputs.contains(n))
        .collect();
    // Values computed from constants alone: tract folds them while loading too.
    for n in &graph.node {
        if n.op_type == "Constant" {
            consts.extend(n.output.iter().map(String::as_str));
            continue;
        }
        let size_input = match n.op_type.as_str() {
            "ConstantOfShape" => Some(0),
            "Expand" | "Tile" | "Range" => Some(1),
            _ => None,
        };
        if let Some(k) = size_input {
            let value = |i: usize| n.input.get(i).and_then(|x| vals.get(x.as_str()));
            let elems: Option<u64> = match n.op_type.as_str() {
                "Range" => {
                    let scalar = |i: usize| value(i).and_then(fold::Ints::scalar);
                    match (scalar(0), scalar(1), scalar(2)) {
                        (Some(s), Some(l), Some(d)) if d != 0 => {
                            Some(((i128::from(l) - i128::from(s)) / i128::from(d)).max(0) as u64)
                        }
                        _ => None,
                    }
                }
                _ => value(k).map(|v| {
                    v.v.iter()
                        .try_fold(1u64, |a, &d| a.checked_mul(d.max(0) as u64))
                        .unwrap_or(u64::MAX)
                }),
            };
            let name = crate::describe::excerpt(&n.name);
            // ConstantOfShape's value fixes the element type (float32 by default); for the
            // others one byte per element is a lower bound.
            let esize = if n.op_type == "ConstantOfShape" {
                n.attribute
                    .iter()
                    .find_map(|a| a.t.as_ref())
                    .map_or(Some(4), |t| elem_bytes(t.data_type))
                    .unwrap_or(1)
            } else {
                1
            };
            match elems {
                Some(e) => {
                    check_memory(
                        &format!(
                            "ONNX model {}: node {name:?} ({}) makes a tensor of {e} elements from its constant inputs",
                            path.display(),
                            n.op_type
                        ),
                        e.checked_mul(esize),
                    )?;
                }
                None if n.input.get(k).is_some_and(|x| consts.contains(x.as_str())) => {
                    return Err(err(
                        path,
                        format!(
                            "node {name:?} ({}) takes its size from a constant expression that is not bounded before loading; export with constant folding (torch.onnx.export's default)",
                            n.op_type
                        ),
                    ));
                }
                None => {}
            }
        }
        if !n.input.is_empty()
            && n.input
                .iter()
                .all(|i| i.is_empty() || consts.contains(i.as_str()))
        {
            consts.extend(n.output.iter().map(String::as_str));
        }
    }
    Ok(())
}

/// The bytes of a fact's shape with every symbol at the value `values` gives it (`None` when a
/// size is not determined by them).
fn fact_bytes(fact: &tp::TypedFact, values: &tp::SymbolValues) -> Option<u64> {
    let size = fact.datum_type.size_of() as u64;
    fact.shape.iter().try_fold(size, |acc, d| {
        let n = d.maybe_eval_to_i64(values)?;
        acc.checked_mul(u64::try_from(n).ok()?).or(Some(u64::MAX))
    })
}

/// The most bytes `model`'s tensors need alive at once, walking it in evaluation order with
/// every symbol of its shapes at `symbol_value` (`None`: only sizes already fixed count) and
/// releasing a tensor after its last consumer; constants are held throughout. Returns the
/// bytes and the node at the peak.
pub(crate) fn peak_bytes(
    model: &tp::TypedModel,
    symbol_value: Option<i64>,
) -> tp::TractResult<(u64, String)> {
    let mut values = tp::SymbolValues::default();
    if let Some(v) = symbol_value {
        for node in model.nodes() {
            for o in &node.outputs {
                for d in o.fact.shape.iter() {
                    for s in d.symbols() {
                        values.set(&s, v);
                    }
                }
            }
        }
    }
    let order = model.eval_order()?;
    let mut uses: HashMap<tp::OutletId, usize> = HashMap::new();
    for &id in &order {
        for i in &model.node(id).inputs {
            *uses.entry(*i).or_default() += 1;
        }
    }
    let outputs: HashSet<tp::OutletId> = model.output_outlets()?.iter().copied().collect();
    let (mut live, mut peak, mut at) = (0u64, 0u64, String::new());
    for &id in &order {
        let node = model.node(id);
        for o in &node.outputs {
            live = live.saturating_add(fact_bytes(&o.fact, &values).unwrap_or(0));
        }
        if live > peak {
            peak = live;
            at = node.name.clone();
        }
        for i in &node.inputs {
            let left = uses.entry(*i).or_default();
            *left = left.saturating_sub(1);
            let producer = model.node(i.node);
            let is_const = producer
                .op_as::<tract_onnx::tract_core::ops::konst::Const>()
                .is_some();
            if *left == 0 && !is_const && !outputs.contains(i) {
                let b = fact_bytes(&producer.outputs[i.slot].fact, &values).unwrap_or(0);
                live = live.saturating_sub(b);
            }
        }
    }
    Ok((peak, at))
}

/// Refuses `model` when [`peak_bytes`] exceeds the memory limit; `what` says which graph (the
/// load, a plan for a batch) in the message.
pub(crate) fn check_facts(
    path: &Path,
    model: &tp::TypedModel,
    symbol_value: Option<i64>,
    what: &str,
) -> Result<()> {
    let (peak, at) = peak_bytes(model, symbol_value).map_err(|e| {
        err(
            path,
            format!("cannot order the graph: {}", super::tract_msg(&e)),
        )
    })?;
    check_memory(
        &format!(
            "ONNX model {}: {what}: the tensors its declared shapes imply (peak at node {:?})",
            path.display(),
            crate::describe::excerpt(&at)
        ),
        Some(peak),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_guarded_call_is_an_error_naming_the_model() {
        let e = guarded(
            Path::new("m.onnx"),
            "running the network",
            || -> Result<()> { panic!("index out of bounds") },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("m.onnx") && e.contains("index out of bounds"),
            "{e}"
        );
        assert!(e.contains("running the network"), "{e}");
        // The guard leaves later panics to the previous hook and calls that succeed alone.
        assert_eq!(guarded(Path::new("m.onnx"), "x", || Ok(3)).unwrap(), 3);
    }

    #[test]
    fn identity_chains_collapse_to_one_node_per_output() {
        let node = |i: &str, o: &str| pb::NodeProto {
            op_type: "Identity".into(),
            input: vec![i.into()],
            output: vec![o.into()],
            ..Default::default()
        };
        let mut g = pb::GraphProto {
            node: vec![node("x", "a"), node("a", "b"), node("b", "v")],
            output: vec![pb::ValueInfoProto {
                name: "v".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        collapse_identities(&mut g);
        assert_eq!(g.node.len(), 1);
        assert_eq!(g.node[0].input, vec!["x".to_string()]);
    }
}
