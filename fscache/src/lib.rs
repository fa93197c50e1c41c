//! Kernel on-demand read interfaces: the cachefiles "ondemand" protocol and fanotify pre-content events.
//! All unsafe code of this crate lives in `sys`.

pub mod cookie;
pub mod proto;
