//! Velocity networks.

mod velocity_mlp;

pub use velocity_mlp::{read_file, Conditioned, VelocityMlp, VelocityMlpConfig};
