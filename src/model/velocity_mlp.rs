//! The `velocity-mlp` model of `shared/spec/velocity-mlp.md`: time features, an optional class
//! embedding or continuous-condition projection, and an MLP with SiLU, stored as safetensors
//! that PyTorch reads too (docs/velocity-mlp.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::diffusion::XDims;
use crate::error::{Error, Result};
use crate::io::atomic_write;
use crate::model::cond::{flat_features, CondNorm, Condition};
use crate::model::fast::FastMlp;
pub use crate::model::file::first_non_finite;
pub(crate) use crate::model::file::{load_checked, meta_usize, open_header};
use crate::step::{FastVelocity, StepFn};

/// `2 pi` rounded to float32 first, as the reference computes `((2*pi) * t) * f`.
const TWO_PI_F32: f32 = 2.0 * std::f32::consts::PI;

/// The hyper-parameters of a velocity-mlp (the file's metadata plus F and K).
#[derive(Debug, Clone, PartialEq)]
pub struct VelocityMlpConfig {
    /// The sample shape.
    pub x_dims: XDims,
    /// Hidden width H.
    pub hidden: usize,
    /// Number of hidden layers (at least 1).
    pub depth: usize,
    /// Number of classes; 0 for an unconditional model.
    pub num_classes: usize,
    /// Number of time frequencies F.
    pub num_freqs: usize,
    /// Width K of the class embedding or of the continuous condition's projection (unused
    /// when unconditional).
    pub cond_dim: usize,
    /// The shape of one row's continuous condition (`None`: no continuous condition). A
    /// model has class labels or a continuous condition, not both.
    pub cond_dims: Option<XDims>,
    /// The fixed standardisation of the continuous condition (`None`: mean 0, std 1).
    pub cond_norm: Option<CondNorm>,
}

impl VelocityMlpConfig {
    /// An unconditional model with hidden 256, depth 3, 16 frequencies.
    pub fn new(x_dims: XDims) -> Self {
        VelocityMlpConfig {
            x_dims,
            hidden: 256,
            depth: 3,
            num_classes: 0,
            num_freqs: 16,
            cond_dim: 16,
            cond_dims: None,
            cond_norm: None,
        }
    }

    /// Whether the model takes a condition (labels or continuous features).
    pub fn is_conditional(&self) -> bool {
        self.num_classes > 0 || self.cond_dims.is_some()
    }

    /// `C = prod(cond_dims)`, the flattened width of a continuous condition (0 without one).
    pub fn cond_features(&self) -> usize {
        self.cond_dims.as_ref().map_or(0, XDims::numel)
    }

