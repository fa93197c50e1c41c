#!/usr/bin/env python3
"""Helpers for scripts/corpus (standard library only; zstd layers go through the `zstd` command).

    corpus-tool.py stats LAYOUT TAG NAME OUT.json OUT.contents
        Reads the image's layers, merges them the way OCI says (whiteouts, opaque dirs, type changes,
        hard links), and writes the numbers `scripts/corpus list` shows plus one line per regular
        file of the merged tree: "sha256 size path" (path with backslash escapes).
    corpus-tool.py list STATS.json...
        The table.
    corpus-tool.py share A.contents B.contents
        How many distinct file contents (and bytes) two images have in common.
    corpus-tool.py tree ROOTFS
        The same file numbers, from an unpacked directory (to cross-check the merge against umoci).
    corpus-tool.py check-edge ROOTFS
        Asserts the merged tree of edge:1 (as umoci unpacked it) is what the layers mean.
    corpus-tool.py check-gnu-sparse LAYOUT TAG DIR
        Extracts gnu/sparse from edge:gnu-sparse's last layer with Python's tarfile (which keeps
        holes) into DIR and checks content and holes.
"""
import gzip
import hashlib
import io
import json
import os
import posixpath
import stat
import subprocess
import sys
import tarfile

ENC, ERR = "utf-8", "surrogateescape"


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


def blob_path(layout, digest):
    algo, hexd = digest.split(":", 1)
    return os.path.join(layout, "blobs", algo, hexd)


def manifest_for(layout, tag):
    index = read_json(os.path.join(layout, "index.json"))
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return read_json(blob_path(layout, m["digest"])), m
    sys.exit(f"corpus-tool: no tag {tag} in {layout}")


def layer_tar(layout, desc) -> bytes:
    with open(blob_path(layout, desc["digest"]), "rb") as f:
        raw = f.read()
    mt = desc["mediaType"]
    if mt.endswith("+gzip") or mt.endswith(".tar.gzip"):
        return gzip.decompress(raw)
    if mt.endswith("+zstd"):
        return subprocess.run(["zstd", "-q", "-d", "-c"], input=raw, stdout=subprocess.PIPE,
                              check=True).stdout
    if mt.endswith(".tar") or mt.endswith("diff.tar"):
        return raw
    sys.exit(f"corpus-tool: unknown layer media type {mt}")


def norm(name: str) -> str:
    p = posixpath.normpath("/" + name.lstrip("/")).lstrip("/")
    return "" if p == "." else p


class Node:
    __slots__ = ("kind", "digest", "size")

    def __init__(self, kind, digest=None, size=0):
        self.kind, self.digest, self.size = kind, digest, size


def merge(layout, manifest):
    """OCI layer application on a {path: Node} map."""
    tree = {"": Node("dir")}

    def remove_subtree(p):
        pre = p + "/"
        for k in [k for k in tree if k.startswith(pre)]:
            del tree[k]

    for desc in manifest["layers"]:
        data = layer_tar(layout, desc)
        entries, whiteouts, opaques = {}, [], []
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding=ENC, errors=ERR) as tf:
            for ti in tf:
                p = norm(ti.name)
                parent, base = posixpath.split(p)
                if base == ".wh..wh..opq":
                    opaques.append(parent)
                    continue
                if base.startswith(".wh."):
                    whiteouts.append(posixpath.join(parent, base[4:]))
                    continue
                if ti.isdir():
                    node = Node("dir")
                elif ti.islnk():
                    t = norm(ti.linkname)
                    src = entries.get(t) or tree.get(t)
                    if src is None or src.kind != "reg":
                        sys.exit(f"corpus-tool: hard link {p} -> {t}: no such regular file")
                    node = src
                elif ti.isreg():
                    f = tf.extractfile(ti)
                    h = hashlib.sha256()
                    n = 0
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                        n += len(chunk)
                    node = Node("reg", h.hexdigest(), n)
                elif ti.issym():
                    node = Node("sym")
                else:
                    node = Node("other")
                if p in entries and entries[p].kind == "dir" and node.kind != "dir":
                    pre = p + "/"
                    for k in [k for k in entries if k.startswith(pre)]:
                        del entries[k]
                entries[p] = node
        for d in opaques:
            remove_subtree(d)
        for w in whiteouts:
            tree.pop(w, None)
            remove_subtree(w)
        for p, node in entries.items():
            old = tree.get(p)
            if old is not None and old.kind == "dir" and node.kind != "dir":
                remove_subtree(p)
            # parents: implicit directories, and a non-directory in the way becomes a directory
            q = posixpath.dirname(p)
            while q:
                o = tree.get(q)
                if o is None or o.kind != "dir":
                    tree[q] = Node("dir")
                q = posixpath.dirname(q)
            tree[p] = node
    return tree


