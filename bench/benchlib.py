"""The mdvm benchmark harness library (see bench/README.md).

An area module (bench/areas/NAME.py) gets a `Bench` object `b` and fills
tables of rows; each row holds samples for mdvm and for QEMU measured in the
same run. This file has the pieces areas share: rows and tables, processes
with console timing (`Mdvm`, `Qemu`), a QMP client, /proc/PID/smaps
accounting and gnuplot plots. Python standard library only (/usr/bin/python3).
"""
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench.py runs copies taken at its start, so a rebuild during the run (other
# people share this checkout) cannot mix two binaries in one table.
MDVM = os.environ.get("MDVM_BENCH_MDVM") or os.path.join(ROOT, "build", "mdvm")
GUEST = os.environ.get("MDVM_BENCH_GUEST") or os.path.join(ROOT, "guest", "mdvm-guest.elf")
QEMU = shutil.which("qemu-system-x86_64")
GNUPLOT = shutil.which("gnuplot")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BANNER = "mdvm-guest: ready"
WHO = ("mdvm", "qemu")


class NotMeasured(Exception):
    """Raise with the reason when a figure cannot be measured; the row's cell
    then says "not measured: REASON"."""


def now_ns():
    return time.monotonic_ns()   # CLOCK_MONOTONIC, the clock of mdvm's startup trace


def parse_size(s):
    """'256M' -> bytes (binary units, like mdvm and QEMU)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)", str(s).strip().upper())
    if not m:
        raise ValueError("bad size %r" % s)
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def size_label(nbytes):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return "%d %s" % (nbytes >> shift, unit)
    return "%d B" % nbytes


def fmt_num(x):
    a = abs(x)
    if a >= 1000:
        return "{:,.0f}".format(x)
    if a >= 100:
        return "%.0f" % x
    if a >= 10:
        return "%.1f" % x
    if a >= 1:
        return "%.2f" % x
    return "%.3g" % x


# ---------------------------------------------------------------- rows, tables
class Row:
    """One figure, for mdvm and (where QEMU has a counterpart) for QEMU.

    r.add("mdvm", value) / r.add("qemu", value) append samples; cells show
    min / median / max. r.fail(who, reason) records why a cell has no (or too
    few) samples; r.no_qemu(reason) says QEMU has nothing to compare."""

    def __init__(self, name, unit, note="", lower_is_better=True):
        self.name, self.unit, self.note = name, unit, note
        self.lower_is_better = lower_is_better
        self.samples = {w: [] for w in WHO}
        self.failed = {w: None for w in WHO}   # first failure reason
        self.nfailed = {w: 0 for w in WHO}
        self.qemu_na = None

    def add(self, who, value):
        assert who in WHO, who
        self.samples[who].append(float(value))

    def fail(self, who, reason):
        if self.failed[who] is None:
            self.failed[who] = str(reason)
        self.nfailed[who] += 1

    def no_qemu(self, reason="no QEMU counterpart"):
        self.qemu_na = reason

    def median(self, who):
        s = self.samples[who]
        return statistics.median(s) if s else None

    def cell(self, who):
        if who == "qemu" and self.qemu_na:
            return "— (%s)" % self.qemu_na
        s = sorted(self.samples[who])
        if not s:
            return "not measured: %s" % (self.failed[who] or "no sample was taken")
        if len(s) == 1:
            text = fmt_num(s[0])
        else:
            text = " / ".join(fmt_num(v) for v in (s[0], statistics.median(s), s[-1]))
        if self.failed[who]:
            text += " (%d run(s) failed: %s)" % (self.nfailed[who], self.failed[who])
        return text

    def ratio(self):
        m, q = self.median("mdvm"), self.median("qemu")
        if m is None or q is None or self.qemu_na:
            return "—"
        if q == 0:
            return "—" if m == 0 else "∞"
        x = m / q
        return "%.2f" % x if x >= 0.1 else "%.2g" % x

    def to_dict(self):
        return dict(name=self.name, unit=self.unit, note=self.note,
                    lower_is_better=self.lower_is_better, samples=self.samples,
                    failed=self.failed, nfailed=self.nfailed, qemu_na=self.qemu_na)

    @classmethod
    def from_dict(cls, d):
        r = cls(d["name"], d["unit"], d.get("note", ""), d.get("lower_is_better", True))
        r.samples, r.failed, r.nfailed, r.qemu_na = d["samples"], d["failed"], d["nfailed"], d["qemu_na"]
        return r


class Table:
    """One table of an area: rows, free-text notes (method: what is counted,
    how runs end) and plots."""

    def __init__(self, title, intro=""):
        self.title, self.intro = title, intro
        self.rows, self.notes, self.plots = [], [], []

    def row(self, name, unit, note="", lower_is_better=True):
        r = Row(name, unit, note, lower_is_better)
        self.rows.append(r)
        return r

    def note(self, text):
        self.notes.append(text)

    def guard(self, who, *rows):
        """Context manager around one measurement for `who` ("mdvm"/"qemu"):
        an exception in it becomes the failure reason of those rows' cells
        (the traceback goes to stderr) and the area goes on."""
        return _Guard(who, rows)

    def to_dict(self):
        return dict(title=self.title, intro=self.intro, rows=[r.to_dict() for r in self.rows],
                    notes=self.notes, plots=self.plots)

    @classmethod
    def from_dict(cls, d):
        t = cls(d["title"], d.get("intro", ""))
        t.rows = [Row.from_dict(r) for r in d["rows"]]
        t.notes, t.plots = d.get("notes", []), d.get("plots", [])
        return t


class _Guard:
    def __init__(self, who, rows):
        self.who, self.rows = who, rows

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if et is None:
            return False
        if issubclass(et, (KeyboardInterrupt, SystemExit, AreaTimeout)):
            return False
        if issubclass(et, NotMeasured):
            reason = str(e)
        else:
            reason = "%s: %s" % (et.__name__, e)
            sys.stderr.write("bench: %s run failed:\n%s" % (self.who, "".join(
                traceback.format_exception(et, e, tb))))
        for r in self.rows:
            r.fail(self.who, reason)
        return True


class AreaTimeout(Exception):
    pass


# ---------------------------------------------------------------- the context
class Bench:
    """What an area's run(b) gets.

    b.quick: quick mode (make test): one run, tiny sizes; b.runs(n) gives n
    runs (1 in quick mode); b.pick(full, quick) picks a parameter; b.tmp is a
    private scratch directory; b.table(title) starts a table; b.plot(...)
    draws a PNG next to the results."""

    def __init__(self, quick, tmp, outdir):
        self.quick, self.tmp, self.outdir = quick, tmp, outdir
        self.tables = []
        self.procs = []
        self._seq = 0

    def runs(self, full):
        return range(1 if self.quick else full)

    def pick(self, full, quick):
        return quick if self.quick else full

    def table(self, title, intro=""):
        t = Table(title, intro)
        self.tables.append(t)
        return t

    def path(self, name):
        """A fresh file name in the scratch directory."""
        self._seq += 1
        return os.path.join(self.tmp, "%d-%s" % (self._seq, name))

    def cleanup(self):
        for p in self.procs:
            p.kill()

    # -- plots
    def plot(self, table, name, title, xlabel, ylabel, series, kind="lines", caption=""):
        """Draw bench/NAME.png with gnuplot and attach it to `table`.

        kind="lines": series = [(label, [(x, y), ...]), ...]
        kind="bars":  series = [(label, [(category, y), ...]), ...] (clustered bars,
                      categories in the order of the first series)
        kind="hbars": series = [(label, [(category, y), ...])] (one series,
                      horizontal bars, first category on top; ylabel is the value axis)."""
        if not GNUPLOT:
            table.note("Plot %s not drawn: gnuplot is not installed (apt-get install gnuplot-nox)." % name)
            return None
        png = os.path.join(self.outdir, name + ".png")
        data = os.path.join(self.tmp, name + ".dat")
        gp = ["set terminal pngcairo size 900,500 noenhanced font ',10'" if _has_pngcairo()
              else "set terminal png size 900,500 noenhanced",
              "set output %s" % _gq(png), "set title %s" % _gq(title),
              "set xlabel %s" % _gq(xlabel), "set ylabel %s" % _gq(ylabel),
              "set grid ytics", "set key outside right top"]
        with open(data, "w") as f:
            if kind == "lines":
                for i, (label, pts) in enumerate(series):
                    f.write("# %s\n" % label)
                    for x, y in pts:
                        f.write("%r %r\n" % (x, y))
                    f.write("\n\n")
                gp.append("plot " + ", ".join("%s index %d using 1:2 with linespoints title %s"
                                              % (_gq(data), i, _gq(label))
                                              for i, (label, _) in enumerate(series)))
            elif kind == "bars":
                cats = [c for c, _ in series[0][1]]
                f.write("category " + " ".join('"%s"' % l.replace('"', "'") for l, _ in series) + "\n")
                for c in cats:
                    vals = [dict(pts).get(c, 0) for _, pts in series]
                    f.write('"%s" ' % c.replace('"', "'") + " ".join(repr(v) for v in vals) + "\n")
                gp += ["set style data histograms", "set style histogram clustered gap 1",
                       "set style fill solid 0.8 border -1", "set boxwidth 0.9", "set yrange [0:*]",
                       "set xtics rotate by -20"]
                gp.append("plot " + ", ".join("%s using %d:xtic(1) title columnheader(%d)"
                                              % (_gq(data), i + 2, i + 2) for i in range(len(series))))
            elif kind == "hbars":
                # One series, one horizontal bar per category, first category on top.
                label, pts = series[0]
                for i, (c, y) in enumerate(pts):
                    f.write('%d "%s" %r\n' % (len(pts) - 1 - i, c.replace('"', "'"), y))
                gp = [g for g in gp if not g.startswith("set xlabel") and not g.startswith("set ylabel")]
                gp += ["set xlabel %s" % _gq(ylabel), "set style fill solid 0.8 border -1",
                       "set xrange [0:*]", "set yrange [-0.6:%f]" % (len(pts) - 0.4), "unset key",
                       "set grid xtics", "set lmargin 34"]
                gp.append("plot %s using ($3/2):1:($3/2):(0.35):ytic(2) with boxxyerror title %s"
                          % (_gq(data), _gq(label)))
            else:
                raise ValueError("plot kind %r" % kind)
        r = subprocess.run([GNUPLOT], input="\n".join(gp) + "\n", text=True, capture_output=True,
                           timeout=60)
        if r.returncode != 0 or not os.path.exists(png):
            table.note("Plot %s not drawn: gnuplot failed: %s" % (name, r.stderr.strip()[-300:]))
            return None
        table.plots.append(dict(file=os.path.basename(png), caption=caption or title))
        return png


def _gq(s):
    return '"%s"' % str(s).replace("\\", "\\\\").replace('"', '\\"')


_PNGCAIRO = None


def _has_pngcairo():
    global _PNGCAIRO
    if _PNGCAIRO is None:
        r = subprocess.run([GNUPLOT, "-e", "set terminal"], capture_output=True, text=True)
        _PNGCAIRO = "pngcairo" in (r.stdout + r.stderr)
    return _PNGCAIRO


# ---------------------------------------------------------------- processes
class _Stream:
    """Collects a pipe in a thread, remembering when each chunk arrived."""

    def __init__(self, fd):
        self.fd = fd
        self.data = bytearray()
        self.marks = []          # (end offset, arrival ns)
        self.cond = threading.Condition()
        self.eof = False
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            t = now_ns()
            with self.cond:
                if not chunk:
                    self.eof = True
                    self.cond.notify_all()
                    break
                self.data += chunk
                self.marks.append((len(self.data), t))
                self.cond.notify_all()
        os.close(self.fd)

    def time_at(self, offset):
        """Arrival time of the byte at `offset`."""
        for end, t in self.marks:
            if end > offset:
                return t
        return None

    def text(self):
        with self.cond:
            return bytes(self.data).decode("utf-8", "replace")

    def wait(self, pattern, timeout, start=0, proc=None):
        """Wait for bytes `pattern` (bytes or str) at or after `start`; returns
        (offset, arrival ns). Raises if the stream ends first or on timeout."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                i = self.data.find(pattern, start)
                if i >= 0:
                    return i, self.time_at(i + len(pattern) - 1)
                if self.eof:
                    raise RuntimeError("output ended before %r" % pattern.decode(errors="replace"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no %r within %ss" % (pattern.decode(errors="replace"), timeout))
                self.cond.wait(min(left, 0.5))

    def wait_any(self, timeout, start=0):
        """Wait for at least one byte at `start`; returns its arrival ns."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.data) <= start:
                if self.eof:
                    raise RuntimeError("output ended without a byte")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no output within %ss" % timeout)
                self.cond.wait(min(left, 0.5))
            return self.time_at(start)


class Proc:
    """A process whose stdout (the guest console) and stderr are collected
    with arrival times. t0 is taken right before the spawn."""

    def __init__(self, b, args, env=None, name="proc"):
        self.b, self.args, self.name = b, list(args), name
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.exit_ns = None
        self.t0 = now_ns()
        self.p = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                  env=env, close_fds=True)
        os.close(out_w)
        os.close(err_w)
        b.procs.append(self)
        self.pid = self.p.pid
        self.out = _Stream(out_r)
        self.err = _Stream(err_r)
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self):
        self.p.wait()
        self.exit_ns = now_ns()

    def alive(self):
        return self.p.poll() is None

    def wait_exit(self, timeout=30):
        """Returns (exit status, ns of exit), once stdout and stderr are read to
        their end too (the last lines may still sit in the pipes at exit)."""
        self._waiter.join(timeout)
        if self._waiter.is_alive():
            raise TimeoutError("%s did not exit within %ss" % (self.name, timeout))
        for st in (self.out, self.err):
            st.th.join(10)   # a child the VMM forked may hold the pipe: do not wait forever
        return self.p.returncode, self.exit_ns

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def ms_since_start(self, t_ns):
        return (t_ns - self.t0) / 1e6

    def describe(self):
        return "%s (pid %d): stdout %r, stderr %r" % (self.name, self.pid, self.out.text()[-400:],
                                                   self.err.text()[-400:])


class QMP:
    """Minimal QMP client (mdvm and QEMU speak the same wire protocol)."""

    def __init__(self, path, timeout=20, proc=None):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if proc is not None and not proc.alive():
                    raise RuntimeError("exited before its QMP socket appeared: " + proc.describe())
                if time.monotonic() > deadline:
                    raise TimeoutError("QMP socket %s did not appear" % path)
                time.sleep(0.005)
        self.buf = b""
        self.events = []
        greeting = self._recv()
        if "QMP" not in greeting:
            raise RuntimeError("not a QMP greeting: %r" % greeting)
        self.cmd("qmp_capabilities")

    def _recv(self):
        dec = json.JSONDecoder()
        while True:
            text = self.buf.decode("utf-8", "replace").lstrip()
            if text:
                try:
                    obj, end = dec.raw_decode(text)
                    self.buf = text[end:].encode()
                    return obj
                except ValueError:
                    pass
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk

    def execute(self, name, args=None):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, name, args=None):
        r = self.execute(name, args)
        if "error" in r:
            raise RuntimeError("QMP %s: %s" % (name, r["error"].get("desc")))
        return r["return"]

    def has_command(self, name):
        return any(c["name"] == name for c in self.cmd("query-commands"))

    def close(self):
        self.sock.close()


class Vmm(Proc):
    """Common part of Mdvm and Qemu: console on stdout, optional QMP."""
    qmp_path = None
    ram_bytes = 0

    def connect(self, timeout=20):
        if not self.qmp_path:
            raise RuntimeError("started without a QMP socket")
        self.qmp = QMP(self.qmp_path, timeout, proc=self)
        return self.qmp

    def wait_console(self, text, timeout=60, start=0):
        """(offset, arrival ns) of `text` on the console."""
        return self.out.wait(text, timeout, start)

    def quit(self, timeout=30):
        """End the run through QMP `quit`; returns the exit status."""
        if self.alive():
            q = getattr(self, "qmp", None) or self.connect()
            try:
                q.execute("quit")
            except (OSError, EOFError):
                pass   # the VMM may close the socket before replying
        rc, _ = self.wait_exit(timeout)
        return rc

    def memory(self):
        """Host memory of this process, split into guest RAM and the rest."""
        return smaps_split(self.pid, self.guest_ram_vma)


class Mdvm(Vmm):
    """`build/mdvm run` on the test guest, console on stdout, a QMP socket,
    and the startup trace on stderr (MDVM_TRACE_STARTUP=1)."""

    def __init__(self, b, memory="256M", cmdline="idle", cpus=1, extra=(), qmp=True, trace=True,
                 name="mdvm"):
        if not os.access(MDVM, os.X_OK):
            raise NotMeasured("build/mdvm is not built (make)")
        self.ram_bytes = parse_size(memory)
        args = [MDVM, "run", "--kernel", GUEST, "--memory", str(memory), "--cpus", str(cpus),
                "--console", "stdio", "--cmdline", cmdline]
        if qmp:
            self.qmp_path = b.path(name + ".sock")
            args += ["--control", self.qmp_path]
        args += list(extra)
        env = dict(os.environ)
        if trace:
            env["MDVM_TRACE_STARTUP"] = "1"
        else:
            env.pop("MDVM_TRACE_STARTUP", None)
        super().__init__(b, args, env, name)

    def trace(self):
        """{event: (ns, detail)} from the startup trace so far."""
        ev = {}
        for m in re.finditer(r"^mdvm-trace: (\S+) (\d+)(?: (.*))?$", self.err.text(), re.M):
            ev.setdefault(m.group(1), (int(m.group(2)), m.group(3) or ""))
        return ev

    def window(self):
        ev = self.trace().get("memory")
        m = re.search(r"window=0x([0-9a-f]+)-0x([0-9a-f]+)", ev[1]) if ev else None
        if not m:
            raise NotMeasured("mdvm printed no guest RAM window (startup trace 'memory' event)")
        return int(m.group(1), 16), int(m.group(2), 16)

    def guest_ram_vma(self, vma):
        lo, hi = self.window()
        return vma["start"] >= lo and vma["end"] <= hi


class Qemu(Vmm):
    """qemu-system-x86_64 -accel tcg booting the test guest with -kernel (PVH).
    Console on stdout (-nographic), QMP socket, isa-debug-exit at 0x501 so the
    guest's `exit`/`poweroff` end the process (status (code << 1) | 1)."""

    def __init__(self, b, memory="256M", cmdline="idle", machine="pc", cpus=1, extra=(), qmp=True,
                 name=None):
        if not QEMU:
            raise NotMeasured("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        self.ram_bytes = parse_size(memory)
        self.machine = machine
        args = [QEMU, "-accel", "tcg", "-M", machine, "-m", str(memory), "-smp", str(cpus),
                "-nographic", "-no-reboot", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                "-kernel", GUEST, "-append", cmdline]
        name = name or "qemu-" + machine.split(",")[0]
        if qmp:
            self.qmp_path = b.path(name + ".sock")
            args += ["-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        args += list(extra)
        super().__init__(b, args, None, name)

    def guest_ram_vma(self, vma):
        # QEMU maps each RAM block as one anonymous VMA of exactly its size
        # (pc.ram / microvm.ram / a memory backend); -m sets that size.
        return vma["size"] == self.ram_bytes and (vma["path"] == "" or vma["path"].startswith("/memfd:"))


# ---------------------------------------------------------------- memory
_VMA_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) (\S+) (\S+) (\S+)\s*(.*)$")


def smaps(pid):
    """The VMAs of /proc/PID/smaps with their counters in bytes."""
    vmas, cur = [], None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            m = _VMA_RE.match(line)
            if m:
                cur = dict(start=int(m.group(1), 16), end=int(m.group(2), 16), perms=m.group(3),
                           path=m.group(7).strip())
                cur["size"] = cur["end"] - cur["start"]
                vmas.append(cur)
                continue
            k, _, v = line.partition(":")
            v = v.strip()
            if cur is not None and v.endswith(" kB"):
                cur[k] = int(v[:-3]) * KiB
    return vmas


def smaps_split(pid, is_guest):
    """Host memory of a process in bytes, split by is_guest(vma):

    rss:      resident pages (Rss) plus hugetlb pages (Shared_/Private_Hugetlb,
              which Rss leaves out), shared library pages included;
    dirty:    pages this process wrote and nobody else maps (Private_Dirty +
              Private_Hugetlb): heap, stacks, tables; what the process
              itself costs, whatever else runs on the machine;
    private:  pages mapped by this process only (Private_Clean + Private_Dirty
              + Private_Hugetlb); careful: library pages count here when no
              other process happens to map the same library;
    each for guest RAM VMAs ('guest_*') and for all other VMAs ('vmm_*')."""
    out = dict(guest_rss=0, guest_private=0, guest_dirty=0, vmm_rss=0, vmm_private=0, vmm_dirty=0,
               guest_vmas=0)
    for v in smaps(pid):
        rss = v.get("Rss", 0) + v.get("Shared_Hugetlb", 0) + v.get("Private_Hugetlb", 0)
        dirty = v.get("Private_Dirty", 0) + v.get("Private_Hugetlb", 0)
        priv = v.get("Private_Clean", 0) + dirty
        side = "guest" if is_guest(v) else "vmm"
        out[side + "_rss"] += rss
        out[side + "_private"] += priv
        out[side + "_dirty"] += dirty
        if side == "guest":
            out["guest_vmas"] += 1
    return out


# ---------------------------------------------------------------- machine
def _run(args):
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info():
    info = {}
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info["cores"] = os.cpu_count()
    info["cpu"] = model
    info["kernel"] = os.uname().release
    with open("/proc/meminfo") as f:
        mt = int(f.readline().split()[1]) * KiB
    info["memory"] = "%.1f GiB" % (mt / GiB)
    osname = ""
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    info["os"] = osname
    mods = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    info["kvm"] = ", ".join(mods) + (" (software virtualization: guest instructions are emulated)"
                                     if "kvm_pvm" in mods else "")
    info["load"] = " ".join(open("/proc/loadavg").read().split()[:3])
    return info


def versions():
    v = {}
    v["mdvm"] = _run([MDVM, "--version"]) or "(not built)"
    commit = _run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    # The previous run's own output (docs/benchmarks*) does not make the build dirty.
    dirty = _run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)docs/benchmarks.md", ":(exclude)docs/benchmarks"])
    v["git"] = commit + (" + uncommitted changes" if dirty else "")
    prod = ""
    out = _run(["sh", "-c", "readelf --debug-dump=info %s 2>/dev/null | grep -m1 DW_AT_producer" % MDVM])
    m = re.search(r"\):\s*(.*)$", out)
    if m:
        prod = m.group(1)
    v["compiler"] = prod or _run(["cc", "--version"]).splitlines()[0:1]
    v["qemu"] = (_run([QEMU, "--version"]).splitlines() or ["(not installed)"])[0] if QEMU \
        else "(not installed)"
    v["gnuplot"] = _run([GNUPLOT, "--version"]) if GNUPLOT else "(not installed)"
    v["python"] = sys.version.split()[0]
    return v