    /// Checks that every size is usable.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 {
            return Err(Error::invalid("hidden", 0, "at least 1"));
        }
        if self.depth == 0 {
            return Err(Error::invalid("depth", 0, "at least 1"));
        }
        if self.num_freqs == 0 {
            return Err(Error::invalid("number of frequencies", 0, "at least 1"));
        }
        if self.is_conditional() && self.cond_dim == 0 {
            return Err(Error::invalid(
                "condition embedding width",
                0,
                "at least 1 for a conditional model",
            ));
        }
        if self.num_classes > 0 && self.cond_dims.is_some() {
            return Err(Error::invalid(
                "condition",
                format!(
                    "{} classes and cond_dims {}",
                    self.num_classes,
                    self.cond_dims
                        .as_ref()
                        .map_or(String::new(), |d| d.to_string())
                ),
                "class labels or a continuous condition, not both",
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
        // Sizes come from files and flags: every product below must exist as a number.
        if self.num_params().is_none() {
            return Err(Error::invalid(
                "model size",
                format!(
                    "hidden {}, depth {}, {} frequencies, {} classes x {}, x_dims {}",
                    self.hidden,
                    self.depth,
                    self.num_freqs,
                    self.num_classes,
                    self.cond_dim,
                    self.x_dims
                ),
                "a model whose parameter count fits in memory (the count overflows)",
            ));
        }
        Ok(())
    }

    /// The number of float32 values in the model's tensors; `None` when it overflows.
    ///
    /// ```
    /// use flow_matching::{VelocityMlpConfig, XDims};
    /// let c = VelocityMlpConfig::new(XDims::new(2).unwrap());
    /// // freqs 16 + [256, 2+32] + 256 + 2 x ([256, 256] + 256) + [2, 256] + 2
    /// assert_eq!(c.num_params(), Some(16 + 256 * 34 + 256 + 2 * (256 * 256 + 256) + 512 + 2));
    /// ```
    pub fn num_params(&self) -> Option<usize> {
        let (h, d) = (self.hidden, self.x_dims.numel());
        let input = self.checked_input_dim()?;
        let cond = if self.num_classes > 0 {
            self.num_classes
                .checked_add(1)?
                .checked_mul(self.cond_dim)?
        } else if self.cond_dims.is_some() {
            // cond_norm.mean/std [C], cond_proj.weight [K, C], cond_proj.bias and cond_null [K].
            let c = self.cond_features();
            c.checked_mul(2)?
                .checked_add(self.cond_dim.checked_mul(c)?)?
                .checked_add(self.cond_dim.checked_mul(2)?)?
        } else {
            0
        };
        let first = h.checked_mul(input)?.checked_add(h)?;
        let middle = h
            .checked_mul(h)?
            .checked_add(h)?
            .checked_mul(self.depth.checked_sub(1)?)?;
        let last = d.checked_mul(h)?.checked_add(d)?;
        self.num_freqs
            .checked_add(cond)?
            .checked_add(first)?
            .checked_add(middle)?
            .checked_add(last)
    }

    /// `D + 2F (+ K)` with checked arithmetic.
    fn checked_input_dim(&self) -> Option<usize> {
        let k = if self.is_conditional() {
            self.cond_dim
        } else {
            0
        };
        self.x_dims
            .numel()
            .checked_add(self.num_freqs.checked_mul(2)?)?
            .checked_add(k)
    }

    /// The input width of the first layer, `D + 2F (+ K)`.
    pub fn input_dim(&self) -> usize {
        self.x_dims.numel()
            + 2 * self.num_freqs
            + if self.is_conditional() {
                self.cond_dim
            } else {
                0
            }
    }

    /// Every tensor key with its expected shape, in file order.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, d) = (self.hidden, self.x_dims.numel());
        let mut v = vec![("time_embed.freqs".to_string(), vec![self.num_freqs])];
        if self.num_classes > 0 {
            v.push((
                "cond_embed.weight".to_string(),
                vec![self.num_classes + 1, self.cond_dim],
            ));
        }
        if self.cond_dims.is_some() {
            let (c, k) = (self.cond_features(), self.cond_dim);
            v.push(("cond_norm.mean".to_string(), vec![c]));
            v.push(("cond_norm.std".to_string(), vec![c]));
            v.push(("cond_proj.weight".to_string(), vec![k, c]));
            v.push(("cond_proj.bias".to_string(), vec![k]));
            v.push(("cond_null".to_string(), vec![k]));
        }
        for l in 0..=self.depth {
            let in_dim = if l == 0 { self.input_dim() } else { h };
            let out_dim = if l == self.depth { d } else { h };
            v.push((format!("net.{}.weight", 2 * l), vec![out_dim, in_dim]));
            v.push((format!("net.{}.bias", 2 * l), vec![out_dim]));
        }
        v
    }

    /// Whether a key holds a fixed tensor (time frequencies, condition normalisation) rather
    /// than a trainable weight.
    pub fn is_fixed(key: &str) -> bool {
        matches!(key, "time_embed.freqs" | "cond_norm.mean" | "cond_norm.std")
    }

    /// The safetensors `__metadata__` of this config (`cond_dims` only for a continuous
    /// condition, so other files keep the version-1 header unchanged).
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            ("format".to_string(), "velocity-mlp".to_string()),
            ("version".to_string(), "1".to_string()),
            ("x_dims".to_string(), self.x_dims.to_string()),
            ("hidden".to_string(), self.hidden.to_string()),
            ("depth".to_string(), self.depth.to_string()),
            ("num_classes".to_string(), self.num_classes.to_string()),
        ]);
        if let Some(c) = &self.cond_dims {
            m.insert("cond_dims".to_string(), c.to_string());
        }
        m
    }
}

/// Per-row condition features `[B + 1, K]` (row `B` the null condition), each row's index
/// into them, and the standardised condition `[B, C]` (for the projection's gradient).
pub(crate) type RowEmbedding = (Vec<f32>, Vec<u32>, Option<Tensor>);

