//! Small integer expressions of an ONNX graph evaluated from its constants, before tract loads
//! it: the shapes that `Expand`, `Tile`, `ConstantOfShape` and `Range` take are often computed
//! by a chain of `Shape`, `Concat`, `Gather`, `Equal`, `Where` nodes (PyTorch's export of
//! `expand(b, l, -1)` is one), and tract evaluates such chains while loading, before any shape
//! is checked. Knowing their values lets the memory bound see the size they ask for instead of
//! refusing every network that computes a shape.

use std::collections::HashMap;

use tract_onnx::pb;

/// The most elements a folded value may have: shapes and indices are short, and a bound keeps
/// the pass linear in the graph whatever a hostile file holds.
pub(crate) const MAX_ELEMS: usize = 64;

/// A small integer tensor: its dims and its values in row-major order (floats truncated, which
/// is what a size made from them means).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ints {
    /// The shape.
    pub dims: Vec<usize>,
    /// The values, `dims.iter().product()` of them.
    pub v: Vec<i64>,
}

impl Ints {
    fn new(dims: Vec<usize>, v: Vec<i64>) -> Option<Ints> {
        (v.len() <= MAX_ELEMS
            && dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(v.len()))
        .then_some(Ints { dims, v })
    }

    fn vector(v: Vec<i64>) -> Option<Ints> {
        Ints::new(vec![v.len()], v)
    }

    /// The first value (a scalar's).
    pub fn scalar(&self) -> Option<i64> {
        self.v.first().copied()
    }
}

/// The values of a small constant tensor (an initializer or a `Constant` node's value).
pub(crate) fn tensor_ints(t: &pb::TensorProto) -> Option<Ints> {
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    if n > MAX_ELEMS {
        return None;
    }
    let raw = |w: usize| -> Option<Vec<&[u8]>> {
        (t.raw_data.len() == n * w).then(|| t.raw_data.chunks_exact(w).collect())
    };
    let v: Vec<i64> = match t.data_type {
        7 if !t.raw_data.is_empty() => raw(8)?
            .iter()
            .map(|c| i64::from_le_bytes(<[u8; 8]>::try_from(*c).unwrap_or([0; 8])))
            .collect(),
        7 => t.int64_data.clone(),
        6 if !t.raw_data.is_empty() => raw(4)?
            .iter()
            .map(|c| {
                i64::from(i32::from_le_bytes(
                    <[u8; 4]>::try_from(*c).unwrap_or([0; 4]),
                ))
            })
            .collect(),
        6 => t.int32_data.iter().map(|&x| i64::from(x)).collect(),
        9 if !t.raw_data.is_empty() => raw(1)?.iter().map(|c| i64::from(c[0] != 0)).collect(),
        9 => t.int32_data.iter().map(|&x| i64::from(x != 0)).collect(),
        1 if !t.raw_data.is_empty() => raw(4)?
            .iter()
            .map(|c| f32::from_le_bytes(<[u8; 4]>::try_from(*c).unwrap_or([0; 4])) as i64)
            .collect(),
        1 => t.float_data.iter().map(|&x| x as i64).collect(),
        _ => return None,
    };
    Ints::new(dims, v)
}

fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// The value of a `Constant` node (`value`, `value_int` or `value_ints`).
pub(crate) fn constant_node(n: &pb::NodeProto) -> Option<Ints> {
    if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
        return tensor_ints(t);
    }
    if let Some(a) = attr(n, "value_int") {
        return Ints::new(vec![], vec![a.i]);
    }
    attr(n, "value_ints").and_then(|a| Ints::vector(a.ints.clone()))
}

/// `a op b` with numpy broadcasting of equal shapes or a one-element side.
fn binary(a: &Ints, b: &Ints, op: impl Fn(i64, i64) -> Option<i64>) -> Option<Ints> {
    let (dims, n) = if a.dims == b.dims || (b.v.len() == 1 && b.dims.len() <= a.dims.len()) {
        (a.dims.clone(), a.v.len())
    } else if a.v.len() == 1 && a.dims.len() <= b.dims.len() {
        (b.dims.clone(), b.v.len())
    } else {
        return None;
    };
    let at = |x: &Ints, i: usize| if x.v.len() == 1 { x.v[0] } else { x.v[i] };
    let v = (0..n)
        .map(|i| op(at(a, i), at(b, i)))
        .collect::<Option<Vec<_>>>()?;
    Ints::new(dims, v)
}

