//! The `waypoint-transformer` velocity model of docs/waypoint-transformer.md: one token per
//! waypoint of `x` `[B, L, C]`, embedded from its values and `t` with log-spaced Fourier
//! features, pre-LN self-attention blocks modulated by adaptive layer norm (AdaLN-zero) from
//! the time and the (optional, continuous) condition, stored as safetensors that the PyTorch
//! reference (python/waypoint_transformer.py) reads and writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::diffusion::XDims;
use crate::error::{Error, Result};
use crate::io::atomic_write;
use crate::model::cond::{flat_features, CondNorm, Condition};
use crate::train::ModelConfig;

/// `2 pi` rounded to float32 first, as the reference computes `((2*pi) * v) * f`.
const TWO_PI_F32: f32 = 2.0 * std::f32::consts::PI;
/// The layer norms' epsilon.
pub(crate) const LN_EPS: f64 = 1e-6;

/// The file's `format` metadata.
pub const TRANSFORMER_FORMAT: &str = "waypoint-transformer";

/// The hyper-parameters of a waypoint transformer (the file's metadata plus F).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// The sample shape `[L, C]`: L waypoint tokens of C values.
    pub x_dims: XDims,
    /// Token width W (a multiple of `heads`).
    pub width: usize,
    /// Number of attention blocks (at least 1).
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub mlp_hidden: usize,
    /// Fourier frequencies per value (`logspace(0, 2, F)`).
    pub num_freqs: usize,
    /// The shape of one row's continuous condition (`None`: unconditional).
    pub cond_dims: Option<XDims>,
    /// The condition's fixed standardisation (`None`: mean 0, std 1).
    pub cond_norm: Option<CondNorm>,
}

impl TransformerConfig {
    /// Width 64, 3 blocks of 4 heads, MLP 128, 10 frequencies (the seed's 20 features per
    /// value), unconditional.
    pub fn new(x_dims: XDims) -> Self {
        TransformerConfig {
            x_dims,
            width: 64,
            depth: 3,
            heads: 4,
            mlp_hidden: 128,
            num_freqs: 10,
            cond_dims: None,
            cond_norm: None,
        }
    }

