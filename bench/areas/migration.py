"""Live migration: mdvm -> mdvm against QEMU -> QEMU, same guest RAM size and
contents, same transport, same run (owner: the live-migration issue).

To fill in: define run(b) (see bench/README.md). Sketch:

    t = b.table(TITLE)
    r = t.row("1 GiB idle, unix: total time", "ms")
    for i in b.runs(3):
        with t.guard("mdvm", r):
            dst = Mdvm(b, memory=b.pick("1G", "64M"), extra=["--incoming", "unix:" + b.path("mig")])
            src = Mdvm(b, memory=..., cmdline="idle"); src.wait_console("idle: waiting")
            q = src.connect(); q.cmd("migrate", {"uri": ...}); poll q.cmd("query-migrate")
            r.add("mdvm", ...)
        with t.guard("qemu", r):
            ... Qemu(b, ..., extra=["-incoming", "unix:..."]) ...

Plot remaining bytes over time with b.plot(t, "migration-progress", ..., kind="lines").
Peer figures to beat: /work/shared/notes/peer-figures.md (never copy them: measure QEMU again).
"""
TITLE = "Live migration"
ORDER = 40
BUDGET = 300
QUICK_BUDGET = 45
PLANNED = ["total time, downtime, bytes sent, MB/s for 1 GiB idle / 1 GiB with 512 MiB data / 4 GiB idle / "
           "1 GiB guest dirtying memory, over unix and tcp", "plot: remaining bytes over time"]
WHY = "no benchmark code yet (live migration issue)"
