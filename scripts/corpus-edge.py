#!/usr/bin/env python3
"""Writes wisp's edge-case OCI image: hand-made layer tars that exercise every layer-merge case.

    scripts/corpus-edge.py OUT_DIR

OUT_DIR becomes an OCI image layout (oci-layout, index.json, blobs/sha256/...) holding two images:
tag "1" (layers 1-5) and tag "gnu-sparse" (the same five layers + layer 6). Only the standard library is used, plus the `zstd` command (Debian package zstd) for the
zstd layer. The output is deterministic: fixed timestamps, gzip with mtime 0, zstd -3 single-threaded.

Layers (docs/corpus.md has the expected merged tree):
  1  PAX tar, gzip          the base: every file type, modes, ids, times, names, xattrs, hard links,
                            duplicate entries, implicit parents, a child before its parent's entry
  2  PAX tar, zstd          changes: whiteouts, opaque dirs, file->dir, dir->file, cross-layer hard
                            link, whiteout of a hard-linked name, same-layer whiteout + re-add
  3  GNU tar, uncompressed  GNU long names/link targets, base-256 numbers, raw non-UTF-8 name,
                            "./" prefixed names, the root directory's own entry
  4  PAX tar, gzip          a PAX 1.0 sparse file (GNU.sparse.major=1; a regular file to readers that
                            know the format)
  5  empty tar, gzip        a layer with no entries
  6  GNU tar, uncompressed  (tag gnu-sparse only) an old-GNU sparse member, typeflag 'S', with an
                            extended sparse header; umoci 0.4.7 (and so tag 1's checks) rejects it
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile

T0 = 1700000000                      # 2023-11-14T22:13:20Z: mtime of everything not about times
CREATED = "2023-11-14T22:13:20Z"
ENC = "utf-8"
ERR = "surrogateescape"              # lets str names carry arbitrary bytes (non-UTF-8 names, xattrs)

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_GZIP = MT_TAR + "+gzip"
MT_ZSTD = MT_TAR + "+zstd"


def b2s(b: bytes) -> str:
    """bytes -> str that tarfile writes back as exactly these bytes."""
    return b.decode(ENC, ERR)


def prng(n: int, seed: str) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def tiny_elf() -> bytes:
    """A static x86-64 ELF executable that exits 0 (so the entrypoint really runs)."""
    code = bytes([0xB8, 0x3C, 0, 0, 0, 0x31, 0xFF, 0x0F, 0x05])   # mov eax,60; xor edi,edi; syscall
    total = 64 + 56 + len(code)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9,
                       2, 0x3E, 1, 0x400000 + 120, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, total, total, 0x1000)
    return ehdr + phdr + code


# security.capability = vfs_cap_data v2: cap_net_bind_service (bit 10), permitted + effective.
CAP_NET_BIND_SERVICE = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 10, 0, 0, 0)


class Tar:
    """A tar stream built entry by entry, in the order given (duplicates allowed)."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.out = io.BytesIO()

    def _data(self, data: bytes):
        self.out.write(data)
        if len(data) % 512:
            self.out.write(b"\0" * (512 - len(data) % 512))

    def add(self, name, kind=tarfile.REGTYPE, data=b"", mode=None, uid=0, gid=0, mtime=T0,
            link="", dev=(0, 0), pax=None, uname="", gname=""):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
        ti.uid, ti.gid, ti.uname, ti.gname = uid, gid, uname, gname
        ti.mtime = mtime
        ti.linkname = link
        ti.devmajor, ti.devminor = dev
        ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        if pax:
            ti.pax_headers = dict(pax)
        self.out.write(ti.tobuf(self.fmt, ENC, ERR))
        if ti.size:
            self._data(data)

    def d(self, name, mode=0o755, **kw):
        self.add(name, tarfile.DIRTYPE, mode=mode, **kw)

    def f(self, name, data=b"", mode=0o644, **kw):
        self.add(name, tarfile.REGTYPE, data=data, mode=mode, **kw)

    def hardlink(self, name, target, **kw):
        self.add(name, tarfile.LNKTYPE, link=target, **kw)

    def symlink(self, name, target, **kw):
        self.add(name, tarfile.SYMTYPE, link=target, mode=0o777, **kw)

    def gnu_sparse(self, name, realsize, chunks, mode=0o644, mtime=T0):
        """An old-GNU sparse member (typeflag 'S'); more than 4 chunks use extension blocks."""
        stored = b"".join(data for _, data in chunks)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(stored), mode, mtime
        hdr = bytearray(ti.tobuf(tarfile.GNU_FORMAT, ENC, ERR))
        assert len(hdr) == 512, "keep sparse names short (no GNU longname block)"

        def num(n, width):
            return b"%0*o\0" % (width - 1, n)

        entries = [num(off, 12) + num(len(data), 12) for off, data in chunks]
        hdr[156:157] = b"S"
        for i in range(4):
            hdr[386 + 24 * i:386 + 24 * (i + 1)] = entries[i] if i < len(entries) else b"\0" * 24
        rest = entries[4:]
        hdr[482:483] = b"\1" if rest else b"\0"
        hdr[483:495] = num(realsize, 12)
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        self.out.write(bytes(hdr))
        while rest:
            block, rest = rest[:21], rest[21:]
            ext = bytearray(512)
            for i, e in enumerate(block):
                ext[24 * i:24 * (i + 1)] = e
            ext[504] = 1 if rest else 0
            self.out.write(bytes(ext))
        self._data(stored)

    def pax_sparse_1_0(self, name, realsize, chunks, mode=0o644, mtime=T0):
        """A PAX sparse member, format 1.0: the map is a text block at the start of the data."""
        d, base = os.path.split(name)
        amap = ("%d\n" % len(chunks) + "".join("%d\n%d\n" % (o, len(b)) for o, b in chunks)).encode()
        amap += b"\0" * (-len(amap) % 512)
        payload = amap + b"".join(b for _, b in chunks)
        self.add(os.path.join(d, "GNUSparseFile.0", base), data=payload, mode=mode, mtime=mtime,
                 pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                      "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)})

    def finish(self) -> bytes:
        self.out.write(b"\0" * 1024)
        return self.out.getvalue()


def sparse_chunks():
    mib = 1 << 20
    return 16 * mib, [
        (0, b"A" * 4096),
        (1 * mib, b"B" * 4096),
        (2 * mib + 512, b"C" * 1000),            # not block aligned
        (5 * mib, prng(65536, "sparse")),
        (8 * mib, b"D" * 4096),
        (12 * mib, b"E" * 8192),
        (16 * mib, b""),                          # GNU tar's marker for a trailing hole
    ]


def layer1() -> bytes:
    t = Tar(tarfile.PAX_FORMAT)
    for d in ["bin", "etc", "data", "wh", "wh/dir-x", "wh/dir-x/sub", "opq", "opq/sub", "d2f",
              "d2f/sub", "hl", "sym", "devs", "modes", "ids", "times", "names", "sizes", "xattr",
              "long", "dup"]:
        t.d(d)
    t.f("bin/wisp-edge", tiny_elf(), 0o755,
        pax={"SCHILY.xattr.security.capability": b2s(CAP_NET_BIND_SERVICE)})
    t.f("etc/hostname", b"edge\n")
    t.f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nbig:x:70000:70001::/data:/bin/wisp-edge\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/wisp-edge\n")
    t.f("etc/group", b"root:x:0:\nbig:x:70001:\nnogroup:x:65534:\n")
    t.f("data/README", b"working directory of the edge image\n")
    # to be whited out / made opaque / replaced in layer 2
    t.f("wh/file-a", b"file-a: deleted by a whiteout in layer 2\n")
    t.f("wh/file-b", b"file-b: becomes a symlink in layer 3\n")
    t.f("wh/keep", b"keep: survives\n")
    t.f("wh/readd", b"readd: old content from layer 1\n")
    t.f("wh/dir-x/one", b"one\n")
    t.f("wh/dir-x/sub/two", b"two\n")
    t.f("opq/a", b"opq/a: hidden by the opaque dir in layer 2\n")
    t.f("opq/b", b"opq/b: hidden by the opaque dir in layer 2\n")
    t.f("opq/sub/c", b"opq/sub/c: hidden by the opaque dir in layer 2\n")
    t.f("f2d", b"f2d: a file that layer 2 replaces with a directory\n")
    t.f("d2f/child1", b"d2f/child1: gone when layer 2 turns d2f into a file\n")
    t.f("d2f/sub/child2", b"d2f/sub/child2: gone too\n")
    # hard links within the layer (a chain: link2 -> link1 -> orig are all one inode)
    t.f("hl/orig", b"hard link payload\n" * 100)
    t.hardlink("hl/link1", "hl/orig")
    t.hardlink("hl/link2", "hl/link1")
    t.f("hl/cross-src", b"linked to from layer 2\n")
    t.f("hl/victim", b"victim: its name is whited out in layer 2, its link survives\n")
    t.hardlink("hl/victim-link", "hl/victim")
    # symlinks
    t.symlink("sym/abs", "/etc/hostname")
    t.symlink("sym/rel", "../etc/hostname")
    t.symlink("sym/dangling", "/does/not/exist")
    t.symlink("sym/dangling-rel", "../nowhere")
    t.symlink("sym/dir", "../hl")
    t.symlink("sym/loop", "loop")
    # device nodes and a fifo
    t.add("devs/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    t.add("devs/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0))
    t.add("devs/fifo", tarfile.FIFOTYPE, mode=0o644)
    # modes
    t.f("modes/setuid", b"#!/bin/sh\n", 0o4755)
    t.f("modes/setgid", b"#!/bin/sh\n", 0o2755)
    t.f("modes/all-bits", b"x\n", 0o7777)
    t.f("modes/none", b"no permissions at all\n", 0o000)
    t.d("modes/sticky", 0o1777)
    t.d("modes/setgid-dir", 0o2775, gid=70001)
    t.d("modes/private", 0o700)
    # ids above 65535: 70000 fits the ustar octal field, 3000000000 needs a PAX uid/gid record
    t.f("ids/big", b"uid 70000 gid 70001\n", uid=70000, gid=70001, uname="big", gname="big")
    t.f("ids/huge", b"uid 3000000000 gid 4000000000\n", uid=3000000000, gid=4000000000)
    t.f("ids/nobody", b"65534\n", uid=65534, gid=65534)
    t.d("ids/big-dir", uid=70000, gid=70001)
    # times
    t.f("times/pre-1970", b"1960-01-01\n", mtime=-315619200)
    t.f("times/epoch", b"1970-01-01\n", mtime=0)
    t.f("times/y2038", b"2038-01-19T03:14:08Z, one past int32\n", mtime=2 ** 31)
    t.f("times/post-2038", b"2100-01-01\n", mtime=4102444800)
    t.f("times/subsecond", b"fractional mtime in PAX\n", mtime=1700000000.5)
    t.symlink("times/old-link", "pre-1970", mtime=-1)
    t.d("times/old-dir", mtime=-315619200)
    # names
    t.f("names/" + "n" * 255, b"a 255-byte name, NAME_MAX\n")
    t.f("names/ünïcødé ☃", b"UTF-8 name\n")
    t.f(b2s(b"names/latin1-\xe9t\xe9"), b"non-UTF-8 name (PAX hdrcharset=BINARY)\n")
    t.f("names/tab\tnewline\nbackslash\\quote\"", b"control characters in a name\n")
    t.f("names/.hidden", b"dot file\n")
    t.f("names/-dash", b"leading dash\n")
    t.f("names/.wh-not-a-whiteout", b"only the exact .wh. prefix is special\n")
    # sizes
    t.f("sizes/empty", b"")
    t.f("sizes/4095", prng(4095, "4095"))
    t.f("sizes/4096", prng(4096, "4096"))
    t.f("sizes/4097", prng(4097, "4097"))
    t.f("sizes/1MiB", prng(1 << 20, "1MiB"))
    t.f("sizes/zeros-64KiB", b"\0" * 65536)
    t.f("sizes/same-as-4096", prng(4096, "4096"))    # same content, other name: one object
    # xattrs (PAX SCHILY.xattr.*); values may be binary
    t.f("xattr/binary", b"has user xattrs, one of them binary\n",
        pax={"SCHILY.xattr.user.wisp.text": "hello",
             "SCHILY.xattr.user.wisp.binary": b2s(bytes(range(256))),
             # an empty PAX value deletes the keyword (POSIX): readers must not set this one
             "SCHILY.xattr.user.wisp.empty": ""})
    t.f("xattr/file", b"has user xattrs\n", pax={"SCHILY.xattr.user.wisp.old": "replaced"})
    t.d("xattr/dir", pax={"SCHILY.xattr.user.wisp.dir": "on a directory"})
    # PAX long names and link targets
    long_dir = "long/" + "d" * 60 + "/" + "e" * 60
    t.d("long/" + "d" * 60)
    t.d(long_dir)
    long_file = long_dir + "/" + "f" * 80
    t.f(long_file, b"a file whose path is longer than 100 (and 155) bytes\n")
    t.symlink("long/pax-symlink", "../" + "x" * 150)
    t.hardlink("long/pax-hardlink", long_file)
    # duplicate entries in one layer: the last one wins
    t.f("dup/file", b"first\n")
    t.f("dup/file", b"second: the last entry wins\n")
    t.d("dup/dir", 0o700)
    t.d("dup/dir", 0o755)
    t.symlink("dup/type", "file")
    t.f("dup/type", b"a regular file replaced an earlier symlink entry of the same layer\n")
    # implicit parents (no entries for implicit/, implicit/a/, implicit/a/b/)
    t.f("implicit/a/b/file", b"parents not in the tar\n")
    # a child before its parent's entry; the parent's entry (mode 0750) comes later
    t.f("late/child", b"listed before its directory\n")
    t.d("late", 0o750)
    return t.finish()


