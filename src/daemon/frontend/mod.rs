//! The kernel interfaces the daemon serves, one module each.

pub mod cachefiles;
