"""Dirty tracking: cost of one harvest round per GiB of guest RAM, mdvm's
folio-granular tracking against QEMU's dirty bitmap sync (owner: the dirty
tracking issue).

To fill in: define run(b) (see bench/README.md).
"""
TITLE = "Dirty harvest"
ORDER = 60
BUDGET = 120
QUICK_BUDGET = 30
PLANNED = ["dirty harvest cost per GiB per round (guest walking a few MiB; idle guest)"]
WHY = "no benchmark code yet (dirty tracking issue)"
