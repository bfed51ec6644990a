//! `config.json` of an action expert: the decoder family and its transformers keys, the in-
//! and out-projections, the attention pattern and the time convention.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::convention::TimeConvention;
use crate::error::{Error, Result};

/// The `format` entry of an action expert's `config.json`.
pub const EXPERT_FORMAT: &str = "flow-expert";

/// The activation of a decoder family's gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x sigmoid(x)` (SwiGLU: Qwen, Llama).
    Silu,
    /// GELU with the tanh approximation (GeGLU: Gemma).
    GeluTanh,
}

/// What distinguishes one decoder family from another; the decoder reads only these, so a
/// new family is one more [`DecoderFamily`] entry with its traits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyTraits {
    /// RMSNorm over each head's queries and keys before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Biases on the query, key and value projections (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm scales by `1 + w` instead of `w` (Gemma).
    pub norm_unit_offset: bool,
    /// The gated MLP's activation.
    pub activation: Activation,
    /// Token embeddings are scaled by `sqrt(hidden_size)` on entry (Gemma).
    pub embed_scale: bool,
}

/// A decoder family the expert can run, named as transformers' `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFamily {
    /// Qwen3 (and the Qwen3-VL text decoder with equal rotary sections): q/k RMSNorm, no biases.
    Qwen3,
    /// Qwen2: q/k/v biases, no q/k norm.
    Qwen2,
}

impl DecoderFamily {
    /// Every family, in the order error messages list them.
    pub const ALL: [DecoderFamily; 2] = [DecoderFamily::Qwen3, DecoderFamily::Qwen2];

    /// The name in `config.json` (`expert.family`).
    pub fn name(self) -> &'static str {
        match self {
            DecoderFamily::Qwen3 => "qwen3",
            DecoderFamily::Qwen2 => "qwen2",
        }
    }

    /// The family's traits.
    pub fn traits(self) -> FamilyTraits {
        let qwen = FamilyTraits {
            qk_norm: false,
            qkv_bias: false,
            norm_unit_offset: false,
            activation: Activation::Silu,
            embed_scale: false,
        };
        match self {
            DecoderFamily::Qwen3 => FamilyTraits {
                qk_norm: true,
                ..qwen
            },
            DecoderFamily::Qwen2 => FamilyTraits {
                qkv_bias: true,
                ..qwen
            },
        }
    }
}

impl std::str::FromStr for DecoderFamily {
    type Err = Error;

    /// Parses a family name (`qwen3`, `qwen2`), listing the known ones when it is not one.
    ///
    /// ```
    /// use flow_matching::model::expert::DecoderFamily;
    /// assert_eq!("qwen2".parse::<DecoderFamily>().unwrap(), DecoderFamily::Qwen2);
    /// let err = "gemma".parse::<DecoderFamily>().unwrap_err().to_string();
    /// assert!(err.contains("qwen3, qwen2"), "{err}");
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s.trim())
            .ok_or_else(|| Error::UnknownName {
                kind: "decoder family",
                name: s.to_string(),
                known: Self::ALL.map(|f| f.name()).join(", "),
            })
    }
}