/// The continuous condition's tensors: `k = ((c - mean) / std) W^T + b`, or `null`.
#[derive(Debug, Clone)]
struct CondProj {
    mean: Tensor,
    std: Tensor,
    weight: Tensor,
    bias: Tensor,
    null: Tensor,
}

impl CondProj {
    fn detach(&self) -> Self {
        CondProj {
            mean: self.mean.detach(),
            std: self.std.detach(),
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            null: self.null.detach(),
        }
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(CondProj {
            mean: f(&self.mean)?,
            std: f(&self.std)?,
            weight: f(&self.weight)?,
            bias: f(&self.bias)?,
            null: f(&self.null)?,
        })
    }
}

/// A velocity field `v(x, t [, c])` as the spec's MLP.
#[derive(Debug, Clone)]
pub struct VelocityMlp {
    config: VelocityMlpConfig,
    freqs: Tensor,
    cond: Option<Tensor>,
    cproj: Option<CondProj>,
    /// `(weight [out, in], bias [out])` for each of the `depth + 1` linear layers.
    layers: Vec<(Tensor, Tensor)>,
    /// The hidden weights packed for the CPU kernels, shared by every sampling run: only for a
    /// model read from a file, whose weights no training variable shares.
    packed: Option<crate::kernel::mlp::PackedCache>,
}

