"""Loading, decoding, hashing and span access for a run's input.

A :class:`Source` is one decoded text: the files of a run joined in a fixed
order, each preceded by a one-line header naming it so that a model reading a
span knows which file it is in. Spans are character offsets into that text;
:meth:`Source.locate` turns an offset back into a file, a file offset and a line.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlm_graph.errors import SourceError

__all__ = [
    "FILE_HEADER_MARK",
    "Location",
    "Source",
    "SourceFile",
    "decode_bytes",
    "load_source",
    "source_from_documents",
    "source_from_text",
]

logger = logging.getLogger(__name__)

BINARY_SNIFF_BYTES = 8192
FILE_HEADER_MARK = "=== file: "
"""Starts the line naming each file in the joined text; never part of a file."""
SKIPPED_DIR_NAMES = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules"})


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a source and where its text sits in the joined text."""

    name: str
    """The path as the user gave it (or ``<stdin>``, ``<text>``)."""
    start: int
    """Offset of the file's first character in the joined text."""
    end: int
    """Offset just past the file's last character."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a joined-text offset falls in a file."""

    file: SourceFile
    offset: int
    """Character offset inside the file's own decoded text."""
    line: int
    """1-based line number inside the file."""


@dataclass(frozen=True)
class Source:
    """The decoded input of a run, addressed by span."""

    text: str
    files: tuple[SourceFile, ...]
    digest: str
    """SHA-256 over file names and texts: the source's identity."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", [f.start for f in self.files])

    @property
    def file_starts(self) -> list[int]:
        """Offsets where each file's header begins: the preferred split points."""
        return [_header_start(self.text, f.start) for f in self.files]

    def span(self, start: int, end: int) -> str:
        """Return the text of a span."""
        return self.text[start:end]

    def locate(self, offset: int) -> Location:
        """Map a joined-text offset to a file, an offset in it and a line number."""
        index = max(bisect.bisect_right(self._starts, offset) - 1, 0)  # type: ignore[attr-defined]
        file = self.files[index]
        local = min(max(offset - file.start, 0), file.end - file.start)
        newlines = self._newlines()
        line = (
            bisect.bisect_left(newlines, file.start + local)
            - bisect.bisect_left(newlines, file.start)
            + 1
        )

        return Location(file=file, offset=local, line=line)

    def _newlines(self) -> list[int]:
        # Offsets of every newline, found once: counting newlines per citation
        # made a 1M-token count answer with 25K citations take minutes
        # (rlm-graph eval, count task).
        cached: list[int] | None = getattr(self, "_newline_offsets", None)
        if cached is None:
            cached = _find_all(self.text, "\n")
            object.__setattr__(self, "_newline_offsets", cached)
        return cached

    def describe(self) -> str:
        """One line naming the source for messages: file count and size."""
        names = ", ".join(f.name for f in self.files[:3])
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        return f"{names}{more} ({len(self.text):,} characters)"


def source_from_text(text: str, name: str = "<text>") -> Source:
    """Build a source from a string held in memory.

    Raises:
        SourceError: the text is empty or only whitespace.
    """
    if not text.strip():
        msg = f"{name} is empty: there is nothing to ask a question about."
        raise SourceError(msg)
    return _join([(name, text)])


def source_from_documents(documents: list[tuple[str, str]]) -> Source:
    """Build a source from ``(name, text)`` pairs, joined as :func:`load_source` joins files."""
    return _join(documents)


def load_source(
    paths: Sequence[str | os.PathLike[str]],
    *,
    encoding: str = "utf-8",
    stdin_text: str | None = None,
) -> Source:
    """Read files, directories (their text files, recursively) or ``-`` (stdin).

    Args:
        paths: what the user named, in order; duplicates are read once.
        encoding: how to decode files; ``utf-8`` also strips a byte-order mark.
        stdin_text: text to use for ``-`` instead of reading ``sys.stdin``.

    Raises:
        SourceError: a path is missing, a named file is empty, binary or not
            decodable, or a directory holds no text file.
    """
    if not paths:
        msg = "No source given. Name a file, a directory, or '-' for stdin."
        raise SourceError(msg)

    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    documents: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in paths:
        for name, text in _read_path(str(raw), encoding, stdin_text):
            # The same file named twice ('a.txt', './a.txt') is read once.
            key = name if name.startswith("<") else os.path.realpath(name)
            if key not in seen:
                seen.add(key)
                documents.append((name, text))

    return _join(documents)


