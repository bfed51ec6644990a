//! Property tests of the file readers (issue 11): random and mutated bytes fed to the `.npy`,
//! CSV and velocity-mlp readers give an error or a consistent value, never a panic, and no
//! single allocation larger than a small multiple of the input's size.
//!
//! A counting allocator records, per thread, the largest allocation requested while a reader
//! runs; the bound asserted is 16 × the input's bytes + 64 KiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use proptest::prelude::*;

use flow_matching::io::decode_npy;
use flow_matching::model::{
    read_bytes, read_transformer_bytes, TransformerConfig, WaypointTransformer,
};
use flow_matching::{VelocityMlp, VelocityMlpConfig, XDims};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()))
}

fn bound(input: usize) -> usize {
    16 * input + (64 << 10)
}

fn npy_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut f = b"\x93NUMPY\x01\x00".to_vec();
    f.extend_from_slice(&(header.len() as u16).to_le_bytes());
    f.extend_from_slice(header.as_bytes());
    f.extend_from_slice(data);
    f
}

fn valid_npy(rows: usize, cols: usize) -> Vec<u8> {
    let h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}\n");
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    npy_file(&h, &data)
}

/// Checks a `.npy` decode: an error, or values that match the declared shape and fit the input.
fn check_npy(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (out, largest) = largest_alloc(|| decode_npy(bytes));
    prop_assert!(
        largest <= bound(bytes.len()),
        "allocated {largest} for {} bytes",
        bytes.len()
    );
    if let Ok((shape, values)) = out {
        prop_assert_eq!(shape.iter().product::<usize>(), values.len());
        prop_assert!(values.len() <= bytes.len());
    }
    Ok(())
}

fn tiny_model(num_classes: usize) -> VelocityMlp {
    let mut c = VelocityMlpConfig::new(XDims::new([2]).unwrap());
    (c.hidden, c.depth, c.num_freqs, c.cond_dim, c.num_classes) = (4, 2, 3, 2, num_classes);
    let vm = candle_nn::VarMap::new();
    VelocityMlp::init(c, &vm, &Device::Cpu, 0).unwrap()
}

/// The bytes of a model file with some metadata entries replaced.
fn model_bytes(model: &VelocityMlp, meta_overrides: &[(&str, String)]) -> Vec<u8> {
    let mut meta = model.config().metadata();
    for (k, v) in meta_overrides {
        meta.insert(k.to_string(), v.clone());
    }
    let tensors: Vec<(String, Tensor)> = model.tensors();
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap()
}

fn check_model(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (out, largest) =
        largest_alloc(|| read_bytes(bytes, Path::new("m.safetensors"), &Device::Cpu));
    prop_assert!(
        largest <= bound(bytes.len()),
        "allocated {largest} for {} bytes",
        bytes.len()
    );
    if let Ok((config, tensors)) = out {
        let stored: usize = tensors.values().map(|t| t.elem_count() * 4).sum();
        prop_assert!(stored <= bytes.len());
        // A config the reader accepts builds a model from the same tensors.
        prop_assert!(VelocityMlp::from_tensors(config, &tensors, Path::new("m")).is_ok());
    }
    Ok(())
}

fn check_csv(bytes: &[u8]) -> Result<Option<(usize, usize)>, TestCaseError> {
    let (out, largest) =
        largest_alloc(|| flow_matching::data::parse_csv(bytes, Path::new("d.csv"), None));
    prop_assert!(
        largest <= bound(bytes.len()),
        "allocated {largest} for {} bytes",
        bytes.len()
    );
    Ok(out.ok().map(|d| (d.len(), d.x_dims()[0])))
}

/// A byte mutation: overwrite, insert, delete or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        let n = bytes.len().max(1);
        match *m {
            Mutation::Set(i, b) if !bytes.is_empty() => bytes[i % n] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
            _ => {}
        }
    }
}

/// A tiny waypoint transformer (`[3, 2]`, width 4, 2 heads, depth 2), conditioned or not.
fn tiny_transformer(conditioned: bool) -> WaypointTransformer {
    let mut c = TransformerConfig::new(XDims::new([3, 2]).unwrap());
    (c.width, c.depth, c.heads, c.mlp_hidden, c.num_freqs) = (4, 2, 2, 8, 2);
    if conditioned {
        c.cond_dims = Some(XDims::new([5]).unwrap());
    }
    WaypointTransformer::init(c, &candle_nn::VarMap::new(), &Device::Cpu, 0).unwrap()
}

