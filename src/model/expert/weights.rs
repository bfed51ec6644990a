//! `model.safetensors` of an action expert: every tensor the config implies, checked by name
//! and shape when the file is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::{ExpertConfig, InProjConfig, OutProjConfig};
use crate::error::{Error, Result};

/// The tensors of an expert, by the seed's module names.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    path: PathBuf,
    map: HashMap<String, Tensor>,
}

/// The weight names of the in-projection's MLP: `(linear layers, RMSNorm weights)` under
/// `action_in_proj.encoder.trunk.{i}` (Linear, SiLU, then [RMSNorm, Linear, SiLU] per layer,
/// no SiLU after the last).
pub(crate) fn trunk_names(num_enc_layers: usize) -> (Vec<String>, Vec<String>) {
    let p = "action_in_proj.encoder.trunk";
    let lins = std::iter::once(0)
        .chain((0..num_enc_layers).map(|i| 3 + 3 * i))
        .map(|i| format!("{p}.{i}"))
        .collect();
    let norms = (0..num_enc_layers)
        .map(|i| format!("{p}.{}.weight", 2 + 3 * i))
        .collect();
    (lins, norms)
}

impl ExpertConfig {
    /// Every tensor `model.safetensors` must hold for this config, with its shape.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        expected_shapes(self)
    }
}

/// Every tensor `cfg` needs, with its shape.
pub(crate) fn expected_shapes(cfg: &ExpertConfig) -> Vec<(String, Vec<usize>)> {
    let d = &cfg.decoder;
    let tr = d.family.traits();
    let (w, hd) = (d.hidden_size, d.head_dim);
    let (qn, kvn) = (d.num_attention_heads * hd, d.num_key_value_heads * hd);
    let c = cfg.action_dims[1];
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    match &cfg.in_proj {
        InProjConfig::Linear => {
            v.push(("action_in_proj.weight".into(), vec![w, c + 1]));
            v.push(("action_in_proj.bias".into(), vec![w]));
        }
        InProjConfig::AlpamayoPerWaypointV2 {
            hidden_size,
            num_enc_layers,
            num_fourier_feats,
            ..
        } => {
            let (lins, norms) = trunk_names(*num_enc_layers);
            for (i, name) in lins.iter().enumerate() {
                let k = if i == 0 {
                    (c + 1) * num_fourier_feats
                } else {
                    *hidden_size
                };
                let n = if i + 1 == lins.len() { w } else { *hidden_size };
                v.push((format!("{name}.weight"), vec![n, k]));
                v.push((format!("{name}.bias"), vec![n]));
            }
            for name in norms {
                v.push((name, vec![*hidden_size]));
            }
            v.push(("action_in_proj.norm.weight".into(), vec![w]));
            v.push(("action_in_proj.norm.bias".into(), vec![w]));
        }
    }
    for i in 0..d.num_hidden_layers {
        let p = format!("expert.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![w]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![w]));
        for (name, n) in [("q_proj", qn), ("k_proj", kvn), ("v_proj", kvn)] {
            v.push((format!("{p}.self_attn.{name}.weight"), vec![n, w]));
            if tr.qkv_bias {
                v.push((format!("{p}.self_attn.{name}.bias"), vec![n]));
            }
        }
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![w, qn]));
        if tr.qk_norm {
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        let ff = d.intermediate_size;
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, w]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![ff, w]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![w, ff]));
    }
    v.push(("expert.norm.weight".into(), vec![w]));
    match cfg.out_proj {
        OutProjConfig::Linear => {
            v.push(("action_out_proj.weight".into(), vec![c, w]));
            v.push(("action_out_proj.bias".into(), vec![c]));
        }
    }
    v
}

impl Weights {
    /// Reads `path` and checks every tensor `cfg` needs, converting them to f32 on `device`.
    pub(crate) fn load(path: &Path, cfg: &ExpertConfig, device: &Device) -> Result<Self> {
        let bytes = crate::limits::read_input(path)?;
        Self::from_bytes(&bytes, path, cfg, device)
    }

    /// [`Self::load`] from the file's bytes.
    pub(crate) fn from_bytes(
        bytes: &[u8],
        path: &Path,
        cfg: &ExpertConfig,
        device: &Device,
    ) -> Result<Self> {
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let mut map = HashMap::new();
        for (name, shape) in expected_shapes(cfg) {
            let view = st.tensor(&name).map_err(|_| {
                bad(format!(
                    "missing tensor {name:?} (shape {shape:?}, implied by config.json)"
                ))
            })?;
            if view.shape() != shape.as_slice() {
                return Err(Error::ModelTensorShape {
                    path: path.to_path_buf(),
                    key: name,
                    expected: shape,
                    got: view.shape().to_vec(),
                });
            }
            let t = candle_core::safetensors::Load::load(&view, device)?.to_dtype(DType::F32)?;
            if let Some(bad_key) = crate::model::first_non_finite(&[(name.clone(), t.clone())])? {
                return Err(Error::NonFiniteWeights {
                    what: format!("model file {}", path.display()),
                    key: bad_key,
                    action: "refusing to load it".into(),
                });
            }
            map.insert(name, t);
        }
        Ok(Weights {
            path: path.to_path_buf(),
            map,
        })
    }

    /// A tensor the config implies (present: [`Self::load`] checked them all).
    pub(crate) fn get(&self, name: &str) -> Result<&Tensor> {
        self.map.get(name).ok_or_else(|| Error::ModelFile {
            path: self.path.clone(),
            reason: format!("missing tensor {name:?}"),
        })
    }

    /// A tensor as row-major f32.
    pub(crate) fn vec(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.get(name)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
