"""Scale: a 1 TiB guest that touches little (`mdvm run --memory 1T`): start
time and the host memory mdvm's metadata takes, against QEMU with the same
guest RAM size.
"""
import time

from benchlib import MiB, KiB, Mdvm, Qemu, NotMeasured, parse_size, size_label
from start import guest_first_byte

TITLE = "Scale"
ORDER = 30
BUDGET = 120
QUICK_BUDGET = 30

QEMU_MACHINE = "microvm"
BASE = "256M"   # the small guest the growth per GiB is measured against


def idle_dirty(vmm, idle_line, settle):
    """Private_Dirty VMM memory (bytes) of an idle guest; ends the run."""
    vmm.wait_console(idle_line, 60)
    time.sleep(settle)
    mem = vmm.memory()
    if mem["guest_vmas"] == 0:
        raise NotMeasured("no guest RAM mapping found in smaps")
    if vmm.quit() != 0:
        raise RuntimeError("%s did not exit cleanly after quit: %s" % (vmm.name, vmm.describe()))
    return mem["vmm_dirty"]


def run(b):
    size = b.pick("1T", "16G")
    n = b.pick(3, 1)
    nbytes = parse_size(size)
    lab = size_label(nbytes)
    t = b.table(TITLE, intro=(
        "A %s guest running the test guest's `idle` (it touches well under 1 MiB). %d run(s) per VMM, "
        "each ended with QMP `quit`. Memory as in the overhead table: /proc/PID/smaps minus guest RAM."
        % (lab, n)))
    r_first = t.row("%s guest: spawn → guest's first console byte" % lab, "ms", "QEMU -M %s" % QEMU_MACHINE)
    r_ready = t.row("%s guest: spawn → guest ready banner" % lab, "ms", "QEMU -M %s" % QEMU_MACHINE)
    r_mm = t.row("%s guest: guest memory setup (startup trace kvm → memory)" % lab, "ms")
    r_mm.no_qemu("QEMU has no such trace")
    r_rss = t.row("%s guest: VMM memory beyond guest RAM (Rss)" % lab, "MiB", "QEMU -M %s" % QEMU_MACHINE)
    r_priv = t.row("%s guest: of it, written by the VMM (Private_Dirty)" % lab, "MiB", "QEMU -M %s" % QEMU_MACHINE)
    r_grow = t.row("%s guest: VMM-written memory added per GiB of guest RAM (vs a %s guest)"
                   % (lab, size_label(parse_size(BASE))), "bytes/GiB", "QEMU -M %s" % QEMU_MACHINE)
    r_meta = t.row("%s guest: memdesc metadata (`query-memory` metadata-bytes)" % lab, "KiB")
    r_meta.no_qemu("QEMU has no per-page descriptors; its dirty bitmaps exist only while migrating")
    r_bpg = t.row("%s guest: metadata bytes per GiB of guest RAM" % lab, "bytes/GiB")
    r_bpg.no_qemu("as above")

    for i in range(n):
        with t.guard("mdvm", *t.rows):
            vm = Mdvm(b, memory=size, cmdline="idle", trace=True)
            first = guest_first_byte(vm)
            _, ready = vm.wait_console("mdvm-guest: ready", 60)
            vm.wait_console("idle: waiting", 60)
            r_first.add("mdvm", vm.ms_since_start(first))
            r_ready.add("mdvm", vm.ms_since_start(ready))
            ev = vm.trace()
            if "kvm" in ev and "memory" in ev:
                r_mm.add("mdvm", (ev["memory"][0] - ev["kvm"][0]) / 1e6)
            else:
                r_mm.fail("mdvm", "startup trace lacks the kvm/memory events")
            time.sleep(b.pick(0.5, 0.2))
            mem = vm.memory()
            if mem["guest_vmas"] == 0:
                raise NotMeasured("no guest RAM mapping found in smaps")
            r_rss.add("mdvm", mem["vmm_rss"] / MiB)
            r_priv.add("mdvm", mem["vmm_dirty"] / MiB)
            big_priv = mem["vmm_dirty"]
            q = vm.connect()
            try:
                if not q.has_command("query-memory"):
                    raise NotMeasured("this mdvm has no QMP query-memory yet (memdesc issue)")
                meta = q.cmd("query-memory").get("metadata-bytes")
                if meta is None:
                    raise NotMeasured("query-memory has no metadata-bytes")
                r_meta.add("mdvm", meta / KiB)
                r_bpg.add("mdvm", meta / (nbytes / (1 << 30)))
            except NotMeasured as e:
                r_meta.fail("mdvm", e)
                r_bpg.fail("mdvm", e)
            rc = vm.quit()
            if rc != 0:
                raise RuntimeError("mdvm exited with %s after quit: %s" % (rc, vm.describe()))
            small = idle_dirty(Mdvm(b, memory=BASE, cmdline="idle"), "idle: waiting", b.pick(0.5, 0.2))
            r_grow.add("mdvm", (big_priv - small) / ((nbytes - parse_size(BASE)) / (1 << 30)))
        qrows = [r_first, r_ready, r_rss, r_priv, r_grow]
        with t.guard("qemu", *qrows):
            qm = Qemu(b, memory=size, cmdline="idle", machine=QEMU_MACHINE, extra=[
                "-object", "memory-backend-ram,id=mem,size=%s,reserve=off" % size,
                "-machine", "memory-backend=mem"])
            first = guest_first_byte(qm)
            _, ready = qm.wait_console("mdvm-guest: ready", 60)
            qm.wait_console("idle: no test device, halting", 60)
            r_first.add("qemu", qm.ms_since_start(first))
            r_ready.add("qemu", qm.ms_since_start(ready))
            time.sleep(b.pick(0.5, 0.2))
            mem = qm.memory()
            if mem["guest_vmas"] == 0:
                raise NotMeasured("no guest RAM mapping found in smaps")
            r_rss.add("qemu", mem["vmm_rss"] / MiB)
            r_priv.add("qemu", mem["vmm_dirty"] / MiB)
            big_priv = mem["vmm_dirty"]
            rc = qm.quit()
            if rc != 0:
                raise RuntimeError("QEMU exited with %s after quit: %s" % (rc, qm.describe()))
            small = idle_dirty(Qemu(b, memory=BASE, cmdline="idle", machine=QEMU_MACHINE),
                                 "idle: no test device, halting", b.pick(0.5, 0.2))
            r_grow.add("qemu", (big_priv - small) / ((nbytes - parse_size(BASE)) / (1 << 30)))
    t.note("Growth per GiB: (Private_Dirty of the VMM with the big guest − with a %s guest, same VMM, same "
           "run) ÷ the difference in guest RAM: what each further GiB of guest RAM costs the host in VMM "
           "metadata (mdvm: memdesc tables, folio and pool state; QEMU under TCG: its per-page dirty and "
           "code bitmaps, which exist from the start). smaps counts whole 4 KiB pages and a few come and go "
           "between runs, so expect ±4 KiB ÷ the size difference as noise (±4 bytes/GiB at 1 TiB), "
           "negative values included." % size_label(parse_size(BASE)))
    t.note("mdvm: `build/mdvm run --memory %s --cmdline idle --control SOCK --console stdio` (defaults)." % size)
    t.note("QEMU: `-accel tcg -M %s -m %s -object memory-backend-ram,id=mem,size=%s,reserve=off "
           "-machine memory-backend=mem ...`: a plain `-m 1T` fails here (`cannot set up guest memory "
           "'pc.ram': Cannot allocate memory`, the host has far less than 1 TiB), `reserve=off` maps it "
           "MAP_NORESERVE as mdvm does." % (QEMU_MACHINE, size, size))
