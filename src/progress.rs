//! Progress bars on stderr (hidden when stderr is not a terminal), for `wisp convert` and `wisp pull`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting bytes.
pub fn bytes(len: u64, what: &str) -> ProgressBar {
    bar(len, what, "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
}

/// A bar counting items.
pub fn count(len: u64, what: &str) -> ProgressBar {
    bar(len, what, "{msg:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
}

fn bar(len: u64, what: &str, template: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    pb.set_message(what.to_string());
    pb
}
