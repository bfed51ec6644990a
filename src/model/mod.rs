//! Velocity networks.

mod cond;
pub mod expert;
pub mod fast;
mod file;
mod transformer;
pub mod transformer_fast;
pub mod transformer_grad;
mod velocity_mlp;

pub use cond::{CondNorm, Condition, IntoCondition};
pub use expert::{ActionExpert, PrefixCache};
pub use fast::{loss_and_grads, loss_and_grads_cond, FastMlp};

pub use transformer::{
    file_format, read_transformer_bytes, read_transformer_file, TransformerConditioned,
    TransformerConfig, WaypointTransformer, TRANSFORMER_FORMAT,
};
pub use velocity_mlp::{
    first_non_finite, read_bytes, read_file, CondConditioned, Conditioned, VelocityMlp,
    VelocityMlpConfig,
};
