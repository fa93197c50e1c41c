//! Property: any valid tree written and read back is the same tree, and the reader's check accepts it.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use erofs::Image;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(tree in gen::tree()) {
        let (img, stats) = write(&tree);
        let image = Image::open(img.as_slice()).unwrap();
        let report = image.check().unwrap_or_else(|e| panic!("check: {e}"));
        prop_assert_eq!(report.inodes, stats.inodes);
        prop_assert_eq!(image.devices().len(), stats.devices.len());
        for (d, s) in image.devices().iter().zip(&stats.devices) {
            prop_assert_eq!(d.digest, Some(s.digest));
            prop_assert_eq!(u64::from(d.blocks), s.size.div_ceil(4096));
        }
        let read = image.read_tree().unwrap();
        assert_same_tree(&tree, &read, &image);
        // Writing the read tree again from the image itself gives the same bytes.
        let mut again = Vec::new();
        let mut src = Image::open(img.as_slice()).unwrap();
        erofs::write_image(&read, &mut src, &mut again, &erofs::WriteOptions::default()).unwrap();
        let image2 = Image::open(again.as_slice()).unwrap();
        image2.check().unwrap();
        assert_same_tree_from(&read, &image2.read_tree().unwrap(), &image2, Some(&image));
    }
}