impl VelocityMlp {
    /// A freshly initialised model whose trainable weights live in `varmap` under the spec's
    /// keys (PyTorch's default initialisation, drawn from a seeded generator). The frequencies
    /// `logspace(0, 2, F)` are fixed, not variables.
    pub fn init(
        mut config: VelocityMlpConfig,
        varmap: &VarMap,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        crate::limits::check_memory(
            &format!(
                "the weights of a model with hidden {} and depth {}",
                config.hidden, config.depth
            ),
            config.num_params().and_then(|n| (n as u64).checked_mul(4)),
        )?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let f = config.num_freqs;
        let freqs: Vec<f32> = (0..f)
            .map(|i| {
                if f == 1 {
                    1.0
                } else {
                    10f64.powf(2.0 * i as f64 / (f - 1) as f64) as f32
                }
            })
            .collect();
        tensors.insert(
            "time_embed.freqs".to_string(),
            Tensor::from_vec(freqs, f, device)?,
        );
        if config.cond_dims.is_some() {
            let c = config.cond_features();
            let norm = config
                .cond_norm
                .clone()
                .unwrap_or_else(|| CondNorm::identity(c));
            // The config then says what the file will: the normalisation is always stored.
            config.cond_norm = Some(norm.clone());
            tensors.insert(
                "cond_norm.mean".to_string(),
                Tensor::from_vec(norm.mean, c, device)?,
            );
            tensors.insert(
                "cond_norm.std".to_string(),
                Tensor::from_vec(norm.std, c, device)?,
            );
        }
        let data = varmap.data();
        let mut vars = data
            .lock()
            .map_err(|_| Error::Training("the variable map's lock is poisoned".into()))?;
        for (key, shape) in config.expected_shapes() {
            if VelocityMlpConfig::is_fixed(&key) {
                continue;
            }
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if key == "cond_embed.weight" {
                (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
            } else if key == "cond_null" {
                // Zero is the projection's mean output over standardised conditions (bias
                // aside), a neutral start for the learned "no condition".
                vec![0.0; n]
            } else {
                let fan_in = if key.ends_with(".weight") {
                    shape[1]
                } else {
                    config_fan_in(&config, &key)
                };
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?;
            tensors.insert(key.clone(), var.as_tensor().clone());
            vars.insert(key, var);
        }
        Self::from_tensors(config, &tensors, Path::new("<new model>"))
    }

    /// Builds a model from tensors under the spec's keys, checking each shape.
    pub fn from_tensors(
        config: VelocityMlpConfig,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self> {
        config.validate()?;
        for (key, shape) in config.expected_shapes() {
            let t = tensors.get(&key).ok_or_else(|| Error::ModelFile {
                path: path.to_path_buf(),
                reason: format!("missing tensor {key:?} (expected shape {shape:?})"),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ModelTensorShape {
                    path: path.to_path_buf(),
                    key,
                    expected: shape,
                    got: t.dims().to_vec(),
                });
            }
        }
        let get = |k: &str| tensors[k].clone();
        let layers = (0..=config.depth)
            .map(|l| {
                (
                    get(&format!("net.{}.weight", 2 * l)),
                    get(&format!("net.{}.bias", 2 * l)),
                )
            })
            .collect();
        let cproj = config.cond_dims.is_some().then(|| CondProj {
            mean: get("cond_norm.mean"),
            std: get("cond_norm.std"),
            weight: get("cond_proj.weight"),
            bias: get("cond_proj.bias"),
            null: get("cond_null"),
        });
        Ok(VelocityMlp {
            freqs: get("time_embed.freqs"),
            cond: (config.num_classes > 0).then(|| get("cond_embed.weight")),
            cproj,
            layers,
            config,
            packed: None,
        })
    }

    /// Loads a velocity-mlp file; every tensor is checked against the metadata.
    ///
    /// ```no_run
    /// let model = flow_matching::VelocityMlp::load("model.safetensors", &candle_core::Device::Cpu)?;
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    ///
    /// The weights of a loaded model are read-only (they belong to no training variable), so
    /// sampling on the CPU packs its hidden layers once, on the first run, and every later run
    /// and clone reuses them: a transposed copy of the hidden weights stays in memory with the
    /// model (what a run of four rows or more allocated for its duration anyway).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let (config, tensors) = read_file(path.as_ref(), device)?;
        let mut m = Self::from_tensors(config, &tensors, path.as_ref())?;
        m.packed = Some(Default::default());
        Ok(m)
    }

    /// The shared packed weights, for a model whose weights cannot change.
    pub(crate) fn packed_cache(&self) -> Option<crate::kernel::mlp::PackedCache> {
        self.packed.clone()
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &VelocityMlpConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.freqs.device()
    }

    /// The model's tensors under the spec's keys.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("time_embed.freqs".to_string(), self.freqs.clone())];
        if let Some(c) = &self.cond {
            v.push(("cond_embed.weight".to_string(), c.clone()));
        }
        if let Some(p) = &self.cproj {
            v.push(("cond_norm.mean".to_string(), p.mean.clone()));
            v.push(("cond_norm.std".to_string(), p.std.clone()));
            v.push(("cond_proj.weight".to_string(), p.weight.clone()));
            v.push(("cond_proj.bias".to_string(), p.bias.clone()));
            v.push(("cond_null".to_string(), p.null.clone()));
        }
        for (l, (w, b)) in self.layers.iter().enumerate() {
            v.push((format!("net.{}.weight", 2 * l), w.clone()));
            v.push((format!("net.{}.bias", 2 * l), b.clone()));
        }
        v
    }

    /// Every linear layer as `(weight, bias)`, for the fused CPU kernels.
    pub(crate) fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// The time frequencies `[F]`.
    pub(crate) fn freqs(&self) -> &Tensor {
        &self.freqs
    }

    /// The class embedding `[num_classes + 1, K]`, when conditional.
    pub(crate) fn cond_embed(&self) -> Option<&Tensor> {
        self.cond.as_ref()
    }

    /// A copy whose weights are detached from any autograd graph, for sampling.
    pub fn detach(&self) -> Self {
        VelocityMlp {
            config: self.config.clone(),
            freqs: self.freqs.detach(),
            cond: self.cond.as_ref().map(|c| c.detach()),
            cproj: self.cproj.as_ref().map(CondProj::detach),
            layers: self
                .layers
                .iter()
                .map(|(w, b)| (w.detach(), b.detach()))
                .collect(),
            // The same storage: read-only exactly when this model's is.
            packed: self.packed.clone(),
        }
    }

    /// A copy on another device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(VelocityMlp {
            config: self.config.clone(),
            freqs: self.freqs.to_device(device)?,
            cond: self
                .cond
                .as_ref()
                .map(|c| c.to_device(device))
                .transpose()?,
            cproj: self
                .cproj
                .as_ref()
                .map(|p| p.map(|t| Ok(t.to_device(device)?)))
                .transpose()?,
            layers: self
                .layers
                .iter()
                .map(|(w, b)| Ok((w.to_device(device)?, b.to_device(device)?)))
                .collect::<Result<_>>()?,
            packed: None,
        })
    }

    /// Writes the model as a velocity-mlp file (temporary name, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_with(path, &[])
    }

    /// Writes the model with extra tensors (an EMA copy, optimizer state) under other keys.
    pub fn save_with(&self, path: impl AsRef<Path>, extra: &[(String, Tensor)]) -> Result<()> {
        self.save_with_metadata(path, extra, &HashMap::new())
    }

    /// Writes the model with extra tensors and extra `__metadata__` entries (a training
    /// checkpoint's step and config); an extra entry may not replace a spec entry.
    pub fn save_with_metadata(
        &self,
        path: impl AsRef<Path>,
        extra: &[(String, Tensor)],
        extra_meta: &HashMap<String, String>,
    ) -> Result<()> {
        let mut all: Vec<(String, Tensor)> = self
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        for (k, t) in extra {
            all.push((k.clone(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?));
        }
        let mut meta = self.config.metadata();
        let path = path.as_ref();
        for (k, v) in extra_meta {
            if meta.contains_key(k) {
                return Err(Error::ModelFile {
                    path: path.to_path_buf(),
                    reason: format!("extra metadata entry {k:?} would replace the spec's entry"),
                });
            }
            meta.insert(k.clone(), v.clone());
        }
        if let Some(key) = first_non_finite(&all)? {
            return Err(Error::NonFiniteWeights {
                what: format!("model for {}", path.display()),
                key,
                action: "not written; any existing file is left as it was".into(),
            });
        }
        let bytes = safetensors::serialize(all.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .map_err(|e| Error::ModelFile {
                path: path.to_path_buf(),
                reason: format!("cannot serialize: {e}"),
            })?;
        atomic_write(path, &bytes)
    }

    /// Validates class labels for a batch of `batch` rows and returns them as a `[B]` u32 tensor.
    pub fn labels_tensor(&self, labels: &[u32], batch: usize) -> Result<Tensor> {
        if self.config.num_classes == 0 {
            return Err(Error::invalid(
                "labels",
                format!("{labels:?}"),
                "no labels: this model is unconditional (num_classes = 0)",
            ));
        }
        if labels.len() != batch {
            return Err(Error::invalid(
                "labels",
                format!("{} labels", labels.len()),
                format!("one label per sample ({batch})"),
            ));
        }
        if let Some(bad) = labels
            .iter()
            .find(|&&l| l as usize > self.config.num_classes)
        {
            return Err(Error::invalid(
                "label",
                bad,
                format!(
                    "a class in 0..{} or {} for no condition",
                    self.config.num_classes, self.config.num_classes
                ),
            ));
        }
        Ok(Tensor::from_vec(labels.to_vec(), batch, self.device())?)
    }

    /// The time features `[B, 2F]` of per-row times `t` (any shape with B elements).
    pub fn time_features(&self, t: &Tensor, batch: usize) -> Result<Tensor> {
        if t.elem_count() != batch {
            return Err(Error::Shape {
                what: "t".into(),
                expected: format!("{batch} elements, one per sample"),
                got: t.dims().to_vec(),
            });
        }
        let t = t.reshape((batch, 1))?.to_dtype(self.freqs.dtype())?;
        let a = t
            .affine(TWO_PI_F32 as f64, 0.0)?
            .broadcast_mul(&self.freqs.unsqueeze(0)?)?;
        Ok(Tensor::cat(&[a.sin()?, a.cos()?], 1)?)
    }

    /// The velocity for `x` `[B, *x_dims]` and times `t` (B elements), given the labels `[B]`
    /// (u32) of a class-conditional model or the features `[B, *c_dims]` of a model with a
    /// continuous condition; `None` means the null condition for a conditional model.
    pub fn forward(&self, x: &Tensor, t: &Tensor, c: Option<&Tensor>) -> Result<Tensor> {
        let cond = match c {
            None => None,
            Some(c) if self.cproj.is_some() => Some(Condition::features(c.clone())),
            Some(l) => Some(Condition::Labels(l.clone())),
        };
        self.forward_cond(x, t, cond.as_ref())
    }

    /// The velocity under a [`Condition`] (labels, or features with per-row null rows);
    /// `None` means the null condition for a conditional model.
    pub fn forward_cond(&self, x: &Tensor, t: &Tensor, cond: Option<&Condition>) -> Result<Tensor> {
        let b = self.check_x(x)?;
        let dtype = x.dtype();
        let mut parts = vec![x
            .reshape((b, self.config.x_dims.numel()))?
            .to_dtype(DType::F32)?];
        parts.push(self.time_features(t, b)?);
        if let Some(k) = self.cond_features(cond, b)? {
            parts.push(k);
        }
        let mut h = Tensor::cat(&parts, 1)?;
        let last = self.layers.len() - 1;
        for (i, (w, bias)) in self.layers.iter().enumerate() {
            h = h.matmul(&w.t()?)?.broadcast_add(bias)?;
            if i < last {
                h = h.silu()?;
            }
        }
        Ok(h.reshape(x.dims())?.to_dtype(dtype)?)
    }

    /// The condition's features `[B, K]` for the first layer (`None` for an unconditional
    /// model): class embedding rows, or the projected continuous condition with the null rows.
    pub fn cond_features(&self, cond: Option<&Condition>, batch: usize) -> Result<Option<Tensor>> {
        match (cond, &self.cproj) {
            (Some(Condition::Features { .. }), None) => Err(Error::invalid(
                "condition",
                "continuous features",
                if self.config.num_classes > 0 {
                    format!(
                        "class labels: this model was trained with {} classes",
                        self.config.num_classes
                    )
                } else {
                    "no condition: this model was trained without one".to_string()
                },
            )),
            (Some(Condition::Labels(_)), Some(_)) => {
                Err(Error::invalid(
                    "condition",
                    "class labels",
                    format!(
                    "continuous features of shape [B, {}]: this model has a continuous condition",
                    self.config.cond_dims.as_ref().map_or(String::new(), |d| d.to_string())
                ),
                ))
            }
            (Some(Condition::Labels(l)), None) => self.class_features(Some(l), batch),
            (None, None) => self.class_features(None, batch),
            (None, Some(p)) => Ok(Some(
                p.null
                    .unsqueeze(0)?
                    .broadcast_as((batch, self.config.cond_dim))?
                    .contiguous()?,
            )),
            (Some(Condition::Features { values, keep }), Some(p)) => {
                let dims = self.config.cond_dims.as_ref().ok_or_else(|| {
                    Error::Training("continuous condition without cond_dims".into())
                })?;
                let (flat, keep) = flat_features(values, keep.as_ref(), dims, batch)?;
                let k = self.project(&flat, p)?;
                Ok(Some(match keep {
                    None => k,
                    Some(keep) => {
                        let drop = keep.affine(-1.0, 1.0)?;
                        (k.broadcast_mul(&keep)? + drop.matmul(&p.null.unsqueeze(0)?)?)?
                    }
                }))
            }
        }
    }

    /// `((c - mean) / std) W^T + b` for flattened conditions `[B, C]`.
    fn project(&self, flat: &Tensor, p: &CondProj) -> Result<Tensor> {
        let n = flat.broadcast_sub(&p.mean)?.broadcast_div(&p.std)?;
        Ok(n.matmul(&p.weight.t()?)?.broadcast_add(&p.bias)?)
    }

    /// The per-row condition features `[B + 1, K]` of a continuous model (row `B` is the null
    /// condition) with each row's index into them (`B` for a dropped row), for the fused
    /// kernels, which treat every row as its own class. `None` for other models.
    pub(crate) fn row_embedding(
        &self,
        cond: Option<&Condition>,
        batch: usize,
    ) -> Result<Option<RowEmbedding>> {
        let Some(p) = &self.cproj else {
            return Ok(None);
        };
        let null = p.null.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (mut rows, index, normed) = match cond {
            None => (Vec::new(), vec![batch as u32; batch], None),
            Some(Condition::Labels(_)) => {
                return self.cond_features(cond, batch).map(|_| None);
            }
            Some(Condition::Features { values, keep }) => {
                let dims = self.config.cond_dims.as_ref().ok_or_else(|| {
                    Error::Training("continuous condition without cond_dims".into())
                })?;
                let (flat, keep) = flat_features(values, keep.as_ref(), dims, batch)?;
                let normed = flat.broadcast_sub(&p.mean)?.broadcast_div(&p.std)?.detach();
                let k = normed
                    .matmul(&p.weight.detach().t()?)?
                    .broadcast_add(&p.bias.detach())?;
                let index = match keep {
                    None => (0..batch as u32).collect(),
                    Some(keep) => keep
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .iter()
                        .enumerate()
                        .map(|(r, &kp)| if kp > 0.5 { r as u32 } else { batch as u32 })
                        .collect(),
                };
                (k.flatten_all()?.to_vec1::<f32>()?, index, Some(normed))
            }
        };
        if rows.is_empty() {
            rows = vec![0.0; batch * self.config.cond_dim];
        }
        rows.extend_from_slice(&null);
        Ok(Some((rows, index, normed)))
    }

    fn check_x(&self, x: &Tensor) -> Result<usize> {
        if x.rank() < 2 || x.dims()[1..] != *self.config.x_dims.dims() {
            return Err(Error::Shape {
                what: "x".into(),
                expected: format!("[B, {}] (the model's x_dims)", self.config.x_dims),
                got: x.dims().to_vec(),
            });
        }
        Ok(x.dim(0)?)
    }

    /// The class embedding rows `[B, K]` for the labels (the null class when `None`).
    fn class_features(&self, labels: Option<&Tensor>, batch: usize) -> Result<Option<Tensor>> {
        match (&self.cond, labels) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(Error::invalid(
                "labels",
                "given",
                "no labels: this model is unconditional (num_classes = 0)",
            )),
            (Some(emb), Some(l)) => {
                if l.dims() != [batch] {
                    return Err(Error::Shape {
                        what: "labels".into(),
                        expected: format!("[{batch}]"),
                        got: l.dims().to_vec(),
                    });
                }
                Ok(Some(emb.index_select(&l.to_dtype(DType::U32)?, 0)?))
            }
            (Some(emb), None) => {
                let null = Tensor::full(self.config.num_classes as u32, batch, emb.device())?;
                Ok(Some(emb.index_select(&null, 0)?))
            }
        }
    }

    /// A step function that conditions every row on its label.
    pub fn with_labels(&self, labels: &[u32]) -> Result<Conditioned<'_>> {
        let batch = labels.len();
        Ok(Conditioned {
            model: self,
            labels: self.labels_tensor(labels, batch)?,
        })
    }

    /// A step function that conditions row `i` of the batch on row `i` of `cond`
    /// `[B, *c_dims]` (a model with a continuous condition).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions, VelocityMlp, VelocityMlpConfig, XDims};
    ///
    /// let cfg = VelocityMlpConfig {
    ///     hidden: 16, depth: 1, cond_dims: Some(XDims::new(5)?),
    ///     ..VelocityMlpConfig::new(XDims::new([4, 2])?)
    /// };
    /// let model = VelocityMlp::init(cfg, &candle_nn::VarMap::new(), &Device::Cpu, 0)?.detach();
    /// let cond = Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?;
    /// let mut f = model.with_condition(&cond)?;
    /// let s = FlowMatching::new([4, 2])?.sample(3, &mut f, &Device::Cpu, &SampleOptions::seeded(0))?;
    /// assert_eq!(s.x.dims(), &[3, 4, 2]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn with_condition(&self, cond: &Tensor) -> Result<CondConditioned<'_>> {
        self.check_condition(cond, "condition")?;
        Ok(CondConditioned {
            model: self,
            cond: Condition::features(cond.to_device(self.device())?),
        })
    }

    /// Checks that `cond` `[N, *c_dims]` fits this model's continuous condition; `what` (a
    /// flag or file) names it in the error.
    pub fn check_condition(&self, cond: &Tensor, what: &str) -> Result<()> {
        match &self.config.cond_dims {
            None => Err(Error::Shape {
                what: what.to_string(),
                expected: if self.config.num_classes > 0 {
                    format!(
                        "no continuous condition: the model takes class labels (0..{})",
                        self.config.num_classes
                    )
                } else {
                    "no condition: the model was trained without one".to_string()
                },
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
}

fn config_fan_in(config: &VelocityMlpConfig, bias_key: &str) -> usize {
    // A bias shares its layer's fan-in: the first layer reads the input, the others H.
    if bias_key == "net.0.bias" {
        config.input_dim()
    } else {
        config.hidden
    }
}

impl StepFn for VelocityMlp {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.forward(x, t, None)
    }

    // CPU f32 sampling goes through the fused kernels of `crate::model::fast`.
    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let f = FastMlp::new(self, None)?;
        Some(Box::new(f))
    }
}

/// A model with a continuous condition bound to one condition row per sample.
#[derive(Debug, Clone)]
pub struct CondConditioned<'a> {
    /// The model.
    pub model: &'a VelocityMlp,
    /// The condition of every row.
    pub cond: Condition,
}

