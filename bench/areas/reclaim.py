"""Compaction and reclaim: how fast host memory comes back and how long vCPUs
pause for it (owner: the compaction issue).

To fill in: define run(b) (see bench/README.md). Plot the guest memory
composition before/after with b.plot(..., kind="bars").
"""
TITLE = "Reclaim and compaction"
ORDER = 70
BUDGET = 120
QUICK_BUDGET = 30
PLANNED = ["reclaim rate (MiB/s)", "vCPU pause per compaction step", "plot: memory composition before/after"]
WHY = "no benchmark code yet (compaction issue)"