    /// Checks every size: `x_dims` of rank 2, widths at least 1, `width` divisible by `heads`.
    pub fn validate(&self) -> Result<()> {
        if self.x_dims.dims().len() != 2 {
            return Err(Error::invalid(
                "x_dims for the waypoint transformer",
                self.x_dims.to_string(),
                "[L, C]: L waypoint tokens of C values (use the velocity-mlp for other shapes)",
            ));
        }
        for (name, v) in [
            ("width", self.width),
            ("depth", self.depth),
            ("heads", self.heads),
            ("mlp hidden width", self.mlp_hidden),
            ("number of frequencies", self.num_freqs),
        ] {
            if v == 0 {
                return Err(Error::invalid(name, 0, "at least 1"));
            }
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                "width",
                self.width,
                format!("a multiple of the number of heads ({})", self.heads),
            ));
        }
        if let Some(n) = &self.cond_norm {
            let c = self.cond_features();
            if n.mean.len() != c || n.std.len() != c {
                return Err(Error::invalid(
                    "condition normalisation",
                    format!("{} means and {} stds", n.mean.len(), n.std.len()),
                    format!("one per flattened condition feature ({c})"),
                ));
            }
        }
        Ok(())
    }

    /// Tokens L.
    pub fn len(&self) -> usize {
        self.x_dims.dims()[0]
    }

    /// Whether the config has no tokens (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per token C.
    pub fn channels(&self) -> usize {
        self.x_dims.dims().get(1).copied().unwrap_or(1)
    }

    /// Features per value, `1 + 2F` (the value, then its sines and cosines).
    pub fn per_value(&self) -> usize {
        1 + 2 * self.num_freqs
    }

    /// The flattened width of the continuous condition (0 without one).
    pub fn cond_features(&self) -> usize {
        self.cond_dims.as_ref().map_or(0, XDims::numel)
    }

    /// Every tensor key with its expected shape, in file order.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (w, p, c, l) = (self.width, self.per_value(), self.channels(), self.len());
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("freqs".into(), vec![self.num_freqs]),
            ("value_freqs".into(), vec![self.num_freqs]),
            ("token_embed.0.weight".into(), vec![w, (c + 1) * p]),
            ("token_embed.0.bias".into(), vec![w]),
            ("token_embed.2.weight".into(), vec![w, w]),
            ("token_embed.2.bias".into(), vec![w]),
            ("pos_embed".into(), vec![l, w]),
            ("time_embed.0.weight".into(), vec![w, p]),
            ("time_embed.0.bias".into(), vec![w]),
            ("time_embed.2.weight".into(), vec![w, w]),
            ("time_embed.2.bias".into(), vec![w]),
        ];
        if self.cond_dims.is_some() {
            let cf = self.cond_features();
            v.extend([
                ("cond_norm.mean".into(), vec![cf]),
                ("cond_norm.std".into(), vec![cf]),
                ("cond_embed.0.weight".into(), vec![w, cf]),
                ("cond_embed.0.bias".into(), vec![w]),
                ("cond_embed.2.weight".into(), vec![w, w]),
                ("cond_embed.2.bias".into(), vec![w]),
                ("cond_null".into(), vec![w]),
            ]);
        }
        for i in 0..self.depth {
            let b = format!("blocks.{i}");
            v.extend([
                (format!("{b}.ada.weight"), vec![6 * w, w]),
                (format!("{b}.ada.bias"), vec![6 * w]),
                (format!("{b}.qkv.weight"), vec![3 * w, w]),
                (format!("{b}.qkv.bias"), vec![3 * w]),
                (format!("{b}.proj.weight"), vec![w, w]),
                (format!("{b}.proj.bias"), vec![w]),
                (format!("{b}.mlp.0.weight"), vec![self.mlp_hidden, w]),
                (format!("{b}.mlp.0.bias"), vec![self.mlp_hidden]),
                (format!("{b}.mlp.2.weight"), vec![w, self.mlp_hidden]),
                (format!("{b}.mlp.2.bias"), vec![w]),
            ]);
        }
        v.extend([
            ("final_ada.weight".into(), vec![2 * w, w]),
            ("final_ada.bias".into(), vec![2 * w]),
            ("final_out.weight".into(), vec![c, w]),
            ("final_out.bias".into(), vec![c]),
        ]);
        v
    }

    /// Whether a key holds a fixed tensor (frequencies, condition normalisation).
    pub fn is_fixed(key: &str) -> bool {
        matches!(
            key,
            "freqs" | "value_freqs" | "cond_norm.mean" | "cond_norm.std"
        )
    }

    /// The safetensors `__metadata__` of this config.
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            ("format".to_string(), TRANSFORMER_FORMAT.to_string()),
            ("version".to_string(), "1".to_string()),
            ("x_dims".to_string(), self.x_dims.to_string()),
            ("width".to_string(), self.width.to_string()),
            ("depth".to_string(), self.depth.to_string()),
            ("heads".to_string(), self.heads.to_string()),
            ("mlp_hidden".to_string(), self.mlp_hidden.to_string()),
        ]);
        if let Some(c) = &self.cond_dims {
            m.insert("cond_dims".to_string(), c.to_string());
        }
        m
    }
}

/// A waypoint transformer velocity field `v(x, t [, c])`.
#[derive(Debug, Clone)]
pub struct WaypointTransformer {
    config: TransformerConfig,
    /// Every tensor by key (weights share storage with the trainer's `Var`s).
    t: HashMap<String, Tensor>,
}

