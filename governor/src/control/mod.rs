//! The control channel between the library and the agent (feature
//! `control`): [`wire`] is the versioned frame format both ends speak,
//! [`link`] the library's end, a background thread.

mod held;
pub mod link;
mod wake;
pub mod wire;

pub use link::{AgentLink, AgentLinkBuilder, LinkConfig, LinkStats};
