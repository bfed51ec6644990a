//! Action experts: a decoder (Qwen3, Qwen2, ...) run on action tokens that attend to a VLM's
//! prefix KV cache, the network real flow policies sample with (alpamayo's expert over
//! Qwen3-VL, openpi's and LeRobot's over PaliGemma).
//!
//! A model is a directory with `config.json` ([`ExpertConfig`]) and `model.safetensors` (the
//! seed's module names); the condition is a [`PrefixCache`] (`kv.safetensors`). The expert is
//! a [`StepFn`] in this crate's time convention whatever its own (see
//! [`crate::convention`]), so every solver and schedule runs it as it was trained.

mod config;
mod decoder;
mod fast;
mod in_proj;
mod kv;
mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use config::{
    Activation, DecoderConfig, DecoderFamily, ExpertConfig, FamilyTraits, InProjConfig,
    OutProjConfig, EXPERT_FORMAT,
};
pub use kv::{key_name, value_name, PrefixCache};

use crate::convention::{FlipFast, TimeConvention};
use crate::error::{Error, Result};
use crate::step::{FastVelocity, StepFn};
use fast::{FastExpert, FastRef};
use weights::Weights;

/// An action expert with its current prefix cache.
#[derive(Debug, Clone)]
pub struct ActionExpert {
    cfg: ExpertConfig,
    weights: Weights,
    device: Device,
    /// The packed CPU form, built once at load (`None` off the CPU).
    fast: Option<FastExpert>,
    use_fast: bool,
    cache: Option<PrefixCache>,
}

