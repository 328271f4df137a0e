"""One validated way to read the small structured files glmq trusts nothing about.

Every JSON or TOML file glmq reads (``model_index.json``, ``config.json``, safetensors indexes and headers,
manifests, recipes, GGUF metadata strings) goes through here, so that hostile input fails the same way
everywhere: one :class:`~glmq.errors.CheckpointError` line naming the file, never a traceback, a hang or a
silent acceptance.

- **Regular files only.** Files are opened with ``O_NONBLOCK`` (so a FIFO never blocks ``open()``) and
  checked with ``fstat``: FIFOs, sockets, devices (a ``config.json`` linked to ``/dev/zero``) and folders
  are refused before a byte is read.
- **Size caps.** A config is kilobytes, an index megabytes; the cap is checked on the size and again on
  the bytes actually read (a file that grows while read is refused).
- **Bounded nesting.** Brackets are counted outside strings before the parser runs, because Python's JSON
  parser recurses once per level (100,000 brackets raise ``RecursionError``).
- **Bounded numbers.** Integers longer than :data:`MAX_INT_DIGITS` digits and non-finite floats (``NaN``,
  ``Infinity``, ``1e999``) are refused while parsing: a 5,000-digit integer would otherwise trip Python's
  int-conversion limit, and nothing glmq reads holds such numbers.
- **Typed accessors** (:func:`want_int`, :func:`want_str`, :func:`want_str_map`, ...) for the fields callers
  use, each failing with a one-line message that names the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

from glmq.errors import CheckpointError

KiB, MiB = 1024, 1024 * 1024
# Caps by kind of file. Released configs are < 10 KB; a glmq quantization_config lists every quantized layer
# (about 60 KB for the full AR); indexes of the release are ~100 KB and manifests a few KB.
MAX_CONFIG_BYTES = 16 * MiB
MAX_INDEX_BYTES = 64 * MiB
MAX_SMALL_BYTES = 1 * MiB  # model_index.json, recipes, scheduler configs
MAX_DEPTH = 64  # released configs nest 4 deep
MAX_INT_DIGITS = 40  # tokenizer configs write 1e30 as "no limit"; 2**128 has 39 digits

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_TOKENS_STR = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, what: str, *, max_bytes: int | None = None) -> tuple[BinaryIO, int]:
    """Open ``path`` for binary reading if it is a regular file (at most ``max_bytes``); returns (file, size).

    Opened non-blocking, so a FIFO cannot hang ``open()``; the type is checked on the open descriptor, so a
    file swapped after a ``stat`` cannot slip through.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open {what} ({e.strerror or e.__class__.__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: {what} is {_kind(st.st_mode)}, expected a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise CheckpointError(f"{path}: {what} is {st.st_size} bytes, more than the {max_bytes} glmq accepts")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes."""
    f, _ = open_regular(path, what, max_bytes=max_bytes)
    try:
        with f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e.__class__.__name__})") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: {what} grew past {max_bytes} bytes while being read")
    return data


def nesting_depth(data: bytes | str) -> int:
    """The deepest bracket nesting of JSON/TOML text, counting ``[`` and ``{`` outside double-quoted strings.

    Linear in the text and not recursive. TOML's single-quoted strings are not skipped, so brackets inside
    them may overcount (never undercount): a false refusal needs 64 brackets inside a literal string.
    """
    pattern = _TOKENS if isinstance(data, bytes) else _TOKENS_STR
    depth = deepest = 0
    for m in pattern.finditer(data):
        tok = m.group()
        if len(tok) != 1:
            continue  # a string
        if tok in (b"[", b"{", "[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class _Refused(ValueError):
    pass


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(s.lstrip('-'))} digits")
    return int(s)


def _parse_float(s: str) -> float:
    if len(s) > 64:
        raise _Refused(f"a number of {len(s)} characters")
    v = float(s)
    if not math.isfinite(v):
        raise _Refused(f"the out-of-range number {s[:20]}")
    return v


def _parse_constant(s: str):
    raise _Refused(f"the non-standard constant {s}")


def _bounded_text(data: bytes | str, where, what: str, max_depth: int) -> str:
    """UTF-8 text nested at most ``max_depth`` levels (checked before any recursive parser sees it)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: {what} is not valid UTF-8") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise CheckpointError(f"{where}: {what} nests {depth} levels deep, more than the {max_depth} glmq accepts")
    return text


def loads_json(data: bytes | str, where: str | os.PathLike, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text from ``where`` (a path or a description) into Python values; one-line errors."""
    text = _bounded_text(data, where, what, max_depth)
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _Refused as e:
        raise CheckpointError(f"{where}: {what} holds {e}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        detail = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "too deep"
        raise CheckpointError(f"{where}: {what} is not valid JSON ({detail})") from None


def read_json(path: str | os.PathLike, what: str, *, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a regular file of at most ``max_bytes``; :class:`CheckpointError` otherwise."""
    data = loads_json(read_bytes(path, what, max_bytes), path, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def read_toml(path: str | os.PathLike, what: str, *, max_bytes: int = MAX_SMALL_BYTES) -> dict:
    """A TOML document from a regular file of at most ``max_bytes``; :class:`CheckpointError` otherwise."""
    import tomllib

    text = _bounded_text(read_bytes(path, what, max_bytes), path, what, MAX_DEPTH)
    try:
        return tomllib.loads(text, parse_float=_parse_float)
    except _Refused as e:
        raise CheckpointError(f"{path}: {what} holds {e}") from None
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CheckpointError(f"{path}: {what} is not valid TOML ({detail})") from None


# ---- typed accessors: each names the file and the field -----------------------------------------------------

def want_int(value: Any, where: str, field: str, *, lo: int = 0, hi: int = 1 << 62) -> int:
    """``value`` as an int in ``[lo, hi]`` (bools, floats and strings refused)."""
    if type(value) is not int:
        raise CheckpointError(f"{where}: {field} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise CheckpointError(f"{where}: {field} = {_show(value)} is outside [{lo}, {hi}]")
    return value


def want_number(value: Any, where: str, field: str) -> float:
    """A finite int or float (bools refused)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {field} must be a finite number, got {_show(value)}")
    return value


def want_str(value: Any, where: str, field: str, *, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {field} must be a string, got {_show(value)}")
    if len(value) > max_len:
        raise CheckpointError(f"{where}: {field} is a string of {len(value)} characters, more than {max_len}")
    return value


def want_bool(value: Any, where: str, field: str) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {field} must be true or false, got {_show(value)}")
    return value


def want_dict(value: Any, where: str, field: str) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {field} must be a JSON object, got {_show(value)}")
    return value


def want_list(value: Any, where: str, field: str, *, max_len: int = 1 << 20) -> list:
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: {field} must be a list, got {_show(value)}")
    if len(value) > max_len:
        raise CheckpointError(f"{where}: {field} has {len(value)} entries, more than {max_len}")
    return value


def want_int_list(value: Any, where: str, field: str, *, lo: int = 0, hi: int = 1 << 62,
                  max_len: int = 1 << 20) -> list[int]:
    """A list of ints, each in ``[lo, hi]``."""
    return [want_int(v, where, f"{field}[{i}]", lo=lo, hi=hi)
            for i, v in enumerate(want_list(value, where, field, max_len=max_len))]


def want_str_map(value: Any, where: str, field: str) -> dict[str, str]:
    """A JSON object whose values are all strings."""
    for k, v in want_dict(value, where, field).items():
        want_str(v, where, f"{field}[{k[:60]!r}]", max_len=1 << 20)
    return value


def _show(value: Any) -> str:
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