def esc(path: str) -> str:
    return path.encode(ENC, ERR).decode("ascii", "backslashreplace").replace("\n", "\\n")


def numbers(files):
    """files: iterable of (digest, size)."""
    files = list(files)
    distinct = {}
    for d, s in files:
        distinct[d] = s
    return {
        "files": len(files),
        "file_bytes": sum(s for _, s in files),
        "distinct_contents": len(distinct),
        "distinct_bytes": sum(distinct.values()),
    }


def cmd_stats(layout, tag, name, out_json, out_contents):
    manifest, mdesc = manifest_for(layout, tag)
    layers = manifest["layers"]
    uncompressed = 0
    for desc in layers:
        uncompressed += len(layer_tar(layout, desc))
    tree = merge(layout, manifest)
    regs = sorted((p, n) for p, n in tree.items() if n.kind == "reg")
    st = {
        "name": name,
        "manifest": mdesc["digest"],
        "layers": len(layers),
        "media_types": sorted({d["mediaType"].rsplit(".", 1)[-1] for d in layers}),
        "compressed_bytes": sum(d["size"] for d in layers),
        "uncompressed_bytes": uncompressed,
        "entries": len(tree),
        "dirs": sum(1 for n in tree.values() if n.kind == "dir"),
        "symlinks": sum(1 for n in tree.values() if n.kind == "sym"),
    }
    st.update(numbers((n.digest, n.size) for _, n in regs))
    with open(out_json, "w") as f:
        json.dump(st, f, indent=1)
    with open(out_contents, "w") as f:
        for p, n in regs:
            f.write(f"{n.digest} {n.size} {esc(p)}\n")


def mb(n):
    return f"{n / 1e6:.1f}"