impl StepFn for CondConditioned<'_> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.model.forward_cond(x, t, Some(&self.cond))
    }

    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let f = FastMlp::with_condition(self.model, &self.cond)?;
        Some(Box::new(f))
    }
}

/// A conditional model bound to one label per row: a step function for conditional sampling.
#[derive(Debug, Clone)]
pub struct Conditioned<'a> {
    /// The model.
    pub model: &'a VelocityMlp,
    /// Labels `[B]`, u32.
    pub labels: Tensor,
}

impl StepFn for Conditioned<'_> {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.model.forward(x, t, Some(&self.labels))
    }

    // As for `VelocityMlp`; the labels must be u32 on the CPU, else the generic path runs.
    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        let labels = self.labels.to_vec1::<u32>().ok()?;
        let f = FastMlp::new(self.model, Some(labels))?;
        Some(Box::new(f))
    }
}

/// Reads a velocity-mlp file: its config from the metadata and every tensor in it (extra keys
/// included), each checked to be float32. See [`read_bytes`] for what is checked.
pub fn read_file(
    path: &Path,
    device: &Device,
) -> Result<(VelocityMlpConfig, HashMap<String, Tensor>)> {
    let bytes = crate::limits::read_input(path)?;
    read_bytes(&bytes, path, device)
}