/// The bytes of a transformer file with some metadata entries replaced.
fn transformer_bytes(model: &WaypointTransformer, meta_overrides: &[(&str, String)]) -> Vec<u8> {
    let mut meta = model.config().metadata();
    for (k, v) in meta_overrides {
        meta.insert(k.to_string(), v.clone());
    }
    let tensors = model.tensors();
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap()
}

fn check_transformer(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (out, largest) =
        largest_alloc(|| read_transformer_bytes(bytes, Path::new("t.safetensors"), &Device::Cpu));
    prop_assert!(
        largest <= bound(bytes.len()),
        "allocated {largest} for {} bytes",
        bytes.len()
    );
    if let Ok((config, tensors)) = out {
        // A config the reader accepts builds a model from the same tensors.
        prop_assert!(WaypointTransformer::from_tensors(config, &tensors, Path::new("t")).is_ok());
    }
    Ok(())
}

/// Sizes that break naive arithmetic: huge, wrapping, zero, and ordinary.
fn size_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|v| v.to_string()),
        Just("9223372036854775809".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1000000000000".to_string()),
        (0u64..8).prop_map(|v| v.to_string()),
        Just("-1".to_string()),
        Just("".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn npy_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_npy(&bytes)?;
        let mut with_magic = b"\x93NUMPY".to_vec();
        with_magic.extend_from_slice(&bytes);
        check_npy(&with_magic)?;
    }

    #[test]
    fn npy_mutated(rows in 1usize..6, cols in 1usize..4, muts in proptest::collection::vec(mutation(), 1..6)) {
        let mut f = valid_npy(rows, cols);
        apply(&mut f, &muts);
        check_npy(&f)?;
    }

    #[test]
    fn npy_lying_shapes(dims in proptest::collection::vec(size_text(), 0..4), descr in prop_oneof![Just("<f4"), Just("<f8"), Just("|u1"), Just(">i8"), Just("|b1"), Just("<f2"), Just("|O")], data_len in 0usize..64) {
        let h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
        check_npy(&npy_file(&h, &vec![1u8; data_len]))?;
    }

    #[test]
    fn csv_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_csv(&bytes)?;
    }

    #[test]
    fn csv_text_like(text in "[0-9eE.,+\\- \"\r\n\u{feff}a-c]{0,200}") {
        check_csv(text.as_bytes())?;
    }

    #[test]
    fn csv_formats_agree(rows in proptest::collection::vec(proptest::collection::vec(-1000i32..1000, 3), 1..20), bom in any::<bool>(), crlf in any::<bool>(), quote in any::<bool>()) {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut text = String::new();
        if bom { text.push('\u{feff}'); }
        for r in &rows {
            let fields: Vec<String> = r.iter().map(|v| if quote { format!("\"{v}\"") } else { v.to_string() }).collect();
            text.push_str(&fields.join(","));
            text.push_str(nl);
        }
        let d = flow_matching::data::parse_csv(text.as_bytes(), Path::new("d.csv"), None).unwrap();
        let back = d.x.to_vec2::<f32>().unwrap();
        let want: Vec<Vec<f32>> = rows.iter().map(|r| r.iter().map(|&v| v as f32).collect()).collect();
        prop_assert_eq!(back, want, "a BOM, CRLF or quotes must not change or drop a row");
    }

    #[test]
    fn model_mutated(muts in proptest::collection::vec(mutation(), 1..6), conditional in any::<bool>()) {
        let model = tiny_model(if conditional { 3 } else { 0 });
        let mut bytes = model_bytes(&model, &[]);
        apply(&mut bytes, &muts);
        check_model(&bytes)?;
    }

    #[test]
    fn model_lying_metadata(key in prop_oneof![Just("depth"), Just("hidden"), Just("num_classes"), Just("x_dims")], value in size_text(), second in size_text()) {
        let model = tiny_model(3);
        let value = if key == "x_dims" { format!("{value},{second}") } else { value };
        let bytes = model_bytes(&model, &[(key, value)]);
        check_model(&bytes)?;
    }

    #[test]
    fn transformer_mutated(muts in proptest::collection::vec(mutation(), 1..6), conditioned in any::<bool>()) {
        let mut bytes = transformer_bytes(&tiny_transformer(conditioned), &[]);
        apply(&mut bytes, &muts);
        check_transformer(&bytes)?;
    }

    #[test]
    fn transformer_lying_metadata(key in prop_oneof![Just("depth"), Just("width"), Just("heads"), Just("mlp_hidden"), Just("x_dims"), Just("cond_dims")], value in size_text(), second in size_text()) {
        let value = if key.ends_with("dims") { format!("{value},{second}") } else { value };
        let bytes = transformer_bytes(&tiny_transformer(true), &[(key, value)]);
        check_transformer(&bytes)?;
    }

    #[test]
    fn model_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_model(&bytes)?;
        // A plausible header length in front of the noise.
        let mut framed = (bytes.len() as u64).to_le_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        check_model(&framed)?;
    }
}

