//! The target side of replication: the applier daemon (`daemon.rs`: accepts sources,
//! journals and applies their records, acknowledges checkpoints), the administration of its
//! directory (`admin.rs`), its configuration file (`config.rs`), the replicas it keeps
//! (`replica/`), where they are by source (`replicas.rs`) and which are open (`registry.rs`).

mod admin;
pub mod config;
mod daemon;
mod demote;
mod failover;
mod registry;
pub mod replica;
pub mod replicas;
pub mod snapshot;

pub use admin::{allow, allowed, attach_image, init, offline_status};
pub use config::{ApplierConfig, ApplierConfigError};
pub use daemon::Applier;
pub use demote::{demote, DemoteOptions, DemoteReport};
pub use failover::{promote_offline, PromoteRequest};

use crate::protocol::framing::LinkError;

/// Errors of the applier's commands and of a source's connection.
#[derive(Debug, thiserror::Error)]
pub enum ApplierError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Permissions(#[from] crate::permissions::PermissionsError),
    #[error(transparent)]
    Config(#[from] ApplierConfigError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Replica(#[from] replica::ReplicaError),
}