/// Normalises an axis against a rank (negative axes count from the end).
fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = i64::try_from(rank).ok()?;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// The axes of `Unsqueeze`/`Squeeze`: the attribute (opset < 13) or the second input.
fn axes_of(n: &pb::NodeProto, inputs: &[Option<&Ints>]) -> Option<Vec<i64>> {
    match attr(n, "axes") {
        Some(a) => Some(a.ints.clone()),
        None => inputs.get(1).copied().flatten().map(|x| x.v.clone()),
    }
}

/// Evaluates one node whose inputs are known (`None` for an input that is empty or unknown),
/// returning its first output; `None` when the op is not one of the integer ops folded here or
/// its result would be too large.
pub(crate) fn eval(
    n: &pb::NodeProto,
    inputs: &[Option<&Ints>],
    shape_of: Option<&[usize]>,
) -> Option<Ints> {
    let x = |i: usize| inputs.get(i).copied().flatten();
    match n.op_type.as_str() {
        "Constant" => constant_node(n),
        "Identity" | "Cast" => x(0).cloned(),
        "Shape" => {
            let dims = shape_of?;
            let r = dims.len();
            let clamp = |v: i64| -> usize {
                let v = if v < 0 { v + r as i64 } else { v };
                v.clamp(0, r as i64) as usize
            };
            let start = attr(n, "start").map_or(0, |a| clamp(a.i));
            let end = attr(n, "end").map_or(r, |a| clamp(a.i));
            let v = dims
                .get(start..end.max(start))?
                .iter()
                .map(|&d| i64::try_from(d).ok())
                .collect::<Option<Vec<_>>>()?;
            Ints::vector(v)
        }
        "Size" => {
            let n = shape_of?
                .iter()
                .try_fold(1i64, |a, &d| a.checked_mul(i64::try_from(d).ok()?))?;
            Ints::new(vec![], vec![n])
        }
        "Add" => binary(x(0)?, x(1)?, i64::checked_add),
        "Sub" => binary(x(0)?, x(1)?, i64::checked_sub),
        "Mul" => binary(x(0)?, x(1)?, i64::checked_mul),
        "Div" => binary(x(0)?, x(1)?, |a, b| a.checked_div(b)),
        "Max" => binary(x(0)?, x(1)?, |a, b| Some(a.max(b))),
        "Min" => binary(x(0)?, x(1)?, |a, b| Some(a.min(b))),
        "Equal" => binary(x(0)?, x(1)?, |a, b| Some(i64::from(a == b))),
        "Less" => binary(x(0)?, x(1)?, |a, b| Some(i64::from(a < b))),
        "Greater" => binary(x(0)?, x(1)?, |a, b| Some(i64::from(a > b))),
        "Neg" => Ints::new(
            x(0)?.dims.clone(),
            x(0)?
                .v
                .iter()
                .map(|v| v.checked_neg())
                .collect::<Option<_>>()?,
        ),
        "Abs" => Ints::new(
            x(0)?.dims.clone(),
            x(0)?
                .v
                .iter()
                .map(|v| v.checked_abs())
                .collect::<Option<_>>()?,
        ),
        "Not" => Ints::new(
            x(0)?.dims.clone(),
            x(0)?.v.iter().map(|&v| i64::from(v == 0)).collect(),
        ),
        "Where" => {
            let (c, a, b) = (x(0)?, x(1)?, x(2)?);
            let picked = binary(c, a, |c, a| Some(if c != 0 { a } else { i64::MIN }))?;
            binary(&picked, b, |p, b| Some(if p == i64::MIN { b } else { p }))
        }
        "Concat" => {
            // One-dimensional values (shapes) only: that is what size expressions concatenate.
            let mut v = Vec::new();
            for i in 0..n.input.len() {
                let p = x(i)?;
                if p.dims.len() > 1 {
                    return None;
                }
                v.extend_from_slice(&p.v);
            }
            Ints::vector(v)
        }
        "Unsqueeze" => {
            let a = x(0)?;
            let axes = axes_of(n, inputs)?;
            let rank = a.dims.len() + axes.len();
            let mut axes = axes
                .iter()
                .map(|&ax| axis(ax, rank))
                .collect::<Option<Vec<_>>>()?;
            axes.sort_unstable();
            let mut dims = a.dims.clone();
            for ax in axes {
                if ax > dims.len() {
                    return None;
                }
                dims.insert(ax, 1);
            }
            Ints::new(dims, a.v.clone())
        }
        "Squeeze" => {
            let a = x(0)?;
            let dims = match axes_of(n, inputs) {
                Some(axes) => {
                    let axes = axes
                        .iter()
                        .map(|&ax| axis(ax, a.dims.len()))
                        .collect::<Option<Vec<_>>>()?;
                    a.dims
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !axes.contains(i))
                        .map(|(_, &d)| d)
                        .collect()
                }
                None => a.dims.iter().copied().filter(|&d| d != 1).collect(),
            };
            Ints::new(dims, a.v.clone())
        }
        "Reshape" => {
            let (a, s) = (x(0)?, x(1)?);
            let known: usize =
                s.v.iter()
                    .enumerate()
                    .map(|(i, &d)| match d {
                        0 => a.dims.get(i).copied(),
                        -1 => Some(1),
                        d => usize::try_from(d).ok(),
                    })
                    .try_fold(1usize, |acc, d| acc.checked_mul(d?))?;
            let dims =
                s.v.iter()
                    .enumerate()
                    .map(|(i, &d)| match d {
                        0 => a.dims.get(i).copied(),
                        -1 => (known != 0).then(|| a.v.len() / known),
                        d => usize::try_from(d).ok(),
                    })
                    .collect::<Option<Vec<_>>>()?;
            Ints::new(dims, a.v.clone())
        }
        "Gather" => {
            let (a, idx) = (x(0)?, x(1)?);
            // Gathers along axis 0 of a vector: picking entries of a shape.
            if a.dims.len() != 1 || attr(n, "axis").is_some_and(|ax| ax.i != 0 && ax.i != -1) {
                return None;
            }
            let v = idx
                .v
                .iter()
                .map(|&i| axis(i, a.v.len()).map(|i| a.v[i]))
                .collect::<Option<Vec<_>>>()?;
            Ints::new(idx.dims.clone(), v)
        }
        "Slice" => {
            let a = x(0)?;
            if a.dims.len() != 1 {
                return None;
            }
            let len = a.v.len() as i64;
            let (start, end) = (x(1)?.scalar()?, x(2)?.scalar()?);
            if x(3).is_some_and(|ax| ax.scalar().and_then(|v| axis(v, 1)) != Some(0)) {
                return None;
            }
            let step = x(4).map_or(Some(1), Ints::scalar)?;
            if step != 1 {
                return None;
            }
            let clamp =
                |v: i64| -> usize { (if v < 0 { v + len } else { v }).clamp(0, len) as usize };
            let (s, e) = (clamp(start), clamp(end));
            Ints::vector(a.v.get(s..e.max(s))?.to_vec())
        }
        "ConstantOfShape" => {
            let shape = x(0)?;
            let dims = shape
                .v
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<Vec<_>>>()?;
            let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
            if count > MAX_ELEMS {
                return None;
            }
            let fill = match attr(n, "value").and_then(|a| a.t.as_ref()) {
                Some(t) => tensor_ints(t)?.scalar()?,
                None => 0,
            };
            Ints::new(dims, vec![fill; count])
        }
        "Range" => {
            let (s, l, d) = (x(0)?.scalar()?, x(1)?.scalar()?, x(2)?.scalar()?);
            if d == 0 {
                return None;
            }
            let count = ((i128::from(l) - i128::from(s)) / i128::from(d)).max(0);
            if count > MAX_ELEMS as i128 {
                return None;
            }
            Ints::vector((0..count as i64).map(|i| s + i * d).collect())
        }
        _ => None,
    }
}

