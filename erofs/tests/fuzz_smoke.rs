//! A short fuzz run inside `cargo test`: valid images, mutated (bit flips, byte splats at interesting
//! places, truncation, field values at their limits), must give errors and never panic, hang or
//! allocate without bound. The long run is `erofs/fuzz/run.sh`.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use erofs::{FileData, Image, Kind};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// What the fuzz target does with one input.
fn exercise(bytes: &[u8]) {
    let Ok(image) = Image::open(bytes) else {
        return;
    };
    let _ = image.check();
    let Ok(tree) = image.read_tree() else { return };
    let mut buf = vec![0u8; 8192];
    for inode in &tree.inodes {
        if let Kind::Regular(FileData::Inline { source, size, .. }) = &inode.kind {
            for off in [0, size.saturating_sub(100), size / 2] {
                let _ = image.read_file_at(*source, off, &mut buf);
            }
        }
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    let interesting: [u64; 9] = [0, 1, 0x7f, 0xff, 0xffff, 0xffff_ffff, u64::MAX, 0x8000_0000_0000_0000, 4096];
    for _ in 0..1 + rng.below(8) {
        if m.is_empty() {
            break;
        }
        match rng.below(6) {
            0 => {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(m.len());
                m[i] = rng.next() as u8;
            }
            2 => {
                // a value at its limit, in the superblock or somewhere in the metadata
                let v = interesting[rng.below(interesting.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                let at = if rng.below(2) == 0 { 1024 + rng.below(128) } else { rng.below(m.len()) };
                for (k, &byte) in v.iter().take(w).enumerate() {
                    if let Some(b) = m.get_mut(at + k) {
                        *b = byte;
                    }
                }
            }
            3 => {
                let n = rng.below(m.len());
                m.truncate(n.max(1100));
            }
            4 => {
                // copy a 32-byte slot over another (inodes, dirents)
                let (a, b) = (rng.below(m.len()) & !31, rng.below(m.len()) & !31);
                for k in 0..32 {
                    if a + k < m.len() && b + k < m.len() {
                        m[b + k] = m[a + k];
                    }
                }
            }
            _ => {
                let i = rng.below(m.len());
                m[i] = 0;
            }
        }
    }
    m
}

#[test]
fn mutated_images_never_panic() {
    let budget =
        Duration::from_secs(std::env::var("WISP_EROFS_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20));
    let mut seeds = vec![write(&sample_tree()).0];
    let mut runner = TestRunner::new(Config::default());
    let strategy = gen::tree();
    while seeds.len() < 8 {
        let tree = strategy.new_tree(&mut runner).unwrap().current();
        let (img, _) = write(&tree);
        if img.len() <= 1 << 20 {
            seeds.push(img);
        }
    }
    for s in &seeds {
        exercise(s);
    }
    let start = Instant::now();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut execs = 0u64;
    while start.elapsed() < budget {
        let seed = &seeds[rng.below(seeds.len())];
        exercise(&mutate(&mut rng, seed));
        execs += 1;
        if execs % 64 == 0 {
            // fully random bytes behind a valid superblock
            let mut r: Vec<u8> = (0..8192 + rng.below(65536)).map(|_| rng.next() as u8).collect();
            r[1024..1152].copy_from_slice(&seeds[0][1024..1152]);
            exercise(&r);
        }
    }
    eprintln!("fuzz smoke: {execs} mutated images in {:?}", start.elapsed());
    assert!(execs > 0);
}
