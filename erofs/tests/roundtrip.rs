//! Writer -> reader round trips of fixed trees.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use erofs::Image;

#[test]
fn sample_tree_round_trips() {
    let tree = sample_tree();
    let (img, stats) = write(&tree);
    assert_eq!(stats.devices.len(), 1);
    let image = Image::open(img.as_slice()).unwrap();
    let report = image.check().expect("check");
    assert_eq!(report.inodes, stats.inodes);
    let read = image.read_tree().unwrap();
    assert_same_tree(&tree, &read, &image);
}