impl WaypointTransformer {
    /// A freshly initialised model: linear layers as PyTorch's default, the positional
    /// embedding N(0, 0.02), the AdaLN layers zero (every block starts as the identity), the
    /// null condition zero. Trainable weights are `Var`s in `varmap`.
    pub fn init(
        mut config: TransformerConfig,
        varmap: &VarMap,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let f = config.num_freqs;
        // logspace(lo, hi, F): time 1 to 100 cycles (the seed's), values 0.1 to 10 cycles per
        // unit so the field stays smooth in x.
        let logspace = |lo: f64, hi: f64| -> Vec<f32> {
            (0..f)
                .map(|i| {
                    let e = if f == 1 {
                        lo
                    } else {
                        lo + (hi - lo) * i as f64 / (f - 1) as f64
                    };
                    10f64.powf(e) as f32
                })
                .collect()
        };
        tensors.insert(
            "freqs".to_string(),
            Tensor::from_vec(logspace(0.0, 2.0), f, device)?,
        );
        tensors.insert(
            "value_freqs".to_string(),
            Tensor::from_vec(logspace(-1.0, 1.0), f, device)?,
        );
        if config.cond_dims.is_some() {
            let c = config.cond_features();
            let n = config
                .cond_norm
                .clone()
                .unwrap_or_else(|| CondNorm::identity(c));
            // The config then says what the file will: the normalisation is always stored.
            config.cond_norm = Some(n.clone());
            tensors.insert(
                "cond_norm.mean".into(),
                Tensor::from_vec(n.mean, c, device)?,
            );
            tensors.insert("cond_norm.std".into(), Tensor::from_vec(n.std, c, device)?);
        }
        let data = varmap.data();
        let mut vars = data
            .lock()
            .map_err(|_| Error::Training("the variable map's lock is poisoned".into()))?;
        let shapes = config.expected_shapes();
        for (key, shape) in &shapes {
            if TransformerConfig::is_fixed(key) {
                continue;
            }
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if key == "pos_embed" {
                (0..n)
                    .map(|_| {
                        let z: f32 = StandardNormal.sample(&mut rng);
                        0.02 * z
                    })
                    .collect()
            } else if key.contains("ada.") || key == "cond_null" {
                vec![0.0; n]
            } else {
                // PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
                let wkey = key.replace(".bias", ".weight");
                let fan_in = shapes
                    .iter()
                    .find(|(k, _)| *k == wkey)
                    .map_or(1, |(_, s)| s[1]);
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let var = Var::from_tensor(&Tensor::from_vec(values, shape.clone(), device)?)?;
            tensors.insert(key.clone(), var.as_tensor().clone());
            vars.insert(key.clone(), var);
        }
        drop(vars);
        Self::from_tensors(config, &tensors, Path::new("<new model>"))
    }

    /// Builds a model from tensors under the file's keys, checking each shape.
    pub fn from_tensors(
        config: TransformerConfig,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self> {
        config.validate()?;
        let mut t = HashMap::new();
        for (key, shape) in config.expected_shapes() {
            let v = tensors.get(&key).ok_or_else(|| Error::ModelFile {
                path: path.to_path_buf(),
                reason: format!("missing tensor {key:?} (expected shape {shape:?})"),
            })?;
            if v.dims() != shape.as_slice() {
                return Err(Error::ModelTensorShape {
                    path: path.to_path_buf(),
                    key,
                    expected: shape,
                    got: v.dims().to_vec(),
                });
            }
            t.insert(key, v.clone());
        }
        Ok(WaypointTransformer { config, t })
    }

    /// Loads a waypoint-transformer file; every tensor is checked against the metadata.
    ///
    /// ```
    /// let dev = candle_core::Device::Cpu;
    /// let m = flow_matching::model::WaypointTransformer::load(
    ///     "tests/data/golden/transformer-cond/model.safetensors", &dev)?;
    /// assert_eq!(m.config().x_dims.dims(), &[16, 2]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let (config, tensors) = read_transformer_file(path.as_ref(), device)?;
        Self::from_tensors(config, &tensors, path.as_ref())
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.t["freqs"].device()
    }

    /// One tensor by key (present for every key of `config().expected_shapes()`).
    pub(crate) fn get(&self, key: &str) -> &Tensor {
        &self.t[key]
    }

    /// Every tensor under its file key, in file order.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.config
            .expected_shapes()
            .into_iter()
            .map(|(k, _)| {
                let v = self.t[&k].clone();
                (k, v)
            })
            .collect()
    }

    /// A copy detached from any autograd graph, for sampling.
    pub fn detach(&self) -> Self {
        WaypointTransformer {
            config: self.config.clone(),
            t: self
                .t
                .iter()
                .map(|(k, v)| (k.clone(), v.detach()))
                .collect(),
        }
    }

