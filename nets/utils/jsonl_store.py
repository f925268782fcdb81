"""Append-only JSON-lines result store that survives interrupts.

Long sweeps (batch-size sweeps, learning-rate bisection, learner comparisons, the
paper checks) write each finished item as one JSON line keyed by a string. A line is
written with a single `os.write` on a file opened with O_APPEND and then fsync'ed, so
a SIGKILL leaves either the whole line or a truncated last line; a truncated last line
(no newline) is ignored and cut off on the next open. A complete line that does not
parse as a record (a blank line, an edited or merged file) is skipped with a warning
and left in place: the records after it still count. Re-running a sweep therefore
skips the keys already present and never duplicates them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from nets.utils.atomic import atomic_write
from nets.utils.callers import caller_stacklevel
from nets.utils.jsonio import to_jsonable

_jsonable = to_jsonable


def _line(key: str, value) -> bytes:
    """One record as its line in the file (`value` already JSON-ready)."""
    return (json.dumps({"key": key, "value": value}, allow_nan=False) + "\n").encode()


class JsonlStore:
    """A keyed, resumable record of finished results in one `.jsonl` file.

    >>> store = JsonlStore(path)
    >>> for key in keys:
    ...     if key in store: continue
    ...     store.put(key, compute(key))
    """

    def __init__(self, path: str | os.PathLike, *, name: str = "store"):
        # `name`: the caller's argument in the message (Path(5) said only "expected str,
        # bytes or os.PathLike object, not int")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{name} must be a file path (str or os.PathLike), got "
                            f"{type(path).__name__}")
        self.path = Path(path)
        self._records: dict[str, Any] = {}
        self._size = 0                 # the file's size as this store last saw it
        try:                           # the OS's errors (a folder, no such place), named
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as exc:
            raise ValueError(f"{name}: cannot use {str(path)!r} as a results file "
                             f"({type(exc).__name__}: {exc})") from exc

    def _load(self) -> None:
        if not self.path.exists():
            self._size = 0
            return
        raw = self.path.read_bytes()
        self._size = len(raw)
        good_end = raw.rfind(b"\n") + 1          # a tail without newline: killed mid-write
        bad = []
        for number, line in enumerate(raw[:good_end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._records[str(rec["key"])] = rec["value"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                bad.append(number)
        tail = raw[good_end:]
        first_record_cut = tail.lstrip().startswith(b'{"key"') and not _complete_json(tail)
        if raw.strip() and not self._records and (bad or not first_record_cut):
            # not a store (nothing in it is a record, or the start of one cut short by a
            # kill): a json.dump'd results file (one line, no newline) was cut to zero bytes
            # as a "damaged tail", a checkpoint had records appended to it
            raise ValueError(f"{self.path} is not a JSON-lines store (no line of it is a "
                             "record): pass another path, or remove the file")
        if bad:
            warnings.warn(f"{self.path}: line(s) {bad[:10]} are not records and were skipped "
                          f"({len(self._records)} records read)", UserWarning, stacklevel=caller_stacklevel())
        if good_end < len(raw):  # drop the damaged tail so later appends stay parseable
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
            self._size = good_end

    def __contains__(self, key: str) -> bool:
        return str(key) in self._records

    def __getitem__(self, key: str):
        return self._records[str(key)]

    def __len__(self) -> int:
        return len(self._records)

    def keys(self) -> list[str]:
        return list(self._records)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._records.items())

    def get(self, key: str, default=None):
        return self._records.get(str(key), default)

    def put(self, key: str, value: Any) -> None:
        """Append one record atomically (one write + fsync). Re-putting a key is an error,
        so that resumed runs cannot silently duplicate work — also when another writer
        (a second store on the same file) appended the key since this one last read it."""
        key = str(key)
        if key not in self._records and self._grown():
            self._load()               # another writer appended: see its keys first
            if key in self._records:
                raise KeyError(f"key {key!r} was stored in {self.path} by another writer "
                               "since this store read it")
        if key in self._records:
            raise KeyError(f"key {key!r} already stored in {self.path}")
        value = _jsonable(value)
        line = _line(key, value)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
            self._size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self._records[key] = value

    def drop(self, predicate: Callable[[str], bool]) -> int:
        """Remove every record whose key satisfies `predicate`, rewriting the file
        atomically (lines that were not records go too); returns how many."""
        keep = {k: v for k, v in self._records.items() if not predicate(k)}
        removed = len(self._records) - len(keep)
        if removed:
            text = b"".join(_line(k, v) for k, v in keep.items())
            atomic_write(self.path, lambda fh: fh.write(text))
            self._records, self._size = keep, len(text)
        return removed

    def _grown(self) -> bool:
        try:
            return os.path.getsize(self.path) != self._size
        except OSError:
            return False

    def get_or_compute(self, key: str, fn: Callable[[], Any]):
        """Return the stored value for `key`, computing and storing it if absent."""
        if key not in self:
            self.put(key, fn())
        return self[key]


def _complete_json(raw: bytes) -> bool:
    """Whether `raw` parses as one JSON value (a whole file written by json.dump, not a
    record cut short by an interrupted write)."""
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True
