#!/usr/bin/env python3
"""Delay relay for scripts/bench: a TUN device in each of two network namespaces, every IP packet
read from one is written to the other DELAY ms later (FIFO, so packets keep their order).

The host kernel has tbf but no sch_netem, so the link's delay is added here in user space and its
rate by tbf on the veth (scripts/bench sets both up and measures the result before trusting it).

    bench-relay.py NS_A DEV_A NS_B DEV_B DELAY_MS READY_FILE

Creates DEV_A in netns NS_A and DEV_B in NS_B (non-persistent: they vanish when this exits), writes
READY_FILE once both exist, then relays until SIGTERM. Counts are printed at exit.
"""
import collections
import ctypes
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000

libc = ctypes.CDLL(None, use_errno=True)


def setns(name):
    fd = os.open("/run/netns/" + name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "setns %s: %s" % (name, os.strerror(e)))
    finally:
        os.close(fd)


def open_tun(ns, dev):
    setns(ns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    ns_a, dev_a, ns_b, dev_b, delay_ms, ready = sys.argv[1:7]
    delay = float(delay_ms) / 1000.0
    fa = open_tun(ns_a, dev_a)
    fb = open_tun(ns_b, dev_b)
    peer = {fa: fb, fb: fa}
    queues = {fa: collections.deque(), fb: collections.deque()}   # packets waiting to go OUT of fd
    counts = {fa: [0, 0], fb: [0, 0]}                              # packets, bytes written to fd
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with open(ready + ".tmp", "w") as f:
        f.write("%d\n" % os.getpid())
    os.rename(ready + ".tmp", ready)
    mono = time.monotonic
    while not stop:
        now = mono()
        due = None
        for fd, q in queues.items():
            while q and q[0][0] <= now:
                _, pkt = q.popleft()
                try:
                    os.write(fd, pkt)
                    counts[fd][0] += 1
                    counts[fd][1] += len(pkt)
                except OSError:
                    pass   # the receiving stack is full (EAGAIN) or the device not up yet (EIO): drop,
                           # as a real link would
            if q and (due is None or q[0][0] < due):
                due = q[0][0]
        timeout = None if due is None else max(0.0, due - mono())
        try:
            r, _, _ = select.select([fa, fb], [], [], timeout)
        except InterruptedError:
            continue
        now = mono()
        for fd in r:
            q = queues[peer[fd]]
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                q.append((now + delay, pkt))
    print("relay: %s->%s %d packets %d bytes; %s->%s %d packets %d bytes" % (
        dev_a, dev_b, counts[fb][0], counts[fb][1], dev_b, dev_a, counts[fa][0], counts[fa][1]),
        file=sys.stderr)


if __name__ == "__main__":
    main()
