#!/usr/bin/env python3
"""wisp benchmark suite (issue 9); run through scripts/bench, which installs and builds what it needs.

Topology (all addresses inside network namespaces, nothing on the host's own interfaces):

  wisp-bench-node             wisp-bench-mid                       wisp-bench-reg
  [veth-n 10.77.1.2] ==veth== [veth-m 10.77.1.1]  ip_forward
   tbf (upload)                tbf (download)   [tun-m] ~relay~ [tun-r 10.77.2.1]  docker-registry :5120

The rate is tbf on both veth ends, the delay (RTT/2 each way) a user-space relay over a TUN pair
(scripts/bench-relay.py; the host kernel has no sch_netem). Bytes are counted on veth-n. The wisp
daemon and skopeo run in the node namespace (nsenter --net only: mounts stay visible on the host).

--vm: the same series inside the vm-tests VM (6.1 kernel, QEMU TCG), where the wisp daemon serves the
kernel through cachefiles on-demand mode. The host fills the registry storage (and records the prefetch
list) as for a native run, then runs this script with --guest inside vm-tests/run. In the guest the
storage is copied to the ext4 /scratch disk, the delay is sch_netem (the guest kernel has it) at the root
of each veth end with the tbf as its child, and mid and reg are joined by a second, unshaped veth pair
instead of the TUN relay. The guest prints its results as one RESULT line; the host writes the report.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# WISP_BENCH_NS: the namespaces' name prefix, so two runs on one machine do not collide (with
# WISP_BENCH_PORT, whose +1 is the host-side registry that fills the storage)
NS_PREFIX = os.environ.get("WISP_BENCH_NS", "wisp-bench")
NS_NODE, NS_MID, NS_REG = NS_PREFIX + "-node", NS_PREFIX + "-mid", NS_PREFIX + "-reg"
REG_IP, NODE_IP = "10.77.2.1", "10.77.1.2"
PORT = int(os.environ.get("WISP_BENCH_PORT", "5120"))     # registry inside wisp-bench-reg
HOST_PORT = PORT + 1                                        # host-side registry used to fill the storage
REG = "%s:%d" % (REG_IP, PORT)
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PY_WORKLOAD = "import json, email; print(1)"


def log(msg):
    print("%s bench: %s" % (time.strftime("%H:%M:%S", time.gmtime()), msg), file=sys.stderr, flush=True)


def sh(*args, check=True, capture=False, **kw):
    if capture:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    r = subprocess.run(list(args), check=False, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed (exit %d)%s" % (" ".join(args), r.returncode,
                                                     (": " + (r.stderr or "").strip()[-2000:]) if capture else ""))
    return r.stdout if capture else r.returncode


def ns(name, *args, **kw):
    return sh("ip", "netns", "exec", name, *args, **kw)


def in_node(*args):
    """argv that runs in the node's network namespace but the host's mount namespace."""
    return ["nsenter", "--net=/run/netns/" + NS_NODE, *args]


def in_reg(*args):
    return ["nsenter", "--net=/run/netns/" + NS_REG, *args]


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---------------------------------------------------------------------------------------------------
# the shaped link


class Link:
    def __init__(self, work, netem=False):
        self.work = work
        self.netem = netem     # delay by sch_netem (in the VM) instead of the user-space relay
        self.relay = None
        self.created = False   # down() deletes only namespaces this object made
        self.stack_ms = None   # netem: the RTT of the guest's own network stack, without delay
        self.one_way_ms = None
        self.rate_mbit = None
        self.rtt_ms = None

    def up(self, rate_mbit, rtt_ms):
        self.down()
        self.created = True
        for n in (NS_NODE, NS_MID, NS_REG):
            sh("ip", "netns", "add", n)
            ns(n, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "veth-n", "netns", NS_NODE, "type", "veth", "peer", "name", "veth-m",
           "netns", NS_MID)
        ns(NS_NODE, "ip", "addr", "add", NODE_IP + "/24", "dev", "veth-n")
        ns(NS_MID, "ip", "addr", "add", "10.77.1.1/24", "dev", "veth-m")
        for n, d in ((NS_NODE, "veth-n"), (NS_MID, "veth-m")):
            # MTU-sized packets through tbf (no TSO/GSO super-packets), like a real link
            ns(n, "ethtool", "-K", d, "tso", "off", "gso", "off", "gro", "off", check=False, capture=True)
            ns(n, "ip", "link", "set", d, "up")
        ns(NS_NODE, "ip", "route", "add", "default", "via", "10.77.1.1")
        ns(NS_MID, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        if self.netem:
            # mid <-> reg: a second veth pair, unshaped (the delay is netem's, on veth-n and veth-m)
            sh("ip", "link", "add", "veth-x", "netns", NS_MID, "type", "veth", "peer", "name", "veth-r",
               "netns", NS_REG)
            ns(NS_MID, "ip", "addr", "add", "10.77.2.2/24", "dev", "veth-x")
            ns(NS_MID, "ip", "link", "set", "veth-x", "up")
            ns(NS_REG, "ip", "addr", "add", REG_IP + "/24", "dev", "veth-r")
            ns(NS_REG, "ip", "link", "set", "veth-r", "up")
        else:
            self._relay(rtt_ms)
            ns(NS_MID, "ip", "addr", "add", "10.77.2.2", "peer", REG_IP, "dev", "tun-m")
            ns(NS_MID, "ip", "link", "set", "tun-m", "up")
            ns(NS_REG, "ip", "addr", "add", REG_IP, "peer", "10.77.2.2", "dev", "tun-r")
            ns(NS_REG, "ip", "link", "set", "tun-r", "up")
        ns(NS_REG, "ip", "route", "add", "10.77.1.0/24", "via", "10.77.2.2")
        self.shape(rate_mbit, rtt_ms)

    def _relay(self, rtt_ms):
        ready = os.path.join(self.work, "relay.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        self.relay_log = open(os.path.join(self.work, "relay.log"), "a")
        # real-time priority: on a loaded machine the relay's scheduling delay would add jitter to the RTT
        rt = ["chrt", "-f", "20"] if shutil.which("chrt") else []
        self.relay = subprocess.Popen([*rt, sys.executable, os.path.join(HERE, "bench-relay.py"), NS_MID, "tun-m",
                                       NS_REG, "tun-r", str(rtt_ms / 2.0), ready],
                                      stdout=self.relay_log, stderr=self.relay_log)
        for _ in range(100):
            if os.path.exists(ready):
                return
            if self.relay.poll() is not None:
                raise RuntimeError("the delay relay exited (see %s/relay.log)" % self.work)
            time.sleep(0.05)
        raise RuntimeError("the delay relay did not start")

    def shape(self, rate_mbit, rtt_ms, one_way_ms=None):
        """Set the rate (tbf both ways) and the delay (restart the relay if it changes). netem only:
        ONE_WAY_MS is netem's delay in each direction (default RTT/2; check_once calibrates it)."""
        if one_way_ms is None:
            self.stack_ms = None
            one_way_ms = rtt_ms / 2.0
        self.one_way_ms = one_way_ms
        if self.rtt_ms is not None and rtt_ms != self.rtt_ms and not self.netem:
            # the TUN devices go with the relay; recreate the whole link
            self.up(rate_mbit, rtt_ms)
            return
        rate = rate_mbit * 1e6
        # burst: 4 ms of traffic, at least a few MTUs; queue: 2x the bandwidth-delay product, >= 64 KB
        burst = max(int(rate / 8 * 0.004), 6000)
        limit = max(int(2 * rate / 8 * rtt_ms / 1000.0), 65536)
        for n, d in ((NS_NODE, "veth-n"), (NS_MID, "veth-m")):
            if self.netem:
                # RTT/2 in netem at the root (a queue that never drops), then the rate: tbf as netem's
                # child, with the same burst and byte queue as below
                ns(n, "tc", "qdisc", "replace", "dev", d, "root", "handle", "1:", "netem", "delay",
                   "%.2fms" % one_way_ms, "limit", "100000")
                ns(n, "tc", "qdisc", "replace", "dev", d, "parent", "1:1", "handle", "10:", "tbf", "rate",
                   "%dbit" % rate, "burst", str(burst), "limit", str(limit))
                continue
            ns(n, "tc", "qdisc", "replace", "dev", d, "root", "tbf", "rate", "%dbit" % rate,
               "burst", str(burst), "limit", str(limit))
        self.rate_mbit, self.rtt_ms = rate_mbit, rtt_ms

    def down(self):
        if self.relay is not None:
            self.relay.terminate()
            try:
                self.relay.wait(5)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
            self.relay = None
        if self.created:
            for n in (NS_NODE, NS_MID, NS_REG):
                if os.path.exists("/run/netns/" + n):
                    sh("ip", "netns", "del", n, check=False)
            self.created = False
        self.rate_mbit = self.rtt_ms = None

    @staticmethod
    def counters():
        """(rx, tx) bytes of the node's veth."""
        out = json.loads(ns(NS_NODE, "ip", "-j", "-s", "link", "show", "dev", "veth-n", capture=True))
        s = out[0]["stats64"]
        return s["rx"]["bytes"], s["tx"]["bytes"]

    def check(self, tries=3):
        """The link check, again up to TRIES times (a busy machine can disturb one measurement)."""
        for i in range(tries):
            try:
                return self.check_once()
            except RuntimeError as e:
                if i == tries - 1:
                    raise
                log("%s; measuring again" % e)
        raise AssertionError

    def check_once(self, size_bytes=None):
        """Measure the RTT (TCP connects) and a timed download through the link; fail if they are off."""
        www = os.path.join(self.work, "www")
        os.makedirs(www, exist_ok=True)
        rate = self.rate_mbit * 1e6
        size = size_bytes or int(rate / 8 * 6)    # about 6 s of traffic
        with open(os.path.join(www, "blob"), "wb") as f:
            f.write(os.urandom(size))
        with open(os.path.join(www, "small"), "wb") as f:
            f.write(b"x")
        srv = subprocess.Popen(in_reg(sys.executable, "-m", "http.server", "--bind", REG_IP, "--directory", www,
                                      str(PORT + 9)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = "http://%s:%d/blob" % (REG_IP, PORT + 9)
            small = "http://%s:%d/small" % (REG_IP, PORT + 9)
            for _ in range(100):
                r = subprocess.run(in_node("curl", "-s", "-o", "/dev/null", "--max-time", "2", small))
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            def connects():
                conn = []
                for _ in range(7):
                    out = sh(*in_node("curl", "-s", "-o", "/dev/null", "-w", "%{time_connect}", small),
                             capture=True)
                    conn.append(float(out) * 1000)
                    time.sleep(0.05)
                return conn

            if self.netem and self.stack_ms is None:
                # In the VM (QEMU TCG) the guest's own network stack, three namespaces and curl take
                # about 10 ms per round trip, where the host takes under 1 ms. Measure it with no delay
                # and give netem the rest, so that the node sees the RTT that was set.
                self.shape(self.rate_mbit, self.rtt_ms, one_way_ms=0)
                self.stack_ms = statistics.median(connects())
                self.shape(self.rate_mbit, self.rtt_ms, one_way_ms=max(0.0, (self.rtt_ms - self.stack_ms) / 2))
                log("guest stack RTT without delay %.1f ms: netem delay %.2f ms each way" % (
                    self.stack_ms, self.one_way_ms))
            conn = connects()
            rx0, tx0 = self.counters()
            t = time.monotonic()
            out = sh(*in_node("curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url), capture=True)
            dt = time.monotonic() - t
            rx1, tx1 = self.counters()
        finally:
            srv.terminate()
            srv.wait()
        got = int(out)
        res = {"rate_mbit": self.rate_mbit, "rtt_ms": self.rtt_ms, "rtt_measured_ms": statistics.median(conn),
               "rtt_samples_ms": [round(c, 2) for c in conn], "download_bytes": got, "download_seconds": dt,
               "goodput_mbit": got * 8 / dt / 1e6, "veth_rx_bytes": rx1 - rx0, "veth_tx_bytes": tx1 - tx0}
        res["goodput_ratio"] = res["goodput_mbit"] / self.rate_mbit
        if self.netem:
            res["stack_rtt_ms"], res["netem_one_way_ms"] = self.stack_ms, self.one_way_ms
        log("link check: RTT %.1f ms (set %d), download %.1f MB in %.2f s = %.2f Mbit/s (%.0f %% of %g), "
            "veth rx %.1f MB" % (res["rtt_measured_ms"], self.rtt_ms, got / 1e6, dt, res["goodput_mbit"],
                                 100 * res["goodput_ratio"], self.rate_mbit, res["veth_rx_bytes"] / 1e6))
        ok = (abs(res["rtt_measured_ms"] - self.rtt_ms) <= max(3, 0.15 * self.rtt_ms)
              and 0.85 <= res["goodput_ratio"] <= 1.02 and got == size)
        if not ok:
            raise RuntimeError("the shaped link is off: %s" % json.dumps(res))
        return res


# ---------------------------------------------------------------------------------------------------
# the registry inside wisp-bench-reg


class Registry:
    def __init__(self, work):
        self.root = os.path.join(work, "registry")
        self.conf = os.path.join(work, "registry.yml")
        self.logf = os.path.join(work, "registry-ns.log")
        self.proc = None

    def fill(self, wisp, images, prefetch=(), nydus_bin=None, work=None):
        """Push the corpus images and their wisp conversions into the storage (host-side registry).
        For each (image, workload) in PREFETCH, also record a prefetch list and push IMAGE-prefetch."""
        sh(os.path.join(HERE, "registry"), "start", "--port", str(HOST_PORT), "--root", self.root)
        try:
            fams = sorted({i.split(":")[0] for i in images} - set(BENCH_IMAGES))
            if fams:
                sh(os.path.join(HERE, "corpus"), "push", "--registry", "127.0.0.1:%d" % HOST_PORT, *fams,
                   stdout=sys.stderr)
            if any(i.split(":")[0] in BENCH_IMAGES for i in images):
                sh(os.path.join(HERE, "bench-images"), "push", "127.0.0.1:%d" % HOST_PORT, stdout=sys.stderr)
            conv = {}
            for i in images:
                out = sh(wisp, "convert", "docker://127.0.0.1:%d/%s" % (HOST_PORT, i),
                         "docker://127.0.0.1:%d/wisp/%s" % (HOST_PORT, i), "--plain-http", "--json", capture=True)
                conv[i] = json.loads(out)
            for i, w in prefetch:
                conv[prefetch_tag(i, w)] = record_prefetch(wisp, i, w, self.root + "-profile")
            if nydus_bin:
                for i in images:
                    conv["nydus:" + i] = prepare_nydus(nydus_bin, i, work)
                    log("nydus image of %s: blob %.1f MB, bootstrap %.2f MB (gzip %.2f MB), nydus-image %.1f s" % (
                        i, conv["nydus:" + i]["blob_bytes"] / 1e6, conv["nydus:" + i]["bootstrap_bytes"] / 1e6,
                        conv["nydus:" + i]["bootstrap_gz_bytes"] / 1e6, conv["nydus:" + i]["create_s"]))
            return conv
        finally:
            sh(os.path.join(HERE, "registry"), "stop", "--port", str(HOST_PORT), check=False)

    def start(self):
        with open(self.conf, "w") as f:
            f.write("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n"
                    "  redirect:\n    disable: true\nhttp:\n  addr: %s\n  secret: wisp-bench\n" % (self.root, REG))
        self.proc = subprocess.Popen(in_reg("docker-registry", "serve", self.conf), stdout=open(self.logf, "a"),
                                     stderr=subprocess.STDOUT)
        for _ in range(200):
            r = subprocess.run(in_node("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                                       "http://%s/v2/" % REG), capture_output=True, text=True)
            if r.stdout == "200":
                return
            time.sleep(0.1)
        raise RuntimeError("registry in %s does not answer (log %s)" % (NS_REG, self.logf))

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------------------------------
# workloads: (argv in the container, env, how "first useful output" is recognized)

WORKLOADS = {
    "python-import": {"image": "python", "desc": "python3 -c 'import json, email; print(1)'",
                      "argv": ["python3", "-c", PY_WORKLOAD], "http": False},
    "python-http": {"image": "python", "desc": "python app entrypoint answers one HTTP request",
                    "argv": ["python3", "/app/main.py"], "http": True},
    "node-http": {"image": "node", "desc": "node app entrypoint answers one HTTP request",
                  "argv": ["node", "/app/server.js"], "http": True},
    "small-files": {"image": "python", "desc": "read 1000 random files of 1 B-64 KiB (fixed seed)",
                    "files": 1000, "http": False},
    "big-read": {"image": "bigfile", "desc": "read a 500 MiB file sequentially (first output: its first MiB)",
                 "read": "data/big.bin", "http": False},
    "pysci-import": {"image": "pysci", "desc": "python3 -c 'import json, email; print(1)' in pysci:v1 "
                     "(python3 + numpy, scipy, pandas: a larger image)",
                     "argv": ["python3", "-c", PY_WORKLOAD], "http": False},
    "numpy-import": {"image": "pysci", "desc": "python3 -c 'import numpy; print(numpy.arange(3).sum())' in pysci:v1",
                     "argv": ["python3", "-c", "import numpy; print(numpy.arange(3).sum())"], "expect": "3",
                     "http": False},
    "gcc-hello": {"image": "gcc", "desc": "gcc compiles hello.c, then runs it",
                  "argv": ["sh", "-c", "printf '%s\\n' '#include <stdio.h>' 'int main(void) { puts(\"hello\"); return 0; }' "
                           ">/tmp/hello.c && gcc -O0 -o /tmp/hello /tmp/hello.c && /tmp/hello"],
                  "expect": "hello", "http": False},
}
BENCH_IMAGES = ("gcc", "bigfile", "pysci")   # built by scripts/bench-images, not the corpus
SMALL_FILES = []


def small_files(image):
    """1000 regular files of 1 B-64 KiB from the corpus image's content list, fixed seed."""
    if not SMALL_FILES:
        import random
        env = dict(l.split("=", 1) for l in sh(os.path.join(HERE, "corpus"), "env", capture=True).split())
        fam, tag = image.split(":")
        cands = []
        with open(os.path.join(env["WISP_CORPUS_DIR"], "stats", "%s_%s.contents" % (fam, tag))) as f:
            for line in f:
                _, size, path = line.rstrip("\n").split(" ", 2)
                if 0 < int(size) <= 65536:
                    cands.append(path)
        cands.sort()
        SMALL_FILES.extend(random.Random(9).sample(cands, WORKLOADS["small-files"]["files"]))
    return SMALL_FILES
APP_PORT = 18000 + PORT % 1000   # the app's port: per run, since profiling runs use the host's namespace


def run_workload(root, name, t0):
    """Run the workload chrooted in ROOT; return (seconds to first useful output, seconds to exit)."""
    w = WORKLOADS[name]
    env = ["env", "-i", PATH_ENV, "HOME=/root", "LC_ALL=C.UTF-8", "HOST=127.0.0.1", "PORT=%d" % APP_PORT,
           "APP_REQUESTS=1", "PYTHONUNBUFFERED=1"]
    if w.get("read"):
        first = None
        with open(os.path.join(root, w["read"]), "rb", buffering=0) as f:
            while True:
                b = f.read(1 << 20)
                if first is None:
                    first = time.monotonic() - t0
                if not b:
                    break
        return first, time.monotonic() - t0
    if w.get("files"):
        n = 0
        for rel in small_files("python:v1"):
            with open(os.path.join(root, rel), "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
            n += 1
        first = end = time.monotonic() - t0
        return first, end
    if w["http"]:
        cmd = ["chroot", "--userspec=1000:1000", root, *env, *w["argv"]]
        os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/")
        first = None
        while first is None:
            r = subprocess.run(["curl", "-s", "--max-time", "30", "http://127.0.0.1:%d/" % APP_PORT],
                               capture_output=True, text=True)
            if r.returncode == 0 and '"version"' in r.stdout:
                first = time.monotonic() - t0
                break
            if p.poll() is not None:
                raise RuntimeError("%s exited with %s before answering" % (name, p.returncode))
            time.sleep(0.02)
        p.stdout.read()
        rc = p.wait(120)
    else:
        cmd = ["chroot", root, *env, *w["argv"]]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        first = time.monotonic() - t0
        if line.strip() != w.get("expect", "1"):
            raise RuntimeError("%s printed %r (stderr %s)" % (name, line, p.stderr.read()[-500:]))
        p.stdout.read()
        rc = p.wait(600)
    end = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError("%s exited %d" % (name, rc))
    return first, end


def mount_overlay(lower, base):
    for d in ("upper", "work", "root"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    sh("mount", "-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s/upper,workdir=%s/work" % (lower, base, base),
       os.path.join(base, "root"))
    return os.path.join(base, "root")


def run_on_overlay(lower, d, workload, t0):
    """The container's writable layer: an overlay over LOWER (under D), the workload in it, unmounted after."""
    root = mount_overlay(lower, os.path.join(d, "ov-%d" % int(time.monotonic() * 1000)))
    try:
        return run_workload(root, workload, t0)
    finally:
        sh("umount", root)


class Baseline:
    """Full pull over the link (skopeo), unpack (umoci: every layer applied, whiteouts included), overlay
    mount (the container's writable layer), then the workload."""
    name = "baseline"

    def __init__(self, work):
        self.work = work
        self.dir = None

    def fresh(self):
        self.dir = tempfile.mkdtemp(prefix="baseline-", dir=self.work)

    def start(self, image, workload, t0, pulled=False):
        d = self.dir
        phases = {}
        oci = os.path.join(d, "oci")
        bundle = os.path.join(d, "bundle-" + image.replace(":", "-"))
        if not pulled:
            sh(*in_node("skopeo", "copy", "-q", "--src-tls-verify=false", "docker://%s/%s" % (REG, image),
                        "oci:%s:%s" % (oci, image.replace(":", "-"))))
            phases["pull"] = time.monotonic() - t0
            sh("umoci", "unpack", "--image", "%s:%s" % (oci, image.replace(":", "-")), bundle, stdout=subprocess.DEVNULL)
            phases["unpack"] = time.monotonic() - t0
        phases["mount"] = time.monotonic() - t0
        first, end = run_on_overlay(os.path.join(bundle, "rootfs"), d, workload, t0)
        return first, end, phases, {}

    def cleanup(self):
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class Wisp:
    """`wisp mount` through the daemon (index over the link, files on demand), then the workload."""
    name = "wisp"

    def tag(self, image, workload):
        """The wisp index image this system mounts for IMAGE and WORKLOAD (repository wisp/...)."""
        return image

    def __init__(self, work, wisp, daemon_args=()):
        self.work = work
        self.wisp = wisp
        self.daemon_args = list(daemon_args)
        self.dir = None
        self.daemon = None

    def fresh(self):
        self.stop()
        self.dir = tempfile.mkdtemp(prefix="wisp-", dir=self.work)
        self.state = os.path.join(self.dir, "state")
        self.daemon_log = open(os.path.join(self.dir, "daemon.log"), "a")
        self.daemon = subprocess.Popen(in_node(self.wisp, "daemon", "--cache", os.path.join(self.dir, "cache"),
                                               "--state", self.state, *self.daemon_args), stdout=self.daemon_log,
                                       stderr=self.daemon_log)
        sock = os.path.join(self.state, "control.sock")
        for _ in range(200):
            if os.path.exists(sock):
                return
            if self.daemon.poll() is not None:
                raise RuntimeError("wisp daemon exited (log %s/daemon.log)" % self.dir)
            time.sleep(0.05)
        raise RuntimeError("wisp daemon did not start")

    def start(self, image, workload, t0, pulled=False):
        mnt = os.path.join(self.dir, "mnt-" + image.replace(":", "-"))
        os.makedirs(mnt, exist_ok=True)
        sh(self.wisp, "mount", "docker://%s/wisp/%s" % (REG, self.tag(image, workload)), mnt, "--plain-http", "--state", self.state)
        phases = {"mount": time.monotonic() - t0}
        try:
            first, end = run_workload(mnt, workload, t0)
        finally:
            stats = json.loads(sh(self.wisp, "stats", "--json", "--state", self.state, capture=True))
            sh(self.wisp, "umount", mnt, "--state", self.state)
        return first, end, phases, stats

    def log_tail(self):
        try:
            with open(os.path.join(self.dir, "daemon.log"), errors="replace") as f:
                return "".join(f.readlines()[-8:])
        except OSError:
            return ""

    def stop(self):
        if self.daemon is not None:
            self.daemon.terminate()
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None

    def cleanup(self):
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


NYDUS_REPO = "nydus/"   # Nydus images live in repositories nydus/FAMILY (bootstrap + one data blob)


def push_blob(repo, path):
    """Monolithic blob upload into the host-side registry; returns the digest."""
    import hashlib
    import http.client
    import urllib.parse
    h = hashlib.sha256()
    with open(path, "rb") as f:
        data = f.read()
    h.update(data)
    digest = "sha256:" + h.hexdigest()
    c = http.client.HTTPConnection("127.0.0.1", HOST_PORT, timeout=600)
    c.request("POST", "/v2/%s/blobs/uploads/" % repo)
    r = c.getresponse()
    r.read()
    loc = r.getheader("Location")
    if r.status != 202 or not loc:
        raise RuntimeError("blob upload to %s refused: %d" % (repo, r.status))
    u = urllib.parse.urlsplit(loc)
    q = (u.query + "&" if u.query else "") + "digest=" + digest
    c.request("PUT", "%s?%s" % (u.path, q), body=data, headers={"Content-Type": "application/octet-stream"})
    r = c.getresponse()
    r.read()
    if r.status != 201:
        raise RuntimeError("blob upload to %s failed: %d" % (repo, r.status))
    return digest


def source_layout(image):
    """(OCI layout, tag) of a corpus or bench image."""
    fam, tag = image.split(":")
    if fam in BENCH_IMAGES:
        env = dict(l.split("=", 1) for l in sh(os.path.join(HERE, "bench-images"), "env", capture=True).split())
        return env["WISP_BENCH_IMAGES"], "%s-%s" % (fam, tag)
    env = dict(l.split("=", 1) for l in sh(os.path.join(HERE, "corpus"), "env", capture=True).split())
    return os.path.join(env["WISP_CORPUS_OCI"], fam), tag


def prepare_nydus(nydus_bin, image, work):
    """IMAGE as a Nydus image: its flattened root file system (umoci unpack) through `nydus-image create`
    (RAFS v6, zstd, nydus-image's default 1 MiB chunks) into a bootstrap and one data blob, both pushed as
    blobs of NYDUS_REPO+FAMILY; the bootstrap gzip-compressed, as nydusify ships it in a tar.gz layer.
    (nydusify, the Go converter, makes one blob per layer; one blob per image is a simplification that
    does not change what a cold start reads.)"""
    layout, tag = source_layout(image)
    d = tempfile.mkdtemp(prefix="nydus-conv-", dir=work)
    try:
        bundle = os.path.join(d, "bundle")
        sh("umoci", "unpack", "--image", "%s:%s" % (layout, tag), bundle, stdout=subprocess.DEVNULL)
        blobs, boot = os.path.join(d, "blobs"), os.path.join(d, "bootstrap")
        os.makedirs(blobs)
        t = time.monotonic()
        sh(os.path.join(nydus_bin, "nydus-image"), "create", "--fs-version", "6", "--compressor", "zstd",
           "--bootstrap", boot, "--blob-dir", blobs, "--log-level", "warn", os.path.join(bundle, "rootfs"),
           stdout=subprocess.DEVNULL)
        secs = time.monotonic() - t
        [blob] = os.listdir(blobs)
        sh("gzip", "-n", "-k", boot)
        repo = NYDUS_REPO + image.split(":")[0]
        bd, bootd = push_blob(repo, os.path.join(blobs, blob)), push_blob(repo, boot + ".gz")
        if bd != "sha256:" + blob:
            raise RuntimeError("nydus blob %s has digest %s" % (blob, bd))
        return {"repo": repo, "blob": bd, "bootstrap_gz": bootd, "blob_bytes": os.path.getsize(os.path.join(blobs, blob)),
                "bootstrap_bytes": os.path.getsize(boot), "bootstrap_gz_bytes": os.path.getsize(boot + ".gz"),
                "create_s": secs}
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Nydus:
    """Nydus: the bootstrap over the link (curl, gunzip), nydusd 2.4 in FUSE mode on it with the registry
    backend and a blobcache (data chunks fetched on demand), an overlay on top, then the workload.
    amplify_io None: nydusd's defaults (amplify_io 1 MiB, no prefetch); 0: read amplification off."""

    def __init__(self, work, nydus_bin, images, amplify_io=None):
        self.name = "nydus" if amplify_io is None else "nydus-amplify%d" % amplify_io
        self.work, self.bin, self.images, self.amplify_io = work, nydus_bin, images, amplify_io
        self.dir = None
        self.procs = []

    def fresh(self):
        self.cleanup()
        self.dir = tempfile.mkdtemp(prefix=self.name + "-", dir=self.work)

    def start(self, image, workload, t0, pulled=False):
        n = self.images[image]
        d = self.dir
        tag = image.replace(":", "-")
        boot = os.path.join(d, "bootstrap-" + tag)
        sh(*in_node("curl", "-sSf", "-o", boot + ".gz", "http://%s/v2/%s/blobs/%s" % (REG, n["repo"], n["bootstrap_gz"])))
        sh("gunzip", "-f", boot + ".gz")
        phases = {"bootstrap": time.monotonic() - t0}
        cfg = {"device": {"backend": {"type": "registry", "config": {"scheme": "http", "host": REG, "repo": n["repo"]}},
                          "cache": {"type": "blobcache", "config": {"work_dir": os.path.join(d, "cache")}}},
               "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True}
        if self.amplify_io is not None:
            cfg["amplify_io"] = self.amplify_io
        os.makedirs(os.path.join(d, "cache"), exist_ok=True)
        conf = os.path.join(d, "nydusd-%s.json" % tag)
        with open(conf, "w") as f:
            json.dump(cfg, f)
        mnt = os.path.join(d, "mnt-" + tag)
        os.makedirs(mnt, exist_ok=True)
        logf = open(os.path.join(d, "nydusd.log"), "a")
        self.procs.append((subprocess.Popen(in_node(os.path.join(self.bin, "nydusd"), "--config", conf, "--mountpoint",
                                                    mnt, "--bootstrap", boot, "--log-level", "warn",
                                                    # raising the hard RLIMIT_NOFILE is refused here (EPERM)
                                                    "--rlimit-nofile", "0"),
                                            stdout=logf, stderr=logf), mnt))
        while not os.path.ismount(mnt):
            if self.procs[-1][0].poll() is not None:
                raise RuntimeError("nydusd exited (log %s/nydusd.log)" % d)
            if time.monotonic() - t0 > 120:
                raise RuntimeError("nydusd did not mount within 120 s")
            time.sleep(0.01)
        phases["mount"] = time.monotonic() - t0
        first, end = run_on_overlay(mnt, d, workload, t0)
        return first, end, phases, {}

    def log_tail(self):
        try:
            with open(os.path.join(self.dir, "nydusd.log"), errors="replace") as f:
                return "".join(f.readlines()[-8:])
        except (OSError, TypeError):
            return ""

    def cleanup(self):
        for p, mnt in self.procs:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# wisp+prefetch runs the application starts, each with the list recorded from that workload in its own
# index image (wisp/IMAGE-prefetch-WORKLOAD); not the synthetic reads (small-files, big-read)
PREFETCH_WORKLOADS = ("python-import", "python-http", "node-http", "gcc-hello", "pysci-import", "numpy-import")


def prefetch_tag(image, workload):
    return "%s-prefetch-%s" % (image, workload)


def record_prefetch(wisp, image, workload, work):
    """The profiling run of wisp+prefetch, unshaped, on the host against the host-side registry: a cold
    mount of wisp/IMAGE, the workload, `wisp stats --accessed`, then `wisp convert --prefetch` of the
    source image into wisp/IMAGE-prefetch (no object is uploaded again)."""
    os.makedirs(work, exist_ok=True)
    d = tempfile.mkdtemp(prefix="profile-", dir=work)
    state, mnt = os.path.join(d, "state"), os.path.join(d, "mnt")
    os.makedirs(mnt)
    reg = "127.0.0.1:%d" % HOST_PORT
    with open(os.path.join(d, "daemon.log"), "a") as dlog:
        daemon = subprocess.Popen([wisp, "daemon", "--cache", os.path.join(d, "cache"), "--state", state],
                                  stdout=dlog, stderr=dlog)
    try:
        for _ in range(200):
            if os.path.exists(os.path.join(state, "control.sock")):
                break
            time.sleep(0.05)
        sh(wisp, "mount", "docker://%s/wisp/%s" % (reg, image), mnt, "--plain-http", "--state", state)
        try:
            run_workload(mnt, workload, time.monotonic())
            listed = sh(wisp, "stats", "--accessed", mnt, "--state", state, capture=True)
        finally:
            sh(wisp, "umount", mnt, "--state", state, check=False)
    finally:
        daemon.terminate()
        daemon.wait(30)
    path = os.path.join(d, "prefetch.list")
    with open(path, "w") as f:
        f.write(listed)
    out = sh(wisp, "convert", "docker://%s/%s" % (reg, image), "docker://%s/wisp/%s" % (reg, prefetch_tag(image, workload)),
             "--plain-http", "--json", "--prefetch", path, capture=True)
    log("prefetch list of %s (%s): %d files" % (image, workload, len(listed.splitlines())))
    return {"workload": workload, "files": len(listed.splitlines()), "convert": json.loads(out)}


class WispPrefetch(Wisp):
    """wisp with the startup prefetch list: mounts wisp/IMAGE-prefetch-WORKLOAD, whose list the profiling run
    (record_prefetch) recorded; the daemon starts fetching the listed files as soon as it has mounted."""
    name = "wisp+prefetch"

    def tag(self, image, workload):
        return prefetch_tag(image, workload)


def image_stats(st, image):
    """The stats entry of IMAGE from `wisp stats --json` (tolerant of the exact layout)."""
    items = st.get("images", st) if isinstance(st, dict) else st
    if isinstance(items, dict):
        items = list(items.values())
    for it in items:
        if isinstance(it, dict) and ("/wisp/" + image) in it.get("reference", ""):
            return it
    return None


def measure(system, image, workload, link, mode, t_pull_prev=False):
    """One start; mode: cold (empty node cache, page cache dropped), warm (node cache populated from the
    previous start of the same image), sibling (cache holds the other version)."""
    drop_caches()
    rx0, tx0 = link.counters()
    t0 = time.monotonic()
    first, end, phases, stats = system.start(image, workload, t0, pulled=t_pull_prev)
    rx1, tx1 = link.counters()
    r = {"system": system.name, "image": image, "workload": workload, "mode": mode, "first_output_s": first,
         "exit_s": end, "phases_s": phases, "link_rx_bytes": rx1 - rx0, "link_tx_bytes": tx1 - tx0,
         "rate_mbit": link.rate_mbit, "rtt_ms": link.rtt_ms, "load": os.getloadavg()[0]}
    s = image_stats(stats, image) if stats else None
    if s:
        r["wisp_stats"] = s
    if stats and isinstance(stats.get("frontend"), dict):
        r["frontend_stats"] = stats["frontend"]
    log("%-8s %-13s %-10s %-7s first %.2f s, exit %.2f s, link %.2f MB down %s" % (
        system.name, image, workload, mode, first, end, (rx1 - rx0) / 1e6,
        " ".join("%s %.2f" % kv for kv in phases.items())))
    return r


def series(results, **kw):
    return [r for r in results if all(r.get(k) == v for k, v in kw.items())]


VM_MEM_MIB, VM_SCRATCH = 3072, "8G"


def vm_run(a, work, meta, results):
    """--vm: the series inside vm-tests/run (--guest); the guest's meta and results are merged into META and
    RESULTS. The host's work directory (the registry storage) is read-only in the guest."""
    with open(os.path.join(work, "vm.json"), "w") as f:
        json.dump({"convert": meta["convert"]}, f)
    sh("tar", "-cf", os.path.join(work, "registry.tar"), "-C", os.path.join(work, "registry"), ".")
    argv = [sys.executable, os.path.abspath(__file__), "--guest", work, "--wisp", a.wisp, "--runs", str(a.runs),
            "--systems", a.systems]
    argv += ["--quick"] if a.quick else []
    argv += ["--no-warm"] if a.no_warm else []
    argv += ["--links", a.links] if a.links else []
    argv += ["--workloads", a.workloads] if a.workloads else []
    for d in a.daemon_arg:
        argv += ["--daemon-arg=" + d]
    qemu = sh("qemu-system-x86_64", "--version", capture=True).splitlines()[0]
    host = {"host_kernel": platform.release(), "host_cpus": os.cpu_count(), "host_load_start": os.getloadavg(),
            "qemu": qemu, "accel": "tcg", "vcpus": 1, "mem_mib": VM_MEM_MIB, "scratch": VM_SCRATCH + " ext4"}
    log("booting the VM (vm-tests/run, %d MiB, timeout %d s)" % (VM_MEM_MIB, a.vm_timeout))
    t = time.monotonic()
    p = subprocess.Popen([os.path.join(ROOT, "vm-tests/run"), "--timeout", str(a.vm_timeout), "--mem",
                          str(VM_MEM_MIB), "--scratch-size", VM_SCRATCH, "--", *argv],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    res = None
    try:
        for line in p.stdout:
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
            else:
                sys.stderr.write(line)
    except BaseException:
        p.terminate()   # vm-tests/run kills QEMU on TERM
        p.wait()
        raise
    rc = p.wait()
    if rc != 0 or res is None:
        raise RuntimeError("the run in the VM failed (vm-tests/run exit %d%s)" % (
            rc, "" if res is None else ", but it reported results"))
    host["vm_seconds"] = time.monotonic() - t
    host["host_load_end"] = os.getloadavg()
    guest_meta = res["meta"]
    for k in ("versions", "workloads", "convert"):
        guest_meta[k] = guest_meta.get(k) or meta.get(k)
    meta.clear()
    meta.update(guest_meta)
    meta["vm"] = host
    results.extend(res["results"])


PARALLEL_SERIES = (   # --parallel: (name, arguments); each on its own namespaces and ports
    ("5", ["--links", "5/50", "--workloads", "python-import,python-http"]),
    ("5-pysci", ["--links", "5/50", "--workloads", "pysci-import"]),
    ("100", ["--links", "100/10"]),
)


def run_parallel(a):
    """The full run with its series at once, each as its own bench.py on its own link (namespaces
    PREFIX-pN-*, registry port PORT+2N), then one report from the merged results. The series share
    the CPUs, so CPU-bound steps (the baseline's unpack) are slower than alone; every ratio still
    compares systems measured in the same series, one after another."""
    work = tempfile.mkdtemp(prefix="wisp-bench-par.", dir="/var/tmp")
    procs = []
    for i, (name, extra) in enumerate(PARALLEL_SERIES):
        argv = [sys.executable, os.path.abspath(__file__), "--wisp", a.wisp, "--runs", str(a.runs),
                "--systems", a.systems, "--json", os.path.join(work, name + ".json"), "--out", work,
                "--stem", "part-" + name, *extra]
        argv += [x for d in a.daemon_arg for x in ("--daemon-arg", d)]
        if a.no_warm:
            argv.append("--no-warm")
        env = dict(os.environ, WISP_BENCH_NS="%s-p%d" % (NS_PREFIX, i), WISP_BENCH_PORT=str(PORT + 2 * i))
        logf = open(os.path.join(work, name + ".log"), "w")
        log("series %s: %s (log %s)" % (name, " ".join(extra), logf.name))
        procs.append((name, subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT)))
        time.sleep(20)   # stagger the storage fills (conversions are CPU-bound)
    bad = [name for name, p in procs if p.wait() != 0]
    if bad:
        raise SystemExit("bench: series %s failed (logs in %s)" % (", ".join(bad), work))
    parts = [json.load(open(os.path.join(work, name + ".json"))) for name, _ in procs]
    meta = dict(parts[0]["meta"])
    meta["parallel_series"] = [{"series": name, "date": p["meta"]["date"], "load_start": p["meta"]["load_start"],
                                "load_end": p["meta"]["load_end"], "args": extra}
                               for (name, extra), p in zip(PARALLEL_SERIES, parts)]
    meta["link_checks"] = [c for p in parts for c in p["meta"].get("link_checks", [])]
    meta["convert"] = {k: v for p in parts for k, v in p["meta"].get("convert", {}).items()}
    meta["load_start"] = max((p["meta"]["load_start"] for p in parts), key=lambda x: x[0])
    meta["load_end"] = max((p["meta"]["load_end"] for p in parts), key=lambda x: x[0])
    out = {"meta": meta, "results": [r for p in parts for r in p["results"]]}
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.rename(a.json + ".tmp", a.json)
    os.makedirs(a.out, exist_ok=True)
    raw = os.path.join(a.out, (a.stem or "results") + ".json")
    with open(raw, "w") as f:
        json.dump(out, f, indent=1)
    sh(sys.executable, os.path.join(HERE, "bench-report.py"), raw, a.out)
    shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="python import at 5 Mbit/s, 3 runs each")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/bench"), help="where results.md, plots go")
    ap.add_argument("--wisp", required=True)
    ap.add_argument("--link-only", action="store_true", help="set up and check the links, then stop")
    ap.add_argument("--links", help="RATE_MBIT/RTT_MS,... (default 5/50,100/10; --quick: 5/50)")
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(WORKLOADS))
    ap.add_argument("--no-warm", action="store_true", help="skip the warm and sibling starts")
    ap.add_argument("--systems", default="baseline,wisp,wisp+prefetch,nydus,nydus-amplify0",
                    help="comma-separated: baseline, wisp, wisp+prefetch, nydus, nydus-amplify0 (the Nydus "
                         "systems need NYDUS_BIN=DIR holding nydusd and nydus-image 2.4.x)")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra argument for wisp daemon (repeatable)")
    ap.add_argument("--registry-no-idle-restart", action="store_true",
                    help="experiment: net.ipv4.tcp_slow_start_after_idle=0 on the registry's side")
    ap.add_argument("--stem", help="output name in --out (default results, or results-quick; with --vm "
                                   "results-vm, results-vm-quick)")
    ap.add_argument("--vm", action="store_true",
                    help="run the series inside the vm-tests VM (6.1 kernel, cachefiles frontend)")
    ap.add_argument("--vm-timeout", type=int, default=5400, help="--vm: seconds before the VM is killed")
    ap.add_argument("--guest", metavar="HOST_WORK", help=argparse.SUPPRESS)   # --vm's run inside the VM
    ap.add_argument("--parallel", action="store_true",
                    help="full run: each series (5 Mbit/s; 5 Mbit/s pysci; 100 Mbit/s) on its own link at once, "
                         "then one report")
    ap.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)  # scripts/bench, before setup
    a = ap.parse_args()
    if a.check_args:
        return
    if a.parallel and (a.vm or a.guest):
        sys.exit("bench: --parallel is for the native run")
    if a.parallel:
        return run_parallel(a)
    if a.vm and a.link_only:
        sys.exit("bench: --link-only measures the native link; --vm checks its link in the guest before the runs")
    if a.vm or a.guest:
        # no Nydus in the VM (FUSE under TCG, and its binaries are not passed in)
        a.systems = ",".join(n for n in a.systems.split(",") if not n.startswith("nydus"))
        os.environ.pop("NYDUS_BIN", None)
    if a.guest:
        # the guest sees the host's / read-only: everything it writes goes to the ext4 /scratch disk
        os.environ["TMPDIR"] = "/scratch/tmp"
        os.makedirs("/scratch/tmp", exist_ok=True)

    work = tempfile.mkdtemp(prefix="wisp-bench.", dir="/scratch" if a.guest else "/var/tmp")
    link = Link(work, netem=bool(a.guest))
    reg = Registry(work)
    systems = []
    results = []
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "cpus": os.cpu_count(), "quick": a.quick, "runs": a.runs,
            "load_start": os.getloadavg()}
    if a.guest:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            meta["clocksource"] = f.read().strip()
    for tool, argv in (("wisp", [a.wisp, "--version"]), ("skopeo", ["skopeo", "--version"]),
                       ("umoci", ["umoci", "--version"]), ("docker-registry", ["docker-registry", "--version"])):
        try:
            meta.setdefault("versions", {})[tool] = sh(*argv, capture=True).strip().splitlines()[0]
        except Exception as e:   # noqa: BLE001 - a version string is informational
            meta.setdefault("versions", {})[tool] = "? (%s)" % e
    meta["versions"]["kernel"] = platform.release()
    meta["workloads"] = {k: v["desc"] for k, v in WORKLOADS.items()}
    nydus_bin = os.environ.get("NYDUS_BIN")
    if nydus_bin:
        for tool in ("nydusd", "nydus-image"):
            meta["versions"][tool] = " ".join(
                sh(os.path.join(nydus_bin, tool), "--version", capture=True).split())[:120]
        meta["nydus"] = "nydusd FUSE, registry backend, blobcache; RAFS v6 zstd by nydus-image"
    else:
        meta["nydus"] = "skipped (NYDUS_BIN not given)"

    def stop_all(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_all)
    try:
        if a.links:
            links = [tuple(float(x) for x in l.split("/")) for l in a.links.split(",")]
        else:
            links = [(5, 50)] if a.quick else [(5, 50), (100, 10)]
        meta["link_checks"] = []
        if a.link_only:
            for rate, rtt in links:
                link.up(rate, rtt)
                meta["link_checks"].append(link.check())
            print(json.dumps(meta["link_checks"], indent=1))
            return
        def workloads_at(rate):
            if a.workloads:
                return a.workloads.split(",")
            if a.quick:
                return ["python-import"]
            if rate <= 5:
                return ["python-import", "python-http", "pysci-import"]
            return ["python-import", "python-http", "node-http", "small-files", "big-read", "gcc-hello",
                    "numpy-import"]
        warm = not a.quick and not a.no_warm
        images = sorted({WORKLOADS[w]["image"] + ":v1" for r, _ in links for w in workloads_at(r)}
                        | ({"python:v2"} if warm else set()))
        if not a.guest:
            log("filling the registry storage: corpus images and their wisp conversions")
        names = a.systems.split(",")
        # wisp+prefetch: the list of each import workload, recorded once per run (unshaped)
        pf = sorted({(WORKLOADS[w]["image"] + ":v1", w) for r, _ in links for w in workloads_at(r)
                     if w in PREFETCH_WORKLOADS}) if WispPrefetch.name in names else []
        want_nydus = nydus_bin and any(n.startswith("nydus") for n in names)
        if a.guest:
            # the host filled the storage (and recorded the prefetch list): copy it onto /scratch
            with open(os.path.join(a.guest, "vm.json")) as f:
                meta["convert"] = json.load(f)["convert"]
            t = time.monotonic()
            # one tar file: walking the storage's deep tree over 9p failed (lstat ENOENT on listed entries)
            os.makedirs(reg.root)
            sh("tar", "-xf", os.path.join(a.guest, "registry.tar"), "-C", reg.root)
            log("registry storage copied to %s in %.1f s" % (reg.root, time.monotonic() - t))
        else:
            meta["convert"] = reg.fill(a.wisp, images, prefetch=pf, nydus_bin=nydus_bin if want_nydus else None,
                                       work=work)
        if a.vm:
            vm_run(a, work, meta, results)
            links = []   # the series ran in the VM
        base, wsp = Baseline(work), Wisp(work, a.wisp, a.daemon_arg)
        wpf = WispPrefetch(work, a.wisp, a.daemon_arg)
        meta["wisp_daemon_args"] = a.daemon_arg
        candidates = [base, wsp, wpf]
        if want_nydus:
            nimg = {k[len("nydus:"):]: v for k, v in meta["convert"].items() if k.startswith("nydus:")}
            candidates += [Nydus(work, nydus_bin, nimg), Nydus(work, nydus_bin, nimg, amplify_io=0)]
        systems = [s for s in candidates if s.name in names]
        meta["registry_tcp_slow_start_after_idle"] = 0 if a.registry_no_idle_restart else 1
        for rate, rtt in links:
            if link.rtt_ms != rtt or link.rate_mbit is None:
                reg.stop()
                link.up(rate, rtt)
                if a.registry_no_idle_restart:
                    ns(NS_REG, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
                reg.start()
            else:
                link.shape(rate, rtt)
            meta["link_checks"].append(link.check())
            wl = workloads_at(rate)
            for w in wl:
                image = WORKLOADS[w]["image"] + ":v1"
                for run in range(a.runs):
                    for s in systems:
                        if s.name == WispPrefetch.name and w not in PREFETCH_WORKLOADS:
                            continue   # no list for the synthetic reads
                        s.fresh()
                        try:
                            results.append(measure(s, image, w, link, "cold"))
                        except (RuntimeError, OSError) as e:
                            # a failed start is a result too (e.g. EIO from a fill past its deadline)
                            tail = s.log_tail() if hasattr(s, "log_tail") else ""
                            log("%s %s %s cold FAILED: %s\n%s" % (s.name, image, w, e, tail))
                            results.append({"system": s.name, "image": image, "workload": w, "mode": "cold",
                                            "error": str(e), "daemon_log_tail": tail, "rate_mbit": link.rate_mbit,
                                            "rtt_ms": link.rtt_ms, "load": os.getloadavg()[0]})
                            for d in os.listdir(s.dir):   # a mount the failed start left behind
                                if d.startswith("mnt-"):
                                    subprocess.run([a.wisp, "umount", os.path.join(s.dir, d), "--state",
                                                    os.path.join(s.dir, "state")], capture_output=True)
                            s.cleanup()
                            continue
                        if warm and run == 0 and w == "python-import" and s.name in (Baseline.name, Wisp.name):
                            # warm: same node, image again (baseline: already unpacked; wisp: cache filled)
                            results.append(measure(s, image, w, link, "warm", t_pull_prev=True))
                            # sibling: python:v2 after v1
                            results.append(measure(s, "python:v2", w, link, "sibling"))
                        s.cleanup()
    finally:
        for s in systems:
            s.cleanup()
        reg.stop()
        link.down()
        meta.setdefault("load_end", os.getloadavg())
        if os.environ.get("WISP_BENCH_KEEP") and not a.guest:
            log("kept the work directory %s (WISP_BENCH_KEEP)" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    out = {"meta": meta, "results": results}
    if a.guest:
        print("RESULT " + json.dumps(out), flush=True)
        return
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.rename(a.json + ".tmp", a.json)
    os.makedirs(a.out, exist_ok=True)
    stem = "results-vm" if meta.get("vm") else "results"
    raw = os.path.join(a.out, (a.stem or (stem + "-quick" if a.quick else stem)) + ".json")
    with open(raw, "w") as f:
        json.dump(out, f, indent=1)
    sh(sys.executable, os.path.join(HERE, "bench-report.py"), raw, a.out)


if __name__ == "__main__":
    main()