def layer2() -> bytes:
    t = Tar(tarfile.PAX_FORMAT)
    # plain whiteouts: a file, a directory (with contents), a symlink, a hard-linked name, a name
    # that never existed
    t.f("wh/.wh.file-a")
    t.f("wh/.wh.dir-x")
    t.f("sym/.wh.dangling")
    t.f("hl/.wh.victim")
    t.f("wh/.wh.never-existed")
    # same-layer re-add: the new file comes first, its whiteout after; whiteouts apply only to
    # lower layers, so the new content must survive
    t.f("wh/readd", b"readd: new content from layer 2\n")
    t.f("wh/.wh.readd")
    # opaque directory: new child before the marker; the marker hides only lower layers' children
    t.f("opq/new", b"opq/new: the only child after layer 2\n")
    t.f("opq/.wh..wh..opq")
    # opaque marker on a directory that is new in this layer (nothing to hide)
    t.d("newopq")
    t.f("newopq/.wh..wh..opq")
    t.f("newopq/x", b"x\n")
    # a file replaced by a directory, a directory replaced by a file
    t.d("f2d", 0o755)
    t.f("f2d/child", b"f2d is a directory now\n")
    t.f("d2f", b"d2f is a file now\n")
    # a hard link to a file of layer 1
    t.hardlink("hl/cross-link", "hl/cross-src")
    # metadata-only change (mode), and an xattr set replaced
    t.f("etc/hostname", b"edge\n", 0o600)
    t.f("xattr/file", b"has user xattrs\n",
        pax={"SCHILY.xattr.user.wisp.new": "replaced the whole set"})
    t.f("etc/layer2", b"from the zstd layer\n")
    return t.finish()


