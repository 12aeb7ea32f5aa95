"""Live migration: mdvm -> mdvm against QEMU -> QEMU (TCG), same guest RAM
size and contents, same transport, same run (owner: the live-migration issue).

Each figure comes from the source's query-migrate after completion: total
time, downtime, bytes transferred; throughput = bytes / total time.
"""
import os
import random
import socket
import time

from benchlib import Mdvm, Qemu, NotMeasured, MiB, GiB

TITLE = "Live migration"
ORDER = 40
BUDGET = 300
QUICK_BUDGET = 45

PARAMS = {"max-bandwidth": 100 * 1000 * 1000 * 1000, "downtime-limit": 300}
DATA_GPA = 64 * MiB


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def uri(b, transport, tag):
    if transport == "unix":
        p = b.path("mig-%s.sock" % tag)
        if os.path.exists(p):
            os.unlink(p)
        return "unix:" + p
    return "tcp:127.0.0.1:%d" % free_port()


def wait_done(q, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        r = q.cmd("query-migrate")
        if r.get("status") in ("completed", "failed", "cancelled"):
            if r["status"] != "completed":
                raise NotMeasured("migration %s: %s" % (r["status"], r.get("error-desc", "")))
            return r
        if time.monotonic() > deadline:
            raise NotMeasured("migration did not finish in %d s" % timeout)
        time.sleep(0.005)


def fill_file(path, offset, size, seed):
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(offset)
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(rnd.randbytes(n))
            left -= n


def mdvm_once(b, memory, data, transport):
    u = uri(b, transport, "mdvm")
    dst = Mdvm(b, memory=memory, cmdline="idle", extra=["--incoming", u], name="mdvm-dst", trace=False)
    src = Mdvm(b, memory=memory, cmdline="idle", name="mdvm-src", trace=False)
    src.wait_console("idle: waiting")
    q = src.connect()
    dst.connect()
    if data:
        q.cmd("x-mdvm-fill-random", {"gpa": DATA_GPA, "size": data, "seed": 7})
    q.cmd("migrate-set-parameters", PARAMS)
    q.cmd("migrate", {"uri": u})
    r = wait_done(q)
    dst.quit()
    src.quit()
    return r


def qemu_once(b, memory, data, transport):
    u = uri(b, transport, "qemu")
    size = memory
    extra_src = extra_dst = []
    ram_file = None
    if data:
        # Guest RAM in a shared file so the host can write the random data
        # (the emulated test guest writes ~7 MB/s); the destination's block
        # has the same id.
        ram_file = b.path("qemu-ram")
        with open(ram_file, "wb") as f:
            f.truncate(0)
        extra_src = ["-object", "memory-backend-file,id=ram0,size=%s,mem-path=%s,share=on" % (size, ram_file),
                     "-machine", "memory-backend=ram0"]
        extra_dst = ["-object", "memory-backend-ram,id=ram0,size=%s" % size, "-machine", "memory-backend=ram0"]
    dst = Qemu(b, memory=memory, cmdline="idle", extra=extra_dst + ["-incoming", u], name="qemu-dst")
    src = Qemu(b, memory=memory, cmdline="idle", extra=extra_src, name="qemu-src")
    src.wait_console("idle: ")   # no test device under QEMU: "idle: no test device, halting"
    q = src.connect()
    dst.connect()
    if data:
        fill_file(ram_file, DATA_GPA, data, 7)
    q.cmd("migrate-set-parameters", PARAMS)
    q.cmd("migrate", {"uri": u})
    r = wait_done(q)
    dst.quit()
    src.quit()
    if ram_file:
        os.unlink(ram_file)
    return r


def run(b):
    cases = [
        ("1 GiB idle", b.pick("1G", "64M"), 0),
        ("1 GiB, 512 MiB random data", b.pick("1G", "128M"), b.pick(512 * MiB, 8 * MiB)),
        ("4 GiB idle, mostly untouched", b.pick("4G", "256M"), 0),
    ]
    t = b.table(TITLE, intro="Source and destination on this machine; max-bandwidth 100 GB/s and "
                "downtime-limit 300 ms for both; the test guest idle. Figures from the source's "
                "query-migrate.")
    for name, memory, data in cases:
        for transport in ("unix", "tcp"):
            label = "%s, %s" % (name, transport)
            rows = dict(
                total=t.row(label + ": total time", "ms"),
                down=t.row(label + ": downtime", "ms"),
                sent=t.row(label + ": bytes sent", "MB"),
                rate=t.row(label + ": throughput", "MB/s", lower_is_better=False),
            )
            for _ in b.runs(3):
                for who, once in (("mdvm", mdvm_once), ("qemu", qemu_once)):
                    with t.guard(who, rows["total"]):
                        r = once(b, memory, data, transport)
                        tt = max(r["total-time"], 1)
                        rows["total"].add(who, r["total-time"])
                        rows["down"].add(who, r.get("downtime", 0))
                        rows["sent"].add(who, r["ram"]["transferred"] / 1e6)
                        rows["rate"].add(who, r["ram"]["transferred"] / 1e3 / tt)
    t.note("Total and downtime in ms as query-migrate reports them (integers). mdvm's downtime "
           "runs from stopping the vCPUs to the destination's acknowledgement that it loaded "
           "everything; QEMU's from stopping to the end of its send. Random data: mdvm via "
           "x-mdvm-fill-random (host writes through mm_write), QEMU via its shared RAM file; "
           "both at GPA 64 MiB. Throughput = bytes sent / total time.")
