//! The image of a small fixed tree is pinned by its sha256: output is deterministic (same tree, same
//! bytes) and any change of layout shows up here. If a change is intended, re-check the image with
//! fsck.erofs and a kernel mount, then update the digest.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use sha2::{Digest as _, Sha256};

const GOLDEN_SHA256: &str = "6f2379fe259d40a72a923ec33e796d1917fd3bed43379af0d9952a91c77e196f";

#[test]
fn golden_image_digest() {
    let (img, stats) = write(&sample_tree());
    let (img2, _) = write(&sample_tree());
    assert_eq!(img, img2, "same tree, different bytes");
    assert_eq!(stats.blocks, img.len() as u64 / 4096);
    if let Some(dir) = std::env::var_os("WISP_EROFS_SEEDS") {
        // fuzz seeds (erofs/fuzz/run.sh): this image and a few random ones
        let dir = std::path::Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("sample.erofs"), &img).unwrap();
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for i in 0..6 {
            let tree = gen::tree().new_tree(&mut runner).unwrap().current();
            let (random, _) = write(&tree);
            if random.len() <= 1 << 20 {
                std::fs::write(dir.join(format!("random{i}.erofs")), &random).unwrap();
            }
        }
    }
    let digest = hex::encode(Sha256::digest(&img));
    assert_eq!(digest, GOLDEN_SHA256, "image layout changed ({} bytes)", img.len());
}