/// Reads a velocity-mlp file from its bytes (`path` only names it in errors).
///
/// Everything is checked against the header before any tensor is allocated: the metadata
/// sizes parse as integers, `depth` is no larger than the tensors present allow, the shapes
/// implied (checked arithmetic) equal the shapes stored, and safetensors has checked that
/// each stored shape matches its bytes. So the memory used is the file's size once more.
///
/// ```
/// let e = flow_matching::model::read_bytes(b"garbage", "m.safetensors".as_ref(), &candle_core::Device::Cpu)
///     .unwrap_err();
/// assert!(e.to_string().contains("not a valid safetensors file"), "{e}");
/// ```
pub fn read_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(VelocityMlpConfig, HashMap<String, Tensor>)> {
    let bad = |reason: String| Error::ModelFile {
        path: PathBuf::from(path),
        reason,
    };
    let (st, meta) = open_header(bytes, "velocity-mlp", path)?;
    let x_dims = XDims::parse(meta.get("x_dims").map(String::as_str).unwrap_or(""))
        .map_err(|e| bad(format!("metadata x_dims: {e}")))?;
    let hidden = meta_usize(&meta, "hidden", path)?;
    let depth = meta_usize(&meta, "depth", path)?;
    let num_classes = meta_usize(&meta, "num_classes", path)?;
    let cond_dims = match meta.get("cond_dims").map(|s| s.trim()) {
        None | Some("") => None,
        Some(v) => Some(XDims::parse(v).map_err(|e| bad(format!("metadata cond_dims: {e}")))?),
    };
    // The shapes as stored, from the header alone: nothing allocated yet.
    let shapes: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    // depth + 1 layers need 2 (depth + 1) tensors: a larger depth cannot match this file.
    let layers_possible = shapes.len() / 2;
    if depth >= layers_possible.max(1) {
        return Err(bad(format!(
            "metadata depth = {depth}, but the file holds {} tensors: a depth-{depth} model needs {} linear layers",
            shapes.len(),
            depth.saturating_add(1)
        )));
    }
    let dim_of = |key: &str, axis: usize| -> Result<usize> {
        let s = shapes
            .get(key)
            .ok_or_else(|| bad(format!("missing tensor {key:?}")))?;
        s.get(axis).copied().ok_or_else(|| Error::ModelTensorShape {
            path: path.to_path_buf(),
            key: key.to_string(),
            expected: vec![0; axis + 1],
            got: s.clone(),
        })
    };
    let num_freqs = dim_of("time_embed.freqs", 0)?;
    let cond_dim = if num_classes > 0 {
        dim_of("cond_embed.weight", 1)?
    } else if cond_dims.is_some() {
        dim_of("cond_proj.weight", 0)?
    } else {
        0
    };
    let mut config = VelocityMlpConfig {
        x_dims,
        hidden,
        depth,
        num_classes,
        num_freqs,
        cond_dim,
        cond_dims,
        // Read from the tensors once their shapes are checked, below.
        cond_norm: None,
    };
    config
        .validate()
        .map_err(|e| bad(format!("metadata: {e}")))?;
    let (tensors, cond_norm) = load_checked(
        &st,
        &shapes,
        config.expected_shapes(),
        config.cond_dims.is_some(),
        path,
        device,
    )?;
    config.cond_norm = cond_norm;
    Ok((config, tensors))
}
