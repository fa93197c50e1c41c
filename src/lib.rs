//! wisp: containers that start before their image has been downloaded.
//!
//! The library behind the `wisp` binary, one module per concept:
//!
//! - `cli`: command-line parsing, one module per subcommand;
//! - `oci`: image transports (OCI layout directories, registries, docker archives) behind one `Repo`
//!   interface, the node's registry host configuration (mirrors, CAs) and credentials, and the OCI
//!   manifest, index and config documents;
//! - `changeset`: OCI layer tars, parsed member by member and merged onto one EROFS tree;
//! - `convert`: `wisp convert`, a source image into objects in a store and an index image;
//! - `object`: the content object: its entry, compression, `<2 hex>/<64 hex>` path, padding, atomic
//!   writes and verification;
//! - `store`: where converted objects are kept (a directory, or the image's repository);
//! - `index`: the index image (EROFS metadata, object map, prefetch list): build, push, resolve, read;
//! - `pull`: `wisp pull --eager`, an index image and its objects back into a whole tree;
//! - `daemon`: `wisp daemon`, the node daemon that mounts index images and fills objects on demand;
//! - `snapshotter`: `wisp snapshotter`, the containerd proxy snapshotter;
//! - `fswalk`: a local directory into an EROFS tree (`wisp mkfs`);
//! - `imagefile`, `mount`, `private_dir`, `progress`: an EROFS image file as a byte source, kernel
//!   mounts, root-only directories, progress bars.

pub mod changeset;
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