def cmd_list(paths):
    rows = [read_json(p) for p in paths]
    hdr = ("IMAGE", "LAYERS", "COMPRESSED_MB", "UNCOMPRESSED_MB", "FILES", "FILE_MB", "DISTINCT",
           "DISTINCT_MB", "LAYER_TYPES")
    table = [hdr] + [(r["name"], str(r["layers"]), mb(r["compressed_bytes"]),
                      mb(r["uncompressed_bytes"]), str(r["files"]), mb(r["file_bytes"]),
                      str(r["distinct_contents"]), mb(r["distinct_bytes"]),
                      ",".join(r["media_types"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for row in table:
        print("  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def read_contents(path):
    d = {}
    with open(path) as f:
        for line in f:
            digest, size, _ = line.split(" ", 2)
            d[digest] = int(size)
    return d


def cmd_share(a, b):
    da, db = read_contents(a), read_contents(b)
    common = set(da) & set(db)
    cb = sum(da[d] for d in common)
    print(f"{len(common)} distinct contents shared ({mb(cb)} MB): "
          f"{100 * len(common) / max(1, len(db)):.1f}% of the second image's "
          f"{len(db)} ({100 * cb / max(1, sum(db.values())):.1f}% of its bytes)")


def cmd_tree(root):
    files = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            files.append((h.hexdigest(), st.st_size))
    print(json.dumps(numbers(files)))


def sparse_expected() -> bytes:
    from importlib import util
    spec = util.spec_from_file_location("corpus_edge", os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "corpus-edge.py"))
    edge = util.module_from_spec(spec)
    spec.loader.exec_module(edge)
    realsize, chunks = edge.sparse_chunks()
    want = bytearray(realsize)
    for o, d in chunks:
        want[o:o + len(d)] = d
    return bytes(want)


def cmd_check_edge(root):
    rb = os.fsencode(root)
    fails = []

    def P(rel):
        return os.path.join(rb, rel.encode(ENC, ERR) if isinstance(rel, str) else rel)

    def check(cond, what):
        if not cond:
            fails.append(what)

    def exists(rel):
        return os.path.lexists(P(rel))

    def read(rel):
        with open(P(rel), "rb") as f:
            return f.read()

    def st(rel):
        return os.lstat(P(rel))

    # whiteouts
    check(not exists("wh/file-a"), "wh/file-a whited out")
    check(not exists("wh/dir-x"), "wh/dir-x (a directory) whited out")
    check(exists("wh/keep"), "wh/keep survives")
    check(read("wh/readd") == b"readd: new content from layer 2\n",
          "wh/readd: same-layer whiteout hides only the lower file")
    check(not exists("sym/dangling"), "whiteout of a symlink")
    check(not exists("hl/victim"), "whiteout of a hard-linked name")
    check(exists("hl/victim-link") and st("hl/victim-link").st_nlink == 1,
          "the other name of a whited-out hard link survives")
    check(not exists("wh/.wh.never-existed") and not exists("wh/never-existed"),
          "whiteout of a name that never existed")
    check(not any(n.startswith(b".wh.") for _, ds, fs in os.walk(rb) for n in ds + fs),
          "no .wh.* names in the tree")
    # opaque
    check(sorted(os.listdir(P("opq"))) == [b"new"], f"opq holds only new: {os.listdir(P('opq'))}")
    check(sorted(os.listdir(P("newopq"))) == [b"x"], "opaque marker on a new directory")
    # type changes
    check(stat.S_ISDIR(st("f2d").st_mode) and exists("f2d/child"), "f2d: file replaced by a dir")
    check(stat.S_ISREG(st("d2f").st_mode), "d2f: dir replaced by a file")
    check(os.path.islink(P("wh/file-b")) and os.readlink(P("wh/file-b")) == b"keep",
          "wh/file-b: file replaced by a symlink")
    # hard links
    ino = st("hl/orig").st_ino
    check(st("hl/link1").st_ino == ino and st("hl/link2").st_ino == ino and
          st("hl/orig").st_nlink == 3, "hl/orig, link1, link2 are one inode")
    check(st("hl/cross-link").st_ino == st("hl/cross-src").st_ino, "cross-layer hard link")
    check(st("gnu/hardlink-to-long").st_ino == st("gnu/long-gnu-name-" + "g" * 180).st_ino,
          "hard link to a GNU long name")
    long_file = "long/" + "d" * 60 + "/" + "e" * 60 + "/" + "f" * 80
    check(st("long/pax-hardlink").st_ino == st(long_file).st_ino, "hard link to a PAX long name")
    # symlinks
    for rel, target in [("sym/abs", b"/etc/hostname"), ("sym/rel", b"../etc/hostname"),
                        ("sym/dangling-rel", b"../nowhere"), ("sym/loop", b"loop"),
                        ("long/pax-symlink", b"../" + b"x" * 150),
                        ("gnu/longlink", b"/" + b"t" * 200)]:
        check(os.path.islink(P(rel)) and os.readlink(P(rel)) == target, f"symlink {rel}")
    # devices, fifo
    s = st("devs/null")
    check(stat.S_ISCHR(s.st_mode) and os.major(s.st_rdev) == 1 and os.minor(s.st_rdev) == 3,
          "char device 1:3")
    s = st("devs/loop0")
    check(stat.S_ISBLK(s.st_mode) and os.major(s.st_rdev) == 7 and s.st_gid == 6, "block device 7:0")
    check(stat.S_ISFIFO(st("devs/fifo").st_mode), "fifo")
    # modes and ids
    for rel, mode in [("modes/setuid", 0o4755), ("modes/setgid", 0o2755), ("modes/all-bits", 0o7777),
                      ("modes/none", 0), ("modes/sticky", 0o1777), ("modes/setgid-dir", 0o2775),
                      ("late", 0o750), ("dup/dir", 0o755), ("etc/hostname", 0o600)]:
        check(stat.S_IMODE(st(rel).st_mode) == mode,
              f"{rel} mode {oct(stat.S_IMODE(st(rel).st_mode))} != {oct(mode)}")
    for rel, ids in [("ids/big", (70000, 70001)), ("ids/huge", (3000000000, 4000000000)),
                     ("gnu/base256", (3000000000, 3000000001)), ("ids/big-dir", (70000, 70001))]:
        check((st(rel).st_uid, st(rel).st_gid) == ids, f"{rel} owner")
    # times (ext4 clamps to 1901-12-13..2446; 1900 in the tar becomes -2**31 here)
    for rel, t in [("times/pre-1970", -315619200), ("times/epoch", 0), ("times/y2038", 2 ** 31),
                   ("times/post-2038", 4102444800), ("times/old-dir", -315619200)]:
        check(st(rel).st_mtime == t, f"{rel} mtime {st(rel).st_mtime} != {t}")
    check(st("times/subsecond").st_mtime_ns == 1700000000_500000000, "sub-second mtime")
    # names
    for rel in ["names/" + "n" * 255, "names/ünïcødé ☃", b"names/latin1-\xe9t\xe9",
                "names/tab\tnewline\nbackslash\\quote\"", "names/.wh-not-a-whiteout",
                b"gnu/raw-\xff\xfe-name", long_file]:
        check(exists(rel), f"name {rel!r}")
    # sizes and duplicates
    for rel, n in [("sizes/empty", 0), ("sizes/4095", 4095), ("sizes/4096", 4096),
                   ("sizes/4097", 4097), ("sizes/1MiB", 1 << 20)]:
        check(st(rel).st_size == n, f"{rel} size")
    check(read("dup/file") == b"second: the last entry wins\n", "duplicate entry: last wins")
    check(stat.S_ISREG(st("dup/type").st_mode), "duplicate entry of another type: last wins")
    check(exists("implicit/a/b/file"), "implicit parent directories")
    # xattrs
    x = lambda rel, k: os.getxattr(P(rel), k, follow_symlinks=False)
    check(x("bin/wisp-edge", "security.capability") ==
          bytes.fromhex("0100000200040000000000000000000000000000"), "security.capability")
    check(x("xattr/binary", "user.wisp.binary") == bytes(range(256)), "binary user xattr")
    check(x("xattr/binary", "user.wisp.text") == b"hello", "text user xattr")
    # a PAX record with an empty value deletes the keyword (POSIX pax), so no empty xattr
    check("user.wisp.empty" not in os.listxattr(P("xattr/binary")), "empty PAX xattr = none")
    check(os.listxattr(P("xattr/file")) == ["user.wisp.new"], "xattr set replaced by layer 2")
    check(x("xattr/dir", "user.wisp.dir") == b"on a directory", "xattr on a directory")
    # sparse (PAX 1.0): content must be right; umoci writes it densely
    check(read("pax/sparse-1.0") == sparse_expected(), "PAX 1.0 sparse content")
    check(read("etc/layer3") == b"from the uncompressed GNU layer\n", "uncompressed layer applied")
    check(read("etc/layer2") == b"from the zstd layer\n", "zstd layer applied")
    s = st("pax/sparse-1.0")
    print(f"check-edge: pax/sparse-1.0 size {s.st_size}, allocated {s.st_blocks * 512}")
    if fails:
        for f in fails:
            print("check-edge: FAIL", f)
        sys.exit(1)
    print("check-edge: all edge cases as expected")


def cmd_check_gnu_sparse(layout, tag, outdir):
    manifest, _ = manifest_for(layout, tag)
    data = layer_tar(layout, manifest["layers"][-1])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding=ENC, errors=ERR) as tf:
        ti = tf.getmember("gnu/sparse")
        assert ti.type == tarfile.GNUTYPE_SPARSE, ti.type
        print(f"check-gnu-sparse: typeflag S, {len(ti.sparse)} map entries, size {ti.size}")
        tf.extract(ti, outdir, set_attrs=False)
    p = os.path.join(outdir, "gnu", "sparse")
    s = os.stat(p)
    want = sparse_expected()
    realsize = len(want)
    with open(p, "rb") as f:
        ok = f.read() == want
    print(f"check-gnu-sparse: size {s.st_size}, allocated {s.st_blocks * 512}, content "
          f"{'ok' if ok else 'WRONG'}")
    if not ok or s.st_size != realsize or s.st_blocks * 512 >= realsize:
        sys.exit("check-gnu-sparse: FAIL")


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd, args = a[0], a[1:]
    if cmd == "stats" and len(args) == 5:
        cmd_stats(*args)
    elif cmd == "list":
        cmd_list(args)
    elif cmd == "share" and len(args) == 2:
        cmd_share(*args)
    elif cmd == "tree" and len(args) == 1:
        cmd_tree(args[0])
    elif cmd == "check-edge" and len(args) == 1:
        cmd_check_edge(args[0])
    elif cmd == "check-gnu-sparse" and len(args) == 3:
        cmd_check_gnu_sparse(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