/// The folded values of a graph: every initializer and `Constant` small enough, and every node
/// output computed from them alone by the ops [`eval`] knows, in one pass in node order.
/// `input_dims` gives the static shapes of graph inputs (for `Shape` of an input).
pub(crate) fn fold_graph<'a>(
    graph: &'a pb::GraphProto,
    input_dims: &HashMap<&'a str, Vec<usize>>,
) -> HashMap<&'a str, Ints> {
    let inputs: std::collections::HashSet<&str> =
        graph.input.iter().map(|i| i.name.as_str()).collect();
    let mut vals: HashMap<&str, Ints> = HashMap::new();
    let mut shapes: HashMap<&str, Vec<usize>> = input_dims.clone();
    for t in &graph.initializer {
        // An initializer that is also a graph input can be fed another value: not a constant.
        if inputs.contains(t.name.as_str()) {
            continue;
        }
        if let Some(dims) = t.dims.iter().map(|&d| usize::try_from(d).ok()).collect() {
            shapes.insert(t.name.as_str(), dims);
        }
        if let Some(v) = tensor_ints(t) {
            vals.insert(t.name.as_str(), v);
        }
    }
    for n in &graph.node {
        let ins: Vec<Option<&Ints>> = n.input.iter().map(|i| vals.get(i.as_str())).collect();
        // Every folded value's dims are in `shapes` too.
        let shape_of = n
            .input
            .first()
            .and_then(|i| shapes.get(i.as_str()).map(Vec::as_slice));
        // Shape and Size need only the input's shape; every other op needs every input's
        // value (an absent optional input is empty and stays `None`).
        let ready = matches!(n.op_type.as_str(), "Shape" | "Size" | "Constant")
            || n.input
                .iter()
                .zip(&ins)
                .all(|(name, v)| name.is_empty() || v.is_some());
        if !ready {
            continue;
        }
        if let (Some(out), Some(v)) = (n.output.first(), eval(n, &ins, shape_of)) {
            shapes.insert(out.as_str(), v.dims.clone());
            vals.insert(out.as_str(), v);
        }
    }
    vals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn int64s(name: &str, dims: &[i64], v: &[i64]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 7,
            int64_data: v.to_vec(),
            ..Default::default()
        }
    }

    /// PyTorch's export of `ft[:, None, :].expand(b, l, -1)`: the `-1` replaced by 1 through
    /// `Equal`, `ConstantOfShape` and `Where` before `Expand` takes the shape.
    #[test]
    fn an_expand_with_minus_one_folds_to_its_shape() {
        let mut cos = node("ConstantOfShape", &["three"], "ones");
        cos.attribute.push(pb::AttributeProto {
            name: "value".into(),
            t: Some(int64s("", &[1], &[1])),
            ..Default::default()
        });
        let graph = pb::GraphProto {
            initializer: vec![
                int64s("shape", &[3], &[6, 64, -1]),
                int64s("minus1", &[], &[-1]),
                int64s("three", &[1], &[3]),
            ],
            node: vec![
                cos,
                node("Equal", &["shape", "minus1"], "eq"),
                node("Where", &["eq", "ones", "shape"], "size"),
                node("Shape", &["x"], "xs"),
                node("Gather", &["xs", "minus1"], "last"),
                node("Unsqueeze", &["last", "zero"], "last1"),
            ],
            ..Default::default()
        };
        let dims = HashMap::from([("x", vec![6usize, 64, 2])]);
        let vals = fold_graph(&graph, &dims);
        assert_eq!(vals["size"].v, vec![6, 64, 1]);
        assert_eq!(
            vals["last"],
            Ints {
                dims: vec![],
                v: vec![2]
            }
        );
        // Unsqueeze without its axes input is not folded (the input named is not known).
        assert!(!vals.contains_key("last1"));
    }

    #[test]
    fn folding_stops_at_large_values_and_unknown_ops() {
        let graph = pb::GraphProto {
            initializer: vec![int64s("big", &[1], &[1_000_000]), int64s("two", &[1], &[2])],
            node: vec![
                node("ConstantOfShape", &["big"], "huge"),
                node("Range", &["two", "big", "two"], "r"),
                node("Mul", &["two", "two"], "four"),
                node("MatMul", &["two", "two"], "mm"),
            ],
            ..Default::default()
        };
        let vals = fold_graph(&graph, &HashMap::new());
        assert!(!vals.contains_key("huge") && !vals.contains_key("r") && !vals.contains_key("mm"));
        assert_eq!(vals["four"].v, vec![4]);
    }
}