impl ActionExpert {
    /// Reads `dir/config.json` and `dir/model.safetensors`.
    ///
    /// ```no_run
    /// use candle_core::Device;
    /// use flow_matching::model::expert::{ActionExpert, PrefixCache};
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let mut expert = ActionExpert::load("expert/", &Device::Cpu)?;
    /// expert.set_condition(PrefixCache::load("kv.safetensors")?)?;
    /// let fm = FlowMatching::new(expert.x_dims())?;
    /// let s = fm.sample(6, &mut expert, &Device::Cpu, &SampleOptions::seeded(0))?;
    /// assert_eq!(s.x.dims(), &[6, 64, 2]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ExpertConfig::load(dir)?;
        let weights = Weights::load(&dir.join("model.safetensors"), &cfg, device)?;
        Self::from_parts(cfg, weights, device)
    }

    /// An expert from a config and the bytes of its `model.safetensors` (`path` names the
    /// file in errors).
    pub fn from_bytes(
        cfg: ExpertConfig,
        bytes: &[u8],
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let weights = Weights::from_bytes(bytes, path, &cfg, device)?;
        Self::from_parts(cfg, weights, device)
    }

    fn from_parts(cfg: ExpertConfig, weights: Weights, device: &Device) -> Result<Self> {
        let fast = if device.is_cpu() {
            Some(FastExpert::new(&cfg, &weights)?)
        } else {
            None
        };
        Ok(ActionExpert {
            cfg,
            weights,
            device: device.clone(),
            fast,
            use_fast: true,
            cache: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &ExpertConfig {
        &self.cfg
    }

    /// The shape of one sample, `[L, C]`.
    pub fn x_dims(&self) -> Vec<usize> {
        self.cfg.action_dims.to_vec()
    }

    /// The time convention the model was trained with.
    pub fn time_convention(&self) -> TimeConvention {
        self.cfg.time_convention
    }

    /// Checks a prefix cache against the config: layer count, kv heads and head width.
    pub fn check_condition(&self, cache: &PrefixCache) -> Result<()> {
        let d = &self.cfg.decoder;
        for (what, want, key, got) in [
            (
                "layer count",
                d.num_hidden_layers,
                "num_hidden_layers",
                cache.layers(),
            ),
            (
                "kv heads",
                d.num_key_value_heads,
                "num_key_value_heads",
                cache.kv_heads(),
            ),
            ("head_dim", d.head_dim, "head_dim", cache.head_dim()),
        ] {
            if want != got {
                return Err(Error::PrefixCache {
                    what: what.into(),
                    expected: format!("{want} (the config's {key})"),
                    got: got.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Sets the prefix cache every later sample attends to. On the CPU it is copied into the
    /// packed layout once; a cache of the shape of the one before reuses every buffer (no
    /// allocation, no re-packing of the weights).
    pub fn set_condition(&mut self, cache: PrefixCache) -> Result<()> {
        self.check_condition(&cache)?;
        if let Some(f) = &mut self.fast {
            f.set_cache(&cache);
        }
        self.cache = Some(cache);
        Ok(())
    }

    /// [`Self::set_condition`], by value.
    pub fn with_condition(mut self, cache: PrefixCache) -> Result<Self> {
        self.set_condition(cache)?;
        Ok(self)
    }

    /// The prefix cache set last.
    pub fn condition(&self) -> Option<&PrefixCache> {
        self.cache.as_ref()
    }

    /// Whether sampling on the CPU in f32 takes the fused path (default) or the candle
    /// reference path (tests compare the two).
    pub fn set_fast_path(&mut self, on: bool) {
        self.use_fast = on;
    }

    /// The model's own velocity (its time convention) on the candle reference path: `x`
    /// `[B, L, C]`, `t` one model time per row.
    pub fn velocity(&self, x: &Tensor, t: &[f32]) -> Result<Tensor> {
        let cache = self.cache.as_ref().ok_or_else(|| {
            Error::invalid(
                "prefix cache",
                "none",
                "a prefix cache set with ActionExpert::set_condition",
            )
        })?;
        let [l, c] = self.cfg.action_dims;
        let dims = x.dims();
        if dims.len() != 3 || dims[1] != l || dims[2] != c || dims[0] == 0 {
            return Err(Error::Shape {
                what: "action expert input".into(),
                expected: format!("[B, {l}, {c}] with B > 0"),
                got: dims.to_vec(),
            });
        }
        let b = dims[0];
        if t.len() != b {
            return Err(Error::invalid(
                "times",
                format!("{} values", t.len()),
                format!("one per row ({b})"),
            ));
        }
        let crows = cache.batch();
        if !b.is_multiple_of(crows) {
            return Err(Error::PrefixCache {
                what: "batch (cache rows)".into(),
                expected: format!("1 or a divisor of the {b} samples"),
                got: crows.to_string(),
            });
        }
        let per = b / crows;
        let rows: Vec<usize> = (0..b).map(|i| i / per).collect();
        let dtype = x.dtype();
        let x = x.to_device(&self.device)?.to_dtype(DType::F32)?;
        let tokens = in_proj::forward(&self.cfg, &self.weights, &x, t)?;
        let h = decoder::forward(&self.cfg, &self.weights, &tokens, cache, &rows)?;
        let v = in_proj::linear(
            &h,
            self.weights.get("action_out_proj.weight")?,
            Some(self.weights.get("action_out_proj.bias")?),
        )?;
        Ok(v.to_dtype(dtype)?)
    }
}

impl StepFn for ActionExpert {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let ts = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if ts.len() != b {
            return Err(Error::Shape {
                what: "times".into(),
                expected: format!("[{b}, 1, ..., 1] (one per row)"),
                got: t.dims().to_vec(),
            });
        }
        let conv = self.cfg.time_convention;
        let tm: Vec<f32> = ts.iter().map(|&s| conv.model_time(s)).collect();
        let v = self.velocity(x, &tm)?;
        Ok(match conv {
            TimeConvention::NoiseAt0 => v,
            TimeConvention::NoiseAt1 => v.neg()?,
        }
        .to_device(x.device())?)
    }

    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        if !self.use_fast || self.cache.is_none() {
            return None;
        }
        let conv = self.cfg.time_convention;
        let f: Box<dyn FastVelocity + '_> = Box::new(FastRef(self.fast.as_mut()?));
        Some(match conv {
            TimeConvention::NoiseAt0 => f,
            TimeConvention::NoiseAt1 => Box::new(FlipFast(f)),
        })
    }
}
