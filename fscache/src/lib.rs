//! Kernel on-demand read interfaces for wisp: the cachefiles "ondemand" protocol (Linux 5.19+ with
//! CONFIG_CACHEFILES_ONDEMAND) and fanotify pre-content events (Linux 6.14+), both serving one
//! [`backend::Backend`] trait that the daemon implements.
//!
//! * [`proto`]: cachefiles messages and commands as pure data; [`cookie`]: the kernel's cache paths.
//! * [`cachefiles`]: the `/dev/cachefiles` session ([`cachefiles::Device`]).
//! * [`ring`]: the io_uring loop serving a `Device` with a `Backend`.
//! * [`fanotify`]: the pre-content frontend serving the same `Backend`.
//! * [`fdpass`]: handing the session fds to a supervisor and back (SCM_RIGHTS).
//!
//! All unsafe code of this crate lives in the private `sys` module.

pub mod backend;
pub mod cachefiles;
pub mod cookie;
pub mod fanotify;
pub mod fdpass;
pub mod proto;
pub mod ring;

mod pool;
mod sys;

pub use sys::aligned::{AlignedBuf, BLOCK};
