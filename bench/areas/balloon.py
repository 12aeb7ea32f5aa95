"""Balloon: host memory returned when the guest inflates its balloon, and how
fast, mdvm against QEMU's virtio-balloon (-M microvm -device
virtio-balloon-device) on the same guest (owner: the balloon issue).

To fill in: define run(b) (see bench/README.md). Plot the guest memory
composition before/after with b.plot(..., kind="bars").
"""
TITLE = "Balloon"
ORDER = 80
BUDGET = 120
QUICK_BUDGET = 30
PLANNED = ["host memory returned by inflating the balloon (MiB) and time to return it",
           "plot: memory composition before/after"]
WHY = "no benchmark code yet (balloon issue)"
