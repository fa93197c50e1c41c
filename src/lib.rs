//! wisp: containers that start before their image has been downloaded.
//!
//! The binary's modules: `cli` (one module per subcommand), `fswalk` (a directory into an EROFS tree),
//! `object` (the content object: entry, path, padding, verification), `mount` (kernel mounts).

pub mod cli;
pub mod convert;
pub mod daemon;
pub mod fswalk;
pub mod imagefile;
pub mod index;
pub mod mount;
pub mod object;
pub mod oci;
pub mod private_dir;
pub mod progress;
pub mod pull;
pub mod snapshotter;
pub mod store;
pub mod tree;
