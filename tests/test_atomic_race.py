"""``atomic_dir`` under concurrent writers (processes): no crash, no leaked ``.tmp``/``.old`` folder or
lock file, and a reader never sees a partial tree. (The store's "one computes, the others reuse" is
``tests/test_store_verify.py::test_concurrent_runs_compute_once``.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ATOMIC = Path(__file__).resolve().parents[1] / "nbsim" / "io" / "atomic.py"

# loads nbsim/io/atomic.py alone (no torch import: the processes start in a fraction of a second)
_PRELUDE = textwrap.dedent(f"""
    import importlib.util, os, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("atomic", {str(ATOMIC)!r})
    atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)
    final = Path(sys.argv[1]); go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
""")

WRITER = _PRELUDE + textwrap.dedent("""
    n = int(sys.argv[3])
    for i in range(n):
        token = f"{os.getpid()}-{i}"
        with atomic.atomic_dir(final) as tmp:
            for name in ("a.txt", "b.txt", "c.txt"):
                (tmp / name).write_text(token)
            os.mkdir(tmp / "sub")
            (tmp / "sub" / "d.txt").write_text(token)
""")

READER = _PRELUDE + textwrap.dedent("""
    seen = partial = 0
    deadline = time.time() + float(sys.argv[3])
    while time.time() < deadline:
        try:                                          # one tree: its files read through one folder fd
            dfd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            continue                                  # between the two renames: absent, not partial
        tokens = set()
        try:
            for n in ("a.txt", "b.txt", "c.txt", "sub/d.txt"):
                fd = os.open(n, os.O_RDONLY, dir_fd=dfd)
                tokens.add(os.read(fd, 100).decode())
                os.close(fd)
        except FileNotFoundError:
            tokens.add("missing")                     # a file absent from a published tree
        try:                                          # still the published tree? (a replaced one is
            current = os.stat(final).st_ino == os.fstat(dfd).st_ino   # being deleted: not counted)
        except FileNotFoundError:
            current = False
        os.close(dfd)
        if not current:
            continue
        seen += 1
        partial += len(tokens) != 1
    print(seen, partial)
""")


def test_concurrent_atomic_dir_writers(tmp_path):
    """6 writer processes publish one folder 40 times each (240 publishes, each replacing the last)
    while a reader checks it: every writer exits 0, the reader never sees a mixed tree, and the
    parent ends with the final folder alone."""
    final, go = tmp_path / "store" / "entry", tmp_path / "go"
    final.parent.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(final), str(go), "40"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(final), str(go), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    go.touch()                                        # all start at once
    results = [p.communicate(timeout=120) + (p.returncode,) for p in writers]
    out, err = reader.communicate(timeout=120)
    failed = [(rc, e[-500:]) for _, e, rc in results if rc != 0 or e]
    assert not failed, failed
    assert reader.returncode == 0, err
    seen, partial = map(int, out.split())
    assert seen > 0 and partial == 0
    assert sorted(p.name for p in final.parent.iterdir()) == ["entry"]
    tokens = {(final / n).read_text() for n in ("a.txt", "b.txt", "c.txt", "sub/d.txt")}
    assert len(tokens) == 1


def test_file_lock_is_exclusive_and_leaves_nothing(tmp_path):
    """Processes incrementing a counter under ``file_lock`` lose no update; the lock file is gone."""
    script = _PRELUDE + textwrap.dedent("""
        counter = final
        for _ in range(50):
            with atomic.file_lock(counter.parent / ".counter.lock"):
                v = int(counter.read_text())
                counter.write_text(str(v + 1))
    """)
    counter, go = tmp_path / "counter", tmp_path / "go"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(counter), str(go)]) for _ in range(4)]
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert counter.read_text() == "200"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter", "go"]
