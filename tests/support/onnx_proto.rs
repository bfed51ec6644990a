//! ONNX files built byte by byte for the hostile-input tests: a minimal protobuf writer for
//! the few messages a velocity network needs (model, graph, node, tensor, value info), so a
//! test makes its own 300-byte model without Python or a fixture.
#![allow(dead_code)]

/// A protobuf message under construction.
#[derive(Default, Clone)]
pub struct Msg(pub Vec<u8>);

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

impl Msg {
    /// A varint field.
    pub fn int(mut self, field: u32, v: i64) -> Self {
        varint(&mut self.0, u64::from(field) << 3);
        varint(&mut self.0, v as u64);
        self
    }
    /// A length-delimited field (bytes, a string, a sub-message).
    pub fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        varint(&mut self.0, (u64::from(field) << 3) | 2);
        varint(&mut self.0, b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }
    pub fn msg(self, field: u32, m: Msg) -> Self {
        self.bytes(field, &m.0)
    }
}

/// ONNX element types.
pub const FLOAT: i64 = 1;
pub const INT64: i64 = 7;
pub const STRING: i64 = 8;

/// A dimension: a fixed size or a symbol.
pub enum D {
    N(i64),
    S(&'static str),
}

/// `ValueInfoProto` of a tensor input or output.
pub fn value_info(name: &str, elem: i64, dims: &[D]) -> Msg {
    let mut shape = Msg::default();
    for d in dims {
        shape = shape.msg(
            1,
            match d {
                D::N(n) => Msg::default().int(1, *n),
                D::S(s) => Msg::default().str(2, s),
            },
        );
    }
    let tensor = Msg::default().int(1, elem).msg(2, shape);
    Msg::default()
        .str(1, name)
        .msg(2, Msg::default().msg(1, tensor))
}

/// `TensorProto` of int64 values.
pub fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> Msg {
    let mut t = Msg::default();
    for d in dims {
        t = t.int(1, *d);
    }
    t = t.int(2, INT64);
    for v in values {
        t = t.int(7, *v);
    }
    t.str(8, name)
}

/// `TensorProto` of float32 values as raw data.
pub fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> Msg {
    let mut t = Msg::default();
    for d in dims {
        t = t.int(1, *d);
    }
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.int(2, FLOAT).str(8, name).bytes(9, &raw)
}

/// `TensorProto` of float32 values stored in an external file `location` (relative to the
/// model's folder) at `offset`, with `length` bytes when given.
pub fn external_tensor(name: &str, dims: &[i64], location: &str, length: Option<u64>) -> Msg {
    let mut t = Msg::default();
    for d in dims {
        t = t.int(1, *d);
    }
    t = t.int(2, FLOAT).str(8, name);
    t = t.msg(13, Msg::default().str(1, "location").str(2, location));
    if let Some(l) = length {
        t = t.msg(13, Msg::default().str(1, "length").str(2, &l.to_string()));
    }
    t.int(14, 1)
}

/// `NodeProto`.
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> Msg {
    let mut n = Msg::default();
    for i in inputs {
        n = n.str(1, i);
    }
    for o in outputs {
        n = n.str(2, o);
    }
    n.str(3, name).str(4, op)
}

/// A graph's parts.
#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<Msg>,
    pub initializers: Vec<Msg>,
    pub inputs: Vec<Msg>,
    pub outputs: Vec<Msg>,
}

impl Graph {
    /// The standard velocity-network inputs: `x [batch, 2]` and `t [batch]`, float32, and the
    /// output `v [batch, 2]`.
    pub fn velocity() -> Self {
        Graph {
            inputs: vec![
                value_info("x", FLOAT, &[D::S("batch"), D::N(2)]),
                value_info("t", FLOAT, &[D::S("batch")]),
            ],
            outputs: vec![value_info("v", FLOAT, &[D::S("batch"), D::N(2)])],
            ..Graph::default()
        }
    }

    /// The file's bytes: IR version 8, opset 17.
    pub fn bytes(self) -> Vec<u8> {
        self.bytes_with_metadata(&[])
    }

    /// The file's bytes with `metadata_props` entries (key, value).
    pub fn bytes_with_metadata(self, metadata: &[(&str, &str)]) -> Vec<u8> {
        let mut g = Msg::default();
        for n in self.nodes {
            g = g.msg(1, n);
        }
        g = g.str(2, "g");
        for i in self.initializers {
            g = g.msg(5, i);
        }
        for i in self.inputs {
            g = g.msg(11, i);
        }
        for o in self.outputs {
            g = g.msg(12, o);
        }
        let mut m = Msg::default()
            .int(1, 8)
            .str(2, "onnx-proto-test")
            .msg(7, g)
            .msg(8, Msg::default().str(1, "").int(2, 17));
        for (k, v) in metadata {
            m = m.msg(14, Msg::default().str(1, k).str(2, v));
        }
        m.0
    }
}

/// `v = x + t[:, None] * 0`-free minimal velocity: `v = Identity(x)` (t unused but declared).
pub fn identity_velocity() -> Vec<u8> {
    let mut g = Graph::velocity();
    g.nodes.push(node("Identity", "id", &["x"], &["v"]));
    g.bytes()
}

/// [`identity_velocity`] with one metadata entry.
pub fn identity_with_metadata(key: &str, value: &str) -> Vec<u8> {
    let mut g = Graph::velocity();
    g.nodes.push(node("Identity", "id", &["x"], &["v"]));
    g.bytes_with_metadata(&[(key, value)])
}

/// The velocity graph with one size-making node `op` ("grow", output `v`) whose size input is
/// the constant `size` (ConstantOfShape takes only the size; Expand and Tile take `x` too).
pub fn size_op(op: &str, size: &[i64]) -> Vec<u8> {
    let mut g = Graph::velocity();
    g.initializers
        .push(int64_tensor("size", &[size.len() as i64], size));
    let inputs: Vec<&str> = if op == "ConstantOfShape" {
        vec!["size"]
    } else {
        vec!["x", "size"]
    };
    g.nodes.push(node(op, "grow", &inputs, &["v"]));
    g.bytes()
}

/// The velocity graph whose `Expand` ("grow", output `v`) takes a size computed from
/// constants: `half` times 2 by `via` ("Mul", folded before loading, or an op the fold does
/// not know), then `-1` entries replaced by 1 through `Equal` and `Where` as PyTorch exports
/// `expand(b, l, -1)`.
pub fn computed_expand(half: &[i64], via: &str) -> Vec<u8> {
    let mut g = Graph::velocity();
    let n = half.len() as i64;
    g.initializers.push(int64_tensor("half", &[n], half));
    g.initializers.push(int64_tensor("two", &[1], &[2]));
    g.initializers.push(int64_tensor("minus1", &[], &[-1]));
    g.initializers
        .push(int64_tensor("ones", &[n], &vec![1; n as usize]));
    g.nodes
        .push(node(via, "double", &["half", "two"], &["doubled"]));
    g.nodes
        .push(node("Equal", "eq", &["doubled", "minus1"], &["is_free"]));
    g.nodes.push(node(
        "Where",
        "pick",
        &["is_free", "ones", "doubled"],
        &["size"],
    ));
    g.nodes.push(node("Expand", "grow", &["x", "size"], &["v"]));
    g.bytes()
}