def layer3() -> bytes:
    t = Tar(tarfile.GNU_FORMAT)
    t.d("./", 0o755)                                   # the root directory's own entry
    t.d("./gnu")
    long_name = "./gnu/long-gnu-name-" + "g" * 180
    t.f(long_name, b"GNU ././@LongLink name (typeflag L)\n")
    t.symlink("./gnu/longlink", "/" + "t" * 200)      # GNU long link target (typeflag K)
    t.hardlink("./gnu/hardlink-to-long", long_name)    # hard link whose target needs a K block
    t.f(b2s(b"./gnu/raw-\xff\xfe-name"), b"non-UTF-8 name as raw bytes in a GNU header\n")
    t.f("./gnu/base256", b"uid/gid/mtime in GNU base-256\n", uid=3000000000, gid=3000000001,
        mtime=-2208988800)                             # 1900-01-01
    # a file replaced by a symlink
    t.symlink("./wh/file-b", "keep")
    t.f("./etc/layer3", b"from the uncompressed GNU layer\n")
    return t.finish()


def layer4() -> bytes:
    t = Tar(tarfile.PAX_FORMAT)
    t.d("pax")
    realsize, chunks = sparse_chunks()
    t.pax_sparse_1_0("pax/sparse-1.0", realsize, chunks[:-1])
    t.f("etc/edge-release", b"wisp edge-case image 1\n")
    return t.finish()