    /// Writes the model as a waypoint-transformer file (temporary name, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_with_metadata(path.as_ref(), &[], &HashMap::new())
    }

    /// Writes the model with extra tensors (EMA, optimiser state) and metadata entries; an
    /// extra entry may not replace one of the format's.
    pub fn save_with_metadata(
        &self,
        path: &Path,
        extra: &[(String, Tensor)],
        extra_meta: &HashMap<String, String>,
    ) -> Result<()> {
        let mut all: Vec<(String, Tensor)> = self
            .tensors()
            .into_iter()
            .chain(extra.iter().cloned())
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = self.config.metadata();
        for (k, v) in extra_meta {
            if meta.contains_key(k) {
                return Err(Error::ModelFile {
                    path: path.to_path_buf(),
                    reason: format!("extra metadata entry {k:?} would replace the format's entry"),
                });
            }
            meta.insert(k.clone(), v.clone());
        }
        let bytes = safetensors::serialize(all.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .map_err(|e| Error::ModelFile {
                path: path.to_path_buf(),
                reason: format!("cannot serialize: {e}"),
            })?;
        atomic_write(path, &bytes)
    }

    /// Checks that `cond` `[N, *c_dims]` fits the model; `what` (a flag or file) names it.
    pub fn check_condition(&self, cond: &Tensor, what: &str) -> Result<()> {
        match &self.config.cond_dims {
            None => Err(Error::Shape {
                what: what.to_string(),
                expected: "no condition: the model was trained without one".to_string(),
                got: cond.dims().to_vec(),
            }),
            Some(dims) => {
                if cond.rank() < 1 || cond.dims()[1..] != *dims.dims() {
                    return Err(Error::Shape {
                        what: what.to_string(),
                        expected: format!("[N, {dims}] (the model's cond_dims)"),
                        got: cond.dims().to_vec(),
                    });
                }
                Ok(())
            }
        }
    }

    /// A step function conditioning row `i` of the batch on row `i` of `cond` `[B, *c_dims]`.
    pub fn with_condition(&self, cond: &Tensor) -> Result<TransformerConditioned<'_>> {
        self.check_condition(cond, "condition")?;
        Ok(TransformerConditioned {
            model: self,
            cond: Some(Condition::features(cond.to_device(self.device())?)),
        })
    }

    /// `[v, sqrt2 sin(a), sqrt2 cos(a)]` with `a = ((2 pi) v) f`, for every element of `v`:
    /// `[..., 1 + 2F]`.
    fn fourier(&self, v: &Tensor, key: &str) -> Result<Tensor> {
        let f = self.get(key);
        let a = v
            .affine(TWO_PI_F32 as f64, 0.0)?
            .unsqueeze(D::Minus1)?
            .broadcast_mul(f)?;
        let s2 = std::f32::consts::SQRT_2 as f64;
        Ok(Tensor::cat(
            &[
                &v.unsqueeze(D::Minus1)?,
                &a.sin()?.affine(s2, 0.0)?,
                &a.cos()?.affine(s2, 0.0)?,
            ],
            D::Minus1,
        )?)
    }

    fn linear(&self, h: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"));
        let b = self.get(&format!("{name}.bias"));
        Ok(h.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
    }

    /// What `cond` comes to for `b` rows of this model (checked against its `cond_dims`): nothing,
    /// the null condition for every row, or the standardised features with their keep mask.
    pub(crate) fn cond_input(&self, cond: Option<&Condition>, b: usize) -> Result<CondInput> {
        match (&self.config.cond_dims, cond) {
            (None, None) => Ok(CondInput::Absent),
            (None, Some(_)) => Err(Error::invalid(
                "condition",
                "given",
                "no condition: this model was trained without one",
            )),
            (Some(_), Some(Condition::Labels(_))) => Err(Error::invalid(
                "condition",
                "class labels",
                "continuous features: the waypoint transformer takes no class labels",
            )),
            (Some(_), None) => Ok(CondInput::Null),
            (Some(dims), Some(Condition::Features { values, keep })) => {
                let (flat, keep) = flat_features(values, keep.as_ref(), dims, b)?;
                let normed = flat
                    .broadcast_sub(self.get("cond_norm.mean"))?
                    .broadcast_div(self.get("cond_norm.std"))?;
                Ok(CondInput::Features { normed, keep })
            }
        }
    }

    /// The condition's embedding `[B, W]` (the learned null condition for `None` and for
    /// rows whose keep entry is 0); `None` for an unconditional model.
    pub fn forward_cond_embedding(
        &self,
        cond: Option<&Condition>,
        b: usize,
    ) -> Result<Option<Tensor>> {
        let w = self.config.width;
        match self.cond_input(cond, b)? {
            CondInput::Absent => Ok(None),
            CondInput::Null => Ok(Some(
                self.get("cond_null")
                    .unsqueeze(0)?
                    .broadcast_as((b, w))?
                    .contiguous()?,
            )),
            CondInput::Features { normed, keep } => {
                let k = self.linear(
                    &self.linear(&normed, "cond_embed.0")?.silu()?,
                    "cond_embed.2",
                )?;
                Ok(Some(match keep {
                    None => k,
                    Some(kp) => {
                        let drop = kp.affine(-1.0, 1.0)?;
                        (k.broadcast_mul(&kp)?
                            + drop.matmul(&self.get("cond_null").unsqueeze(0)?)?)?
                    }
                }))
            }
        }
    }

    /// The conditioning vector `[B, W]`: the time embedding plus the condition's embedding.
    fn conditioning(&self, ft: &Tensor, cond: Option<&Condition>, b: usize) -> Result<Tensor> {
        let s = self.linear(&self.linear(ft, "time_embed.0")?.silu()?, "time_embed.2")?;
        Ok(match self.forward_cond_embedding(cond, b)? {
            None => s,
            Some(k) => (s + k)?,
        })
    }

    /// The velocity `[B, L, C]` for `x` `[B, L, C]`, times `t` (B elements) and a condition
    /// (`None`: the null condition of a conditional model).
    pub fn forward_cond(&self, x: &Tensor, t: &Tensor, cond: Option<&Condition>) -> Result<Tensor> {
        let cfg = &self.config;
        let (l, c, w) = (cfg.len(), cfg.channels(), cfg.width);
        if x.rank() != 3 || x.dims()[1..] != *cfg.x_dims.dims() {
            return Err(Error::Shape {
                what: "x".into(),
                expected: format!("[B, {}] (the model's x_dims)", cfg.x_dims),
                got: x.dims().to_vec(),
            });
        }
        let b = x.dim(0)?;
        if t.elem_count() != b {
            return Err(Error::Shape {
                what: "t".into(),
                expected: format!("{b} elements, one per sample"),
                got: t.dims().to_vec(),
            });
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let t = t.reshape(b)?.to_dtype(DType::F32)?;
        let p = cfg.per_value();
        let ft = self.fourier(&t, "freqs")?; // [B, P]
        let fx = self.fourier(&x, "value_freqs")?.reshape((b, l, c * p))?;
        let tok = Tensor::cat(
            &[
                &fx,
                &ft.unsqueeze(1)?.broadcast_as((b, l, p))?.contiguous()?,
            ],
            2,
        )?;
        let mut h = self
            .linear(
                &self.linear(&tok, "token_embed.0")?.silu()?,
                "token_embed.2",
            )?
            .broadcast_add(self.get("pos_embed"))?;
        let s = self.conditioning(&ft, cond, b)?.silu()?;
        let (heads, dh) = (cfg.heads, w / cfg.heads);
        let scale = 1.0 / (dh as f64).sqrt();
        for i in 0..cfg.depth {
            let blk = format!("blocks.{i}");
            let m = self.linear(&s, &format!("{blk}.ada"))?.unsqueeze(1)?; // [B, 1, 6W]
            let part = |j: usize| m.narrow(2, j * w, w);
            let a = modulate(&h, &part(0)?, &part(1)?)?;
            let qkv = self.linear(&a, &format!("{blk}.qkv"))?; // [B, L, 3W]
            let split = |j: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(2, j * w, w)?
                    .reshape((b, l, heads, dh))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let att = (q.matmul(&k.t()?)? * scale)?;
            // The composed softmax, not `softmax_last_dim`: that fused op has no backward, so
            // autograd through it gave the queries and keys no gradient at all.
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, w))?;
            let o = self.linear(&o, &format!("{blk}.proj"))?;
            h = (h + o.broadcast_mul(&part(2)?)?)?;
            let a = modulate(&h, &part(3)?, &part(4)?)?;
            let f = self.linear(
                &self.linear(&a, &format!("{blk}.mlp.0"))?.silu()?,
                &format!("{blk}.mlp.2"),
            )?;
            h = (h + f.broadcast_mul(&part(5)?)?)?;
        }
        let m = self.linear(&s, "final_ada")?.unsqueeze(1)?;
        let h = modulate(&h, &m.narrow(2, 0, w)?, &m.narrow(2, w, w)?)?;
        Ok(self.linear(&h, "final_out")?.to_dtype(dtype)?)
    }
}

