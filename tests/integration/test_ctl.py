"""`mdvm ctl` against a running guest (docs/control.md, `mdvm ctl`): value
conversion (sizes, booleans, key:=JSON), the $MDVM_SOCKET default,
--timeout, output formats and exit statuses, pmemsave through ctl."""
import json
import os
import socket
import subprocess

from mdvmtest import MDVM, PAGE, fill_pattern


def ctl(*args, sock=None, env=None, timeout=60):
    cmd = [MDVM, "ctl"] + (["--socket", sock] if sock else []) + list(args)
    e = dict(os.environ)
    e.pop("MDVM_SOCKET", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e,
                          stdin=subprocess.DEVNULL)


def test_pmemsave_sizes_and_content(vm, tmp_path):
    """`size=4K`, `size=4M`, `val=0x400000` and `val=4M` become integers; the
    file holds what the guest wrote, byte for byte what QMP pmemsave gives."""
    assert vm.guest("fill base=4M size=4M gen=9") == (0, "fill: done pages=1024 gen=9")
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    r = ctl("pmemsave", "val=0x400000", "size=4K", "filename=%s" % small, sock=vm.sock)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = ctl("pmemsave", "val=4M", "size=4M", "filename=%s" % big, sock=vm.sock)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert os.path.getsize(small) == 4096
    assert os.path.getsize(big) == 4 << 20
    data = big.read_bytes()
    assert small.read_bytes() == data[:4096]
    for i in range(0, len(data), PAGE):
        want = fill_pattern(((4 << 20) + i) // PAGE, 9).to_bytes(8, "little")
        assert data[i:i + 8] == want and data[i + 4088:i + 4096] == want, "page %d" % (i // PAGE)
    assert data == vm.pmemsave(4 << 20, 4 << 20)


def test_raw_json_and_types(vm, tmp_path):
    # key:=JSON passes the value as is: a string that looks like a number.
    f = tmp_path / "raw.bin"
    r = ctl("pmemsave", "val:=4194304", "size:=4096", "filename:=%s" % json.dumps(str(f)),
            sock=vm.sock)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(f) == 4096
    r = ctl("pmemsave", "val=0", 'size:="4K"', "filename=%s" % f, sock=vm.sock)
    assert r.returncode == 1
    assert r.stderr == "mdvm ctl: error: Invalid parameter type for 'size', expected: integer\n"
    r = ctl("pmemsave", "val=-1", "size=4K", "filename=%s" % f, sock=vm.sock)
    assert r.returncode == 1
    assert r.stderr == "mdvm ctl: error: Parameter 'val' expects a non-negative integer\n"
    r = ctl("pmemsave", "val=0", "size:={bad", "filename=%s" % f, sock=vm.sock)
    assert r.returncode == 2 and "bad JSON for 'size'" in r.stderr, r.stderr
    # true/false become booleans; anything else stays a string.
    for v in ("true", "false", ":=true"):
        r = ctl("query-balloon-stats", "refresh" + (v if v.startswith(":") else "=" + v),
                "--json", sock=vm.sock)
        assert r.returncode == 0, r.stderr
        assert "return" in json.loads(r.stdout)
    r = ctl("query-balloon-stats", "refresh=yes", sock=vm.sock)
    assert r.returncode == 1
    assert r.stderr == "mdvm ctl: error: Invalid parameter type for 'refresh', expected: boolean\n"
    r = ctl("query-status", "novalue", sock=vm.sock)
    assert r.returncode == 2 and "expected key=value, got 'novalue'" in r.stderr


def test_mdvm_socket_default(vm, tmp_path):
    r = ctl("query-status", env={"MDVM_SOCKET": vm.sock})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "status: running\nrunning: true\nsinglestep: false\n"
    # --socket wins over the environment.
    r = ctl("query-status", sock=vm.sock, env={"MDVM_SOCKET": str(tmp_path / "nope.sock")})
    assert r.returncode == 0, r.stderr
    r = ctl("query-status")
    assert r.returncode == 2
    assert "no control socket: use --socket PATH or set MDVM_SOCKET" in r.stderr
    r = ctl("query-status", env={"MDVM_SOCKET": str(tmp_path / "nope.sock")})
    assert r.returncode == 2
    assert "cannot connect to %s: No such file or directory" % (tmp_path / "nope.sock") in r.stderr


def test_timeout(tmp_path):
    """A server that never greets: --timeout bounds the wait, exit status 2."""
    path = str(tmp_path / "silent.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)   # never accepted: the connection completes, nothing is ever sent
    try:
        r = ctl("--timeout", "1", "query-status", sock=path, timeout=30)
        assert r.returncode == 2, r.stderr
        assert "mdvm ctl: timed out waiting for %s" % path in r.stderr, r.stderr
    finally:
        s.close()
    for bad in ("0", "x", "86401"):
        r = ctl("--timeout", bad, "query-status", sock=path)
        assert r.returncode == 2 and "bad --timeout '%s'" % bad in r.stderr, r.stderr


def test_output_formats(vm_factory):
    vm = vm_factory(cpus=2).start()
    r = ctl("query-cpus-fast", sock=vm.sock)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("cpu-index=0 ") and lines[1].startswith("cpu-index=1 ")
    r = ctl("query-commands", sock=vm.sock)
    assert "pmemsave" in r.stdout.splitlines() and "query-status" in r.stdout.splitlines()
    r = ctl("--json", "guest", "echo", "a", "b", sock=vm.sock)
    assert json.loads(r.stdout) == {"return": {"status": 0, "response": "a b"}}
    r = ctl("guest", "no-such-command", sock=vm.sock)
    assert r.returncode == 1
    assert r.stdout == "mdvm-guest: error: unknown command 'no-such-command'\n"
    assert "guest command failed with status 2" in r.stderr
    r = ctl("stop", sock=vm.sock)
    assert (r.returncode, r.stdout) == (0, "")
    assert ctl("query-status", sock=vm.sock).stdout.startswith("status: paused\n")
    assert ctl("cont", sock=vm.sock).returncode == 0
    r = ctl("quit", sock=vm.sock)
    assert (r.returncode, r.stdout) == (0, "")
    assert vm.wait_exit(10) == 0