def layer5() -> bytes:
    return Tar(tarfile.PAX_FORMAT).finish()


def layer_gnu_sparse() -> bytes:
    t = Tar(tarfile.GNU_FORMAT)
    realsize, chunks = sparse_chunks()
    t.gnu_sparse("gnu/sparse", realsize, chunks)
    return t.finish()


def zstd(data: bytes) -> bytes:
    exe = shutil.which("zstd")
    if exe:
        return subprocess.run([exe, "-q", "-c", "-3", "-T1", "--no-progress"], input=data,
                              stdout=subprocess.PIPE, check=True).stdout
    try:
        import zstandard  # type: ignore
    except ImportError:
        sys.exit("corpus-edge: needs the zstd command (apt-get install zstd)")
    return zstandard.ZstdCompressor(level=3).compress(data)


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Layout:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def blob(self, data: bytes, media_type: str, annotations=None) -> dict:
        digest = sha(data)
        path = os.path.join(self.root, "blobs", "sha256", digest.split(":")[1])
        with open(path, "wb") as f:
            f.write(data)
        d = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            d["annotations"] = annotations
        return d


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(lay: Layout, tag: str, specs) -> dict:
    layers, diff_ids, history = [], [], []
    for make, mt, what in specs:
        tar = make()
        if mt == MT_GZIP:
            blob = gzip.compress(tar, compresslevel=9, mtime=0)
        elif mt == MT_ZSTD:
            blob = zstd(tar)
        else:
            blob = tar
        layers.append(lay.blob(blob, mt))
        diff_ids.append(sha(tar))
        history.append({"created": CREATED, "created_by": "scripts/corpus-edge.py " + what})
    history.append({"created": CREATED, "created_by": "scripts/corpus-edge.py config",
                    "empty_layer": True})
    config = {
        "created": CREATED,
        "author": "wisp corpus",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "65534:65534",
            "Env": ["PATH=/bin", "WISP_EDGE=1"],
            "Entrypoint": ["/bin/wisp-edge"],
            "Cmd": ["--edge"],
            "WorkingDir": "/data",
            "Labels": {"org.wisp.corpus": "edge"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    cfg = lay.blob(canonical(config), MT_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": cfg,
        "layers": layers,
        "annotations": {"org.opencontainers.image.title": "wisp edge-case image " + tag,
                        "org.opencontainers.image.created": CREATED},
    }
    man = lay.blob(canonical(manifest), MT_MANIFEST, {"org.opencontainers.image.ref.name": tag})
    print(f"corpus-edge: {lay.root}:{tag} manifest {man['digest']}, {len(layers)} layers, "
          f"{sum(l['size'] for l in layers)} bytes compressed", file=sys.stderr)
    return man


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lay = Layout(sys.argv[1])
    specs = [
        (layer1, MT_GZIP, "layer 1: base (PAX, gzip)"),
        (layer2, MT_ZSTD, "layer 2: whiteouts, opaque dirs, type changes (PAX, zstd)"),
        (layer3, MT_TAR, "layer 3: GNU long names and numbers (GNU, uncompressed)"),
        (layer4, MT_GZIP, "layer 4: PAX 1.0 sparse (PAX, gzip)"),
        (layer5, MT_GZIP, "layer 5: empty tar (gzip)"),
    ]
    gnu_sparse = (layer_gnu_sparse, MT_TAR, "layer 6: old GNU sparse, typeflag S (GNU, uncompressed)")
    mans = [build(lay, "1", specs), build(lay, "gnu-sparse", specs + [gnu_sparse])]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": mans}
    index_path = os.path.join(lay.root, "index.json")
    with open(index_path + ".tmp", "w") as f:
        json.dump(index, f, indent=2)
    os.replace(index_path + ".tmp", index_path)


if __name__ == "__main__":
    main()
