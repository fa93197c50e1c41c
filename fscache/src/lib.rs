//! Kernel on-demand read interfaces: the cachefiles "ondemand" protocol and fanotify pre-content events.
//! All unsafe code of this crate lives in `sys`.

pub mod cachefiles;
pub mod cookie;
pub mod proto;
mod sys;

pub use sys::aligned::{AlignedBuf, BLOCK};
