import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nets.utils.jsonl_store import JsonlStore


def test_roundtrip_and_resume(tmp_path):
    p = tmp_path / "r.jsonl"
    s = JsonlStore(p)
    s.put("a", {"x": np.float64(1.5), "v": np.arange(3)})
    s.put("b", float("nan"))
    s2 = JsonlStore(p)
    assert s2.keys() == ["a", "b"]
    assert s2["a"] == {"x": 1.5, "v": [0, 1, 2]}
    assert s2["b"] == "nan"
    with pytest.raises(KeyError):
        s2.put("a", 1)


def test_truncated_tail_is_dropped_and_repaired(tmp_path):
    p = tmp_path / "r.jsonl"
    s = JsonlStore(p)
    s.put("a", 1)
    with open(p, "ab") as fh:
        fh.write(b'{"key": "b", "val')  # killed mid-write
    s2 = JsonlStore(p)
    assert s2.keys() == ["a"]
    s2.put("c", 3)
    assert [json.loads(l)["key"] for l in p.read_text().splitlines()] == ["a", "c"]


def test_a_bad_line_in_the_middle_loses_no_later_record(tmp_path):
    """A blank or damaged complete line (a merged or edited file) once ended the read
    and cut every later record off the file."""
    p = tmp_path / "r.jsonl"
    s = JsonlStore(p)
    for k in "abcdef":
        s.put(k, ord(k))
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(b"".join(lines[:2] + [b"\n", b"not json\n"] + lines[2:]))
    with pytest.warns(UserWarning, match=r"line\(s\) \[4\] are not records"):
        s2 = JsonlStore(p)
    assert s2.keys() == list("abcdef") and s2["f"] == ord("f")
    s2.put("g", 7)
    with pytest.warns(UserWarning):
        assert JsonlStore(p).keys() == list("abcdefg")


def test_sigkill_midway_then_resume_loses_and_duplicates_nothing(tmp_path):
    p = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from nets.utils.jsonl_store import JsonlStore
        s = JsonlStore({str(p)!r})
        for i in range(40):
            if str(i) in s:
                continue
            s.put(str(i), i * i)
            print(i, flush=True)
            time.sleep(0.02)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(10):
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(JsonlStore(p))
    assert 10 <= done_before < 40
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    keys = [json.loads(l)["key"] for l in p.read_text().splitlines()]
    assert keys == [str(i) for i in range(40)]
    assert JsonlStore(p)["39"] == 39 * 39


def test_a_second_writer_on_the_same_file_is_seen_before_a_put(tmp_path):
    """Store b appends "x" after store a read the file: a's put of "x" is refused
    (a duplicate), and a's put of a new key keeps b's record readable."""
    p = tmp_path / "s.jsonl"
    a, b = JsonlStore(p), JsonlStore(p)
    b.put("x", 1)
    with pytest.raises(KeyError, match="another writer"):
        a.put("x", 2)
    a.put("y", 3)
    assert a["x"] == 1 and dict(JsonlStore(p).items()) == {"x": 1, "y": 3}