/// The decoder's shape, under transformers' config keys.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// The family.
    pub family: DecoderFamily,
    /// `hidden_size`: the token width.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`: query heads.
    pub num_attention_heads: usize,
    /// `num_key_value_heads`: key/value heads (grouped-query attention when fewer).
    pub num_key_value_heads: usize,
    /// `head_dim` (default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `intermediate_size`: the gated MLP's width.
    pub intermediate_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta`: the rotary embedding's base.
    pub rope_theta: f64,
}

/// How action values and the time become tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum InProjConfig {
    /// alpamayo's `PerWaypointActionInProjV2`: Fourier features of every value and of t, an
    /// MLP (`encoder.trunk`), a LayerNorm.
    AlpamayoPerWaypointV2 {
        /// The MLP's width.
        hidden_size: usize,
        /// Hidden layers after the first linear layer.
        num_enc_layers: usize,
        /// The highest Fourier frequency (frequencies are log-spaced from 1).
        max_freq: f64,
        /// Features per value (half sines, half cosines).
        num_fourier_feats: usize,
    },
    /// One linear layer over `[values ; t]` per token: `weight` `[hidden, C + 1]`.
    Linear,
}

impl InProjConfig {
    /// The kinds `action_in_proj.kind` may name.
    pub const KINDS: &'static str = "alpamayo_per_waypoint_v2, linear";
}

/// How tokens become velocities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutProjConfig {
    /// `Linear(hidden, C)` with a bias.
    Linear,
}

/// An action expert's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertConfig {
    /// `action_dims` `[L, C]`: action tokens and values per token.
    pub action_dims: [usize; 2],
    /// Which end of time is noise.
    pub time_convention: TimeConvention,
    /// Action tokens see each other both ways (the seed) instead of causally.
    pub non_causal: bool,
    /// The decoder.
    pub decoder: DecoderConfig,
    /// The in-projection.
    pub in_proj: InProjConfig,
    /// The out-projection.
    pub out_proj: OutProjConfig,
}

/// A reader of one JSON object that names the file and the key path in its errors.
struct Reader<'a> {
    path: &'a Path,
    prefix: &'a str,
    obj: &'a Value,
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, reason: impl std::fmt::Display) -> Error {
        Error::ModelFile {
            path: self.path.to_path_buf(),
            reason: format!("{}{key}: {reason}", self.prefix),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn req(&self, key: &str) -> Result<&'a Value> {
        self.get(key)
            .ok_or_else(|| self.err(key, "missing (required)"))
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match (self.get(key), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.err(key, "missing (required)")),
            (Some(v), _) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, format!("expected a positive integer, got {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.err(key, format!("expected a positive number, got {v}"))),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        let v = self.req(key)?;
        v.as_str()
            .ok_or_else(|| self.err(key, format!("expected a string, got {v}")))
    }

    fn object(&self, key: &str, prefix: &'a str) -> Result<Reader<'a>> {
        let v = self.req(key)?;
        if !v.is_object() {
            return Err(self.err(key, format!("expected an object, got {v}")));
        }
        Ok(Reader {
            path: self.path,
            prefix,
            obj: v,
        })
    }
}

impl ExpertConfig {
    /// Reads `config.json` (`path` names the file in errors).
    ///
    /// ```
    /// use flow_matching::model::expert::ExpertConfig;
    /// let text = r#"{"format": "flow-expert", "version": 1, "action_dims": [64, 2],
    ///   "time_convention": "noise_at_1", "non_causal": true,
    ///   "expert": {"family": "qwen2", "hidden_size": 256, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512},
    ///   "action_in_proj": {"kind": "linear"}, "action_out_proj": {"kind": "linear"}}"#;
    /// let cfg = ExpertConfig::parse(text, "config.json".as_ref()).unwrap();
    /// assert_eq!(cfg.decoder.head_dim, 64);
    /// ```
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let r = Reader {
            path,
            prefix: "",
            obj: &root,
        };
        let format = r.str("format")?;
        if format != EXPERT_FORMAT {
            return Err(r.err(
                "format",
                format!("expected {EXPERT_FORMAT:?}, got {format:?}"),
            ));
        }
        let version = r.usize_or("version", Some(1))?;
        if version != 1 {
            return Err(r.err("version", format!("expected 1, got {version}")));
        }
        let dims = r.req("action_dims")?;
        let action_dims = match dims.as_array().map(|a| a.as_slice()) {
            Some([l, c]) => match (l.as_u64(), c.as_u64()) {
                (Some(l), Some(c)) if l > 0 && c > 0 => [l as usize, c as usize],
                _ => return Err(r.err("action_dims", format!("expected [L, C], got {dims}"))),
            },
            _ => {
                return Err(r.err(
                    "action_dims",
                    format!("expected [L, C] (tokens, values per token), got {dims}"),
                ))
            }
        };
        let time_convention: TimeConvention = match r.get("time_convention") {
            None => TimeConvention::NoiseAt0,
            Some(v) => v
                .as_str()
                .ok_or_else(|| r.err("time_convention", format!("expected a string, got {v}")))?
                .parse()?,
        };
        let non_causal = match r.get("non_causal") {
            None => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| r.err("non_causal", format!("expected true or false, got {v}")))?,
        };
        let e = r.object("expert", "expert.")?;
        let family: DecoderFamily = e.str("family")?.parse()?;
        let hidden_size = e.usize_or("hidden_size", None)?;
        let heads = e.usize_or("num_attention_heads", None)?;
        let kv_heads = e.usize_or("num_key_value_heads", Some(heads))?;
        let head_dim = e.usize_or("head_dim", Some(hidden_size / heads.max(1)))?;
        if !heads.is_multiple_of(kv_heads) {
            return Err(e.err(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(e.err(
                "head_dim",
                format!("expected an even number, got {head_dim}"),
            ));
        }
        if let Some(act) = e.get("hidden_act") {
            let want = match family.traits().activation {
                Activation::Silu => "silu",
                Activation::GeluTanh => "gelu_pytorch_tanh",
            };
            if act.as_str() != Some(want) {
                return Err(e.err(
                    "hidden_act",
                    format!("expected {want:?} for family {}, got {act}", family.name()),
                ));
            }
        }
        let decoder = DecoderConfig {
            family,
            hidden_size,
            num_hidden_layers: e.usize_or("num_hidden_layers", None)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            intermediate_size: e.usize_or("intermediate_size", None)?,
            rms_norm_eps: e.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: e.f64_or("rope_theta", 10_000.0)?,
        };
        let ip = r.object("action_in_proj", "action_in_proj.")?;
        let in_proj = match ip.str("kind")? {
            "alpamayo_per_waypoint_v2" => {
                let feats = ip.usize_or("num_fourier_feats", Some(20))?;
                if feats % 2 != 0 {
                    return Err(ip.err(
                        "num_fourier_feats",
                        format!("expected an even number, got {feats}"),
                    ));
                }
                InProjConfig::AlpamayoPerWaypointV2 {
                    hidden_size: ip.usize_or("hidden_size", Some(1024))?,
                    num_enc_layers: ip.usize_or("num_enc_layers", Some(4))?,
                    max_freq: ip.f64_or("max_freq", 100.0)?,
                    num_fourier_feats: feats,
                }
            }
            "linear" => InProjConfig::Linear,
            other => {
                return Err(Error::UnknownName {
                    kind: "action_in_proj kind",
                    name: other.to_string(),
                    known: InProjConfig::KINDS.into(),
                })
            }
        };
        let op = r.object("action_out_proj", "action_out_proj.")?;
        let out_proj = match op.str("kind")? {
            "linear" => OutProjConfig::Linear,
            other => {
                return Err(Error::UnknownName {
                    kind: "action_out_proj kind",
                    name: other.to_string(),
                    known: "linear".into(),
                })
            }
        };
        Ok(ExpertConfig {
            action_dims,
            time_convention,
            non_causal,
            decoder,
            in_proj,
            out_proj,
        })
    }

    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join("config.json");
        let bytes = crate::limits::read_input(&path)?;
        let text = String::from_utf8(bytes).map_err(|_| Error::ModelFile {
            path: path.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        Self::parse(&text, &path)
    }
}

impl ExpertConfig {
    /// The floating-point operations (2 per multiply-add) of one velocity evaluation of
    /// `batch` samples over a prefix of `prefix` tokens: every projection, the attention
    /// scores and their weighted sum (the elementwise work is left out).
    ///
    /// ```
    /// use flow_matching::model::expert::ExpertConfig;
    /// let text = r#"{"format": "flow-expert", "version": 1, "action_dims": [64, 2],
    ///   "time_convention": "noise_at_0", "non_causal": true,
    ///   "expert": {"family": "qwen3", "hidden_size": 256, "num_hidden_layers": 4,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    ///     "intermediate_size": 512},
    ///   "action_in_proj": {"kind": "linear"}, "action_out_proj": {"kind": "linear"}}"#;
    /// let cfg = ExpertConfig::parse(text, "config.json".as_ref()).unwrap();
    /// // 6 x 64 tokens over 1,024 prefix tokens: about 3.5 GFLOP a step.
    /// assert!((cfg.step_flops(6, 1024) / 1e9 - 3.52).abs() < 0.01);
    /// ```
    pub fn step_flops(&self, batch: usize, prefix: usize) -> f64 {
        let [l, c] = self.action_dims;
        let d = &self.decoder;
        let (w, hd, nh, nkv) = (
            d.hidden_size as f64,
            d.head_dim as f64,
            d.num_attention_heads as f64,
            d.num_key_value_heads as f64,
        );
        let ff = d.intermediate_size as f64;
        let toks = (batch * l) as f64;
        let inp = match &self.in_proj {
            InProjConfig::Linear => c as f64 * w,
            InProjConfig::AlpamayoPerWaypointV2 {
                hidden_size,
                num_enc_layers,
                num_fourier_feats,
                ..
            } => {
                let h = *hidden_size as f64;
                let first = (c * num_fourier_feats) as f64 * h;
                first + (*num_enc_layers as f64 - 1.0).max(0.0) * h * h + h * w
            }
        };
        let keys = (prefix + l) as f64;
        let layer = w * (nh + 2.0 * nkv) * hd + nh * hd * w + 3.0 * w * ff + 2.0 * nh * keys * hd;
        2.0 * toks * (inp + d.num_hidden_layers as f64 * layer + w * c as f64)
    }
}
