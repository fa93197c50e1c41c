//! A short fuzz run of the tar ingest inside `cargo test`: valid layers (written by the `tar` crate
//! and by GNU tar, with PAX, GNU long names, both sparse formats, links, whiteouts), mutated (bit
//! flips, byte splats, numeric fields at their limits, truncation, layers swapped), merged into one
//! tree and written as an EROFS index. Every input must give `Ok` or an error, never a panic, a hang
//! or an unbounded allocation. The long run is `fuzz/run.sh`; with `WISP_TAR_SEEDS=DIR` the seeds are
//! written there for it.

#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use wisp::convert::layers::{merge_tars_for_fuzzing, split_fuzz_input, FUZZ_LAYER_MARK, FUZZ_LIMITS};

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

fn exercise(input: &[u8]) {
    let layers = split_fuzz_input(input);
    let _ = merge_tars_for_fuzzing(&layers, 64, &FUZZ_LIMITS);
}

fn builder_layer(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    f(&mut b);
    b.into_inner().unwrap()
}

fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    match link {
        Some(l) => b.append_link(&mut h, path, l).unwrap(),
        None => b.append_data(&mut h, path, data).unwrap(),
    }
}

fn pax_layer() -> Vec<u8> {
    builder_layer(|b| {
        b.append_pax_extensions([("SCHILY.xattr.user.x", b"v\n=".as_slice()), ("mtime", b"1.5")]).unwrap();
        add(b, "etc/conf", tar::EntryType::Regular, b"small", None);
        add(b, "usr/lib/big", tar::EntryType::Regular, &[7u8; 300], None);
        add(b, "lib", tar::EntryType::Symlink, b"", Some("usr/lib"));
        add(b, "lib/through-symlink", tar::EntryType::Regular, b"x", None);
        add(b, "hard", tar::EntryType::Link, b"", Some("etc/conf"));
        add(b, &format!("long/{}", "n".repeat(200)), tar::EntryType::Regular, b"long name", None);
        add(b, "fifo", tar::EntryType::Fifo, b"", None);
        add(b, "dir/", tar::EntryType::Directory, b"", None);
        add(b, "dir/keep", tar::EntryType::Regular, b"k", None);
        add(b, "dir/gone", tar::EntryType::Regular, b"g", None);
    })
}

fn whiteout_layer() -> Vec<u8> {
    builder_layer(|b| {
        add(b, "dir/.wh.gone", tar::EntryType::Regular, b"", None);
        add(b, "etc/.wh..wh..opq", tar::EntryType::Regular, b"", None);
        add(b, "etc/new", tar::EntryType::Regular, b"new", None);
        add(b, "usr/lib/big", tar::EntryType::Directory, b"", None);
        add(b, "implicit/a/b/c", tar::EntryType::Regular, &[1u8; 100], None);
    })
}

/// Sparse members as GNU tar writes them (PAX 1.0 and old GNU), when GNU tar is there.
fn gnu_tar_layers() -> Vec<Vec<u8>> {
    let t = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(t.path().join("sparse")).unwrap();
    f.set_len(200_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"data in the middle", 100_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", 199_997).unwrap();
    drop(f);
    let mut out = Vec::new();
    for format in ["posix", "gnu"] {
        let o = Command::new("tar")
            .args(["--sparse", "--numeric-owner", &format!("--format={format}"), "-C"])
            .arg(t.path())
            .args(["-cf", "-", "sparse"])
            .output();
        match o {
            Ok(o) if o.status.success() => out.push(o.stdout),
            _ => eprintln!("GNU tar unavailable: no sparse seeds for --format={format}"),
        }
    }
    out
}

fn seeds() -> Vec<Vec<u8>> {
    let (pax, wh) = (pax_layer(), whiteout_layer());
    let mut seeds = vec![pax.clone(), [pax.as_slice(), FUZZ_LAYER_MARK, &wh].concat()];
    for g in gnu_tar_layers() {
        seeds.push([pax.as_slice(), FUZZ_LAYER_MARK, &g].concat());
        seeds.push(g);
    }
    seeds
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    let numbers: [&[u8]; 7] =
        [b"77777777777", b"00000000000", b"\xff\xff\xff\xff", b"99999999", b"-1", b" ", b"\x80\0\0\0"];
    for _ in 0..1 + rng.below(6) {
        if m.is_empty() {
            break;
        }
        match rng.below(6) {
            0 => {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            1 => {
                // a numeric field of a header (mode, uid, gid, size, mtime, checksum, devices)
                let block = rng.below(m.len() / 512 + 1) * 512;
                let field = [100usize, 108, 116, 124, 136, 148, 329, 337, 483][rng.below(9)];
                let v = numbers[rng.below(numbers.len())];
                for (k, &b) in v.iter().enumerate() {
                    if let Some(x) = m.get_mut(block + field + k) {
                        *x = b;
                    }
                }
            }
            2 => {
                let block = rng.below(m.len() / 512 + 1) * 512;
                if let Some(x) = m.get_mut(block + 156) {
                    *x = b"0125673LKxgS\0"[rng.below(13)];
                }
            }
            3 => m.truncate(rng.below(m.len())),
            4 => {
                let i = rng.below(m.len());
                let n = rng.below(64).min(m.len() - i);
                for x in &mut m[i..i + n] {
                    *x = [0u8, 0xff, b'/', b'.', b'9', b'\n'][rng.below(6)];
                }
            }
            _ => {
                let i = rng.below(m.len());
                let j = rng.below(m.len());
                let n = rng.below(1024).min(m.len() - i.max(j));
                let chunk = m[i..i + n].to_vec();
                m[j..j + n].copy_from_slice(&chunk);
            }
        }
    }
    m
}

fn write_seeds(dir: &Path, seeds: &[Vec<u8>]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
    }
}

#[test]
fn seeds_merge() {
    for (i, s) in seeds().iter().enumerate() {
        let layers = split_fuzz_input(s);
        let r = merge_tars_for_fuzzing(&layers, 64, &FUZZ_LIMITS);
        assert!(r.is_ok(), "seed {i}: {:#}", r.unwrap_err());
    }
}

#[test]
fn mutated_layers_never_panic() {
    let seeds = seeds();
    if let Some(dir) = std::env::var_os("WISP_TAR_SEEDS") {
        write_seeds(Path::new(&dir), &seeds);
    }
    let mut rng = Rng(0x05ee_d7a2);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < Duration::from_secs(8) {
        let seed = &seeds[rng.below(seeds.len())];
        exercise(&mutate(&mut rng, seed));
        runs += 1;
    }
    eprintln!("{runs} mutated inputs");
    assert!(runs > 100, "only {runs} inputs in 8 s");
}
