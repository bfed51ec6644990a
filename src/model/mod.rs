//! Velocity networks.

pub mod fast;
mod velocity_mlp;

pub use fast::{loss_and_grads, FastMlp};

pub use velocity_mlp::{
    first_non_finite, read_bytes, read_file, Conditioned, VelocityMlp, VelocityMlpConfig,
};