def _read_path(
    raw: str, encoding: str, stdin_text: str | None
) -> Iterable[tuple[str, str]]:
    if raw == "-":
        text = stdin_text if stdin_text is not None else sys.stdin.read()
        if not text.strip():
            msg = "stdin is empty: pipe some text in, or name a file."
            raise SourceError(msg)
        yield "<stdin>", text
        return

    path = Path(raw).expanduser()
    if not path.exists():
        msg = f"No such file or directory: '{raw}'."
        raise SourceError(msg)
    if path.is_dir():
        yield from _read_directory(path, raw, encoding)
        return
    if not path.is_file():
        msg = f"'{raw}' is not a regular file (a pipe, socket or device); name a text file."
        raise SourceError(msg)

    text = _decode_file(path, raw, encoding)
    if not text.strip():
        msg = f"'{raw}' is empty: there is nothing to ask a question about."
        raise SourceError(msg)
    yield raw, text


def _read_directory(
    directory: Path, raw: str, encoding: str
) -> Iterable[tuple[str, str]]:
    found = 0
    skipped: list[str] = []
    for path in sorted(_walk(directory)):
        name = os.path.join(raw, os.path.relpath(path, directory))
        try:
            text = _decode_file(path, name, encoding)
        except SourceError as exc:
            skipped.append(name)
            logger.info("skipping %s: %s", name, exc)
            continue
        if text.strip():
            found += 1
            yield name, text

    if not found:
        detail = f" ({len(skipped)} skipped as binary or not {encoding})" if skipped else ""
        msg = f"'{raw}' holds no text files{detail}. Name text files or another directory."
        raise SourceError(msg)
    if skipped:
        logger.warning(
            "skipped %d file(s) in %s that are binary or not %s, e.g. %s",
            len(skipped), raw, encoding, skipped[0],
        )


def _walk(directory: Path) -> Iterable[Path]:
    inside = directory.resolve()
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIR_NAMES and not d.startswith(".")]
        for file in files:
            path = Path(root, file)
            # Only regular files: a named pipe or socket would block the read.
            if file.startswith(".") or not path.is_file():
                continue
            # A symlink that leads out of the folder is not part of it: reading
            # it would escape a caller's sandbox (a tool's root_dir).
            if not path.resolve().is_relative_to(inside):
                logger.warning("skipping %s: a link to a file outside %s", path, directory)
                continue
            yield path


def _decode_file(path: Path, name: str, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"Cannot read '{name}': {exc.strerror or exc}."
        raise SourceError(msg) from exc

    return decode_bytes(data, name, encoding)


def decode_bytes(data: bytes, name: str, encoding: str = "utf-8") -> str:
    """Decode a source's bytes, or say clearly why they are not text.

    Raises:
        SourceError: binary data, an unknown codec, or bytes invalid in it.
    """
    nul = data.find(b"\x00", 0, BINARY_SNIFF_BYTES)
    if nul >= 0 and not encoding.lower().startswith("utf-16"):
        msg = f"'{name}' looks binary (NUL byte at offset {nul}); rlm-graph reads text."
        raise SourceError(msg)

    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in {"utf-8", "utf8"} else encoding
    try:
        return data.decode(codec)
    except LookupError as exc:
        msg = f"Unknown encoding '{encoding}'. Use a Python codec name such as latin-1."
        raise SourceError(msg) from exc
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        msg = (
            f"'{name}' is not valid {encoding}: byte 0x{bad} at offset {exc.start}. "
            "If the file uses another encoding, pass --encoding (e.g. --encoding latin-1)."
        )
        raise SourceError(msg) from exc


def _header(name: str) -> str:
    return f"{FILE_HEADER_MARK}{name} ===\n"


def _header_start(text: str, file_start: int) -> int:
    return text.rfind(FILE_HEADER_MARK, 0, file_start) if file_start else 0


def _join(documents: list[tuple[str, str]]) -> Source:
    parts: list[str] = []
    files: list[SourceFile] = []
    digest = hashlib.sha256()
    offset = 0
    for index, (name, text) in enumerate(documents):
        header = ("\n" if index else "") + _header(name)
        parts.append(header)
        offset += len(header)
        files.append(SourceFile(name=name, start=offset, end=offset + len(text)))
        parts.append(text)
        offset += len(text)
        digest.update(name.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")

    return Source(text="".join(parts), files=tuple(files), digest=digest.hexdigest())


def _find_all(text: str, char: str) -> list[int]:
    offsets = []
    at = text.find(char)
    while at >= 0:
        offsets.append(at)
        at = text.find(char, at + 1)
    return offsets
