"""memdesc metadata and lookup/update throughput (owner: the memdesc issue).

Runs build/bench_mm (bench/bench_mm.c, mm/ linked in, no KVM) and turns its
tables into rows. QEMU keeps no per-page descriptor: its only per-page host
metadata is the migration dirty bitmap (~5-6 bits per 4 KiB page, and only
while migrating), so these rows have no QEMU cell.
"""
import os
import re
import subprocess

from benchlib import NotMeasured

TITLE = "memdesc metadata"
ORDER = 50
BUDGET = 120
QUICK_BUDGET = 40

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BENCH_MM = os.path.join(ROOT, "build", "bench_mm")
NO_QEMU = "no counterpart (see note)"

UNITS = {"B": 1, "KiB": 1024, "MiB": 1 << 20}
RATES = {"": 1, "k": 1e3, "M": 1e6}


def parse_bytes(cell):
    m = re.match(r"([\d.]+)\s*(B|KiB|MiB)$", cell.strip())
    if not m:
        raise NotMeasured("unparsable size %r from bench_mm" % cell)
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_rate(cell):
    m = re.match(r"([\d.]+)\s*([kM]?)$", cell.strip())
    if not m:
        raise NotMeasured("unparsable rate %r from bench_mm" % cell)
    return float(m.group(1)) * RATES[m.group(2)]


def table_rows(text):
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            yield [c.strip() for c in line.strip().strip("|").split("|")]


def run_bench_mm(quick):
    # Always through make: a stale binary would measure old structures.
    subprocess.run(["make", "-s", "-C", ROOT, "build/bench_mm"], check=True,
                   stdout=subprocess.DEVNULL)
    r = subprocess.run([BENCH_MM] + (["--quick"] if quick else []), capture_output=True,
                       text=True, timeout=BUDGET)
    if r.returncode != 0:
        raise NotMeasured("bench_mm exited %d: %s" % (r.returncode, r.stderr.strip()[-200:]))
    return r.stdout


def run(b):
    t = b.table(TITLE, intro="Host metadata of the memdesc scheme (mm/ alone, no KVM): "
                "memdesc table + folio slab + host-pool state, per GiB of fully populated "
                "guest RAM; then lookup/update rates on a 4 GiB guest, random frames.")
    meta = {
        "1 GiB, 4 KiB folios": t.row("metadata per GiB, all 4 KiB folios", "KiB"),
        "1 GiB, 2 MiB folios": t.row("metadata per GiB, all 2 MiB folios", "KiB"),
    }
    per_page = t.row("memdesc table bytes per 4 KiB page, 4 KiB folios", "B")
    ops = {
        "memdesc_lookup, 2 MiB folios, 1 thread": t.row("memdesc_lookup, 2 MiB folios", "M ops/s", lower_is_better=False),
        "memdesc_lookup, 4 KiB folios, 1 thread": t.row("memdesc_lookup, 4 KiB folios", "M ops/s", lower_is_better=False),
        "memdesc_mark_dirty (owner op), 2 MiB folios": t.row("memdesc_mark_dirty, 2 MiB folios", "M ops/s", lower_is_better=False),
        "memdesc_mark_dirty (owner op), 4 KiB folios": t.row("memdesc_mark_dirty, 4 KiB folios", "M ops/s", lower_is_better=False),
    }
    for r in list(meta.values()) + [per_page] + list(ops.values()):
        r.no_qemu(NO_QEMU)
    for _ in b.runs(3):
        with t.guard("mdvm", *(list(meta.values()) + [per_page] + list(ops.values()))):
            out = run_bench_mm(b.quick)
            for cells in table_rows(out):
                if cells[0] in meta:
                    meta[cells[0]].add("mdvm", parse_bytes(cells[6]) / 1024)
                    if cells[0] == "1 GiB, 4 KiB folios":
                        per_page.add("mdvm", float(cells[7]))
                elif cells[0] in ops:
                    ops[cells[0]].add("mdvm", parse_rate(cells[1]) / 1e6)
    t.note("QEMU keeps no per-page descriptors: its per-page host metadata is the migration "
           "dirty bitmap (~5-6 bits per 4 KiB page), present only while migrating.")
    t.note("Worst case for the table is every 2 MiB region mixed (a 4 KiB leaf per region): "
           "8.02 B per 4 KiB page = 0.196% of RAM; each 4 KiB folio adds a 32-byte descriptor. "
           "Runs of 2 MiB folios cost one 8-byte entry per 2 MiB.")
