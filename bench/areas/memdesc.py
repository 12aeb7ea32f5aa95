"""memdesc metadata: host bytes of metadata per GiB of guest RAM, by how much
of it the guest touched (owner: the memdesc issue). QEMU counterpart: its
per-page dirty bitmaps (~5-6 bits per 4 KiB page), or none outside migration.

To fill in: define run(b) (see bench/README.md); QMP `query-memory` gives
mdvm's own counters, b.Mdvm(...).memory() the host's view from smaps.
"""
TITLE = "memdesc metadata"
ORDER = 50
BUDGET = 90
QUICK_BUDGET = 30
PLANNED = ["metadata bytes per GiB of guest RAM (untouched, fully touched, 4 KiB vs 2 MiB folios)"]
WHY = "no benchmark code yet (memdesc issue)"
