//! Arbitrary bytes as image layers: split at `WISPLAYR` into up to four plain tar layers, merged in
//! order into one tree (whiteouts, hard links, symlinked parents, PAX, GNU long names and sparse
//! members), which is then written as an EROFS index. Every input must end in `Ok` or an error, never
//! a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layers = wisp::convert::layers::split_fuzz_input(data);
    let _ = wisp::convert::layers::merge_tars_for_fuzzing(&layers, 64, &wisp::convert::layers::FUZZ_LIMITS);
});