#[test]
fn issue_examples_are_errors_not_allocations() {
    let model = tiny_model(0);
    for (key, value, expect) in [
        ("depth", "1000000000000", "depth"),
        ("x_dims", "9223372036854775809,2", "overflows"),
        ("hidden", "18446744073709551615", "hidden"),
    ] {
        let bytes = model_bytes(&model, &[(key, value.to_string())]);
        let (out, largest) =
            largest_alloc(|| read_bytes(&bytes, Path::new("m.safetensors"), &Device::Cpu));
        let e = out.unwrap_err().to_string();
        assert!(e.contains(expect), "{key} = {value}: {e}");
        assert!(largest <= bound(bytes.len()));
    }
    let t = tiny_transformer(false);
    for (key, value, expect) in [
        ("depth", "1000000000000", "depth = 1000000000000"),
        (
            "width",
            "18446744073709551615",
            "width = 18446744073709551615",
        ),
        ("x_dims", "1000000000,2", "more than the"),
        ("mlp_hidden", "9", "blocks.0.mlp.0.weight"),
    ] {
        let bytes = transformer_bytes(&t, &[(key, value.to_string())]);
        let (out, largest) = largest_alloc(|| {
            read_transformer_bytes(&bytes, Path::new("t.safetensors"), &Device::Cpu)
        });
        let e = out.unwrap_err().to_string();
        assert!(e.contains(expect), "{key} = {value}: {e}");
        assert!(largest <= bound(bytes.len()), "{key}: {largest}");
    }
    let rows = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 2), }";
    assert!(decode_npy(&npy_file(rows, &[0; 8])).is_err());
    let wraps = "{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775808, 2), }";
    assert!(decode_npy(&npy_file(wraps, &[]))
        .unwrap_err()
        .contains("overflows"));
}

#[test]
fn bom_on_headerless_csv_keeps_first_row() {
    let d = flow_matching::data::parse_csv(b"\xEF\xBB\xBF1,2\n3,4\n", Path::new("d.csv"), None)
        .unwrap();
    assert_eq!(d.len(), 2);
    let d = flow_matching::data::parse_csv(b"\xEF\xBB\xBFx,y\r\n1,2\r\n", Path::new("d.csv"), None)
        .unwrap();
    assert_eq!(d.len(), 1, "a header after the BOM is still a header");
}

#[test]
fn non_finite_weights_are_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let model = tiny_model(0);
    model.save(&p).unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut map: HashMap<String, Tensor> = model.tensors().into_iter().collect();
    let w = map["net.0.weight"].clone();
    map.insert("net.0.weight".into(), (w * f64::NAN).unwrap());
    let bad = VelocityMlp::from_tensors(model.config().clone(), &map, Path::new("x")).unwrap();
    let e = bad.save(&p).unwrap_err().to_string();
    assert!(
        e.contains("net.0.weight") && e.contains("non-finite"),
        "{e}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn huge_float32_grids_are_refused_before_building() {
    use flow_matching::Schedule;
    let e = Schedule::Uniform
        .grid(1_000_000_000, candle_core::DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 16777216"), "{e}");
    assert!(Schedule::Uniform
        .grid(usize::MAX, candle_core::DType::F64)
        .is_err());
}