/// What a batch's condition comes to for a waypoint transformer.
pub(crate) enum CondInput {
    /// An unconditional model: no condition.
    Absent,
    /// A conditional model given none: the learned null condition for every row.
    Null,
    /// Standardised features `[B, cf]` and the keep mask `[B, 1]` (`None`: keep every row).
    Features {
        normed: Tensor,
        keep: Option<Tensor>,
    },
}

/// `LN(h) (1 + scale) + shift`, the layer norm without affine weights.
fn modulate(h: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let mean = h.mean_keepdim(D::Minus1)?;
    let c = h.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    let n = c.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
    Ok(n.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

/// A waypoint transformer bound to one condition row per sample (or the null condition).
#[derive(Debug, Clone)]
pub struct TransformerConditioned<'a> {
    /// The model.
    pub model: &'a WaypointTransformer,
    /// The condition of every row (`None`: the null condition).
    pub cond: Option<Condition>,
}

/// The `format` entry of a safetensors file's metadata (`None` when it has none), to pick
/// the reader.
pub fn file_format(path: &Path) -> Result<Option<String>> {
    let bytes = crate::limits::read_input(path)?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            reason: crate::model::file::not_safetensors(&bytes, path, e),
        })?;
    Ok(header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format").cloned()))
}

/// Reads a waypoint-transformer file: its config and every tensor (extra keys included).
pub fn read_transformer_file(
    path: &Path,
    device: &Device,
) -> Result<(TransformerConfig, HashMap<String, Tensor>)> {
    let bytes = crate::limits::read_input(path)?;
    read_transformer_bytes(&bytes, path, device)
}

/// Reads a waypoint-transformer file from its bytes (`path` only names it in errors). Sizes,
/// depth and every tensor shape are checked against the header before any tensor is made,
/// so the memory used is the file's size once more.
///
/// ```
/// let e = flow_matching::model::read_transformer_bytes(b"junk", "t.safetensors".as_ref(), &candle_core::Device::Cpu)
///     .unwrap_err();
/// assert!(e.to_string().contains("not a valid safetensors file"), "{e}");
/// ```
pub fn read_transformer_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(TransformerConfig, HashMap<String, Tensor>)> {
    let bad = |reason: String| Error::ModelFile {
        path: PathBuf::from(path),
        reason,
    };
    let (st, meta) = crate::model::file::open_header(bytes, TRANSFORMER_FORMAT, path)?;
    let x_dims = XDims::parse(meta.get("x_dims").map(String::as_str).unwrap_or(""))
        .map_err(|e| bad(format!("metadata x_dims: {e}")))?;
    let cond_dims = match meta.get("cond_dims").map(|s| s.trim()) {
        None | Some("") => None,
        Some(v) => Some(XDims::parse(v).map_err(|e| bad(format!("metadata cond_dims: {e}")))?),
    };
    // Everything below is checked against the header before any tensor is allocated: each
    // size the metadata gives is at most the file's number of floats (so no product of them
    // overflows), the depth at most what the tensors present can hold, and every shape the
    // config implies equals the shape stored.
    let shapes: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let floats = bytes.len() / 4;
    let size = |key: &str| -> Result<usize> {
        let v = crate::model::file::meta_usize(&meta, key, path)?;
        if v > floats {
            return Err(bad(format!(
                "metadata {key} = {v}, larger than the {floats} numbers the file holds"
            )));
        }
        Ok(v)
    };
    let (width, depth, heads, mlp_hidden) = (
        size("width")?,
        size("depth")?,
        size("heads")?,
        size("mlp_hidden")?,
    );
    // Ten tensors a block: a larger depth cannot match this file.
    if depth > shapes.len() / 10 {
        return Err(bad(format!(
            "metadata depth = {depth}, but the file holds {} tensors: a depth-{depth} model needs {} blocks of 10",
            shapes.len(),
            depth
        )));
    }
    let dims =
        std::iter::once(("x_dims", &x_dims)).chain(cond_dims.iter().map(|c| ("cond_dims", c)));
    for (what, d) in dims {
        if d.numel() > floats {
            return Err(bad(format!(
                "metadata {what} = {d} ({} numbers), more than the {floats} the file holds",
                d.numel()
            )));
        }
    }
    let num_freqs = match shapes.get("freqs").map(Vec::as_slice) {
        Some([f]) if *f <= floats => *f,
        Some(other) => {
            return Err(Error::ModelTensorShape {
                path: path.to_path_buf(),
                key: "freqs".into(),
                expected: vec![0],
                got: other.to_vec(),
            })
        }
        None => return Err(bad("missing tensor \"freqs\"".into())),
    };
    let mut config = TransformerConfig {
        x_dims,
        width,
        depth,
        heads,
        mlp_hidden,
        num_freqs,
        cond_dims,
        cond_norm: None,
    };
    config
        .validate()
        .map_err(|e| bad(format!("metadata: {e}")))?;
    let (tensors, cond_norm) = crate::model::file::load_checked(
        &st,
        &shapes,
        config.expected_shapes(),
        config.cond_dims.is_some(),
        path,
        device,
    )?;
    // The normalisation's lengths were checked with every other shape above.
    config.cond_norm = cond_norm;
    Ok((config, tensors))
}

impl ModelConfig for TransformerConfig {
    type Model = WaypointTransformer;
}
