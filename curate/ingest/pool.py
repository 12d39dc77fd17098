"""Helper processes that parse and normalise JSON-lines chunks for ingest, so it uses every core.

Each helper is a Python process running `serve(FORMAT)`: it reads chunks on stdin and answers each
with its `ChunkResult` frame on stdout. Plain pipes rather than multiprocessing: nothing is pickled,
the caller's script needs no `__main__` guard, and a helper whose parent dies reads end-of-file and
exits.

Results are taken oldest first, so they come back in input order. A helper is sent another chunk
only while everything it has not answered fits in half its stdin pipe (widened to 1 MiB where Linux
allows): the write then never waits on the helper, so neither side can block the other, and a
helper has its next chunk queued while the parent handles the last result. A helper that dies has
its chunks redone in this process: the output does not change."""

from __future__ import annotations

import collections
import gc
import logging
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from curate.ingest.chunks import ChunkResult, encode, normalize_lines, read_encoded

_REQUEST = struct.Struct("<QQQ")  # source length, first line's index, data length
_TOOLS = struct.Struct("<q")      # sent once, first: length of the default tools' JSON text; -1 for none
_PIPE_BYTES = 1 << 20             # the default /proc/sys/fs/pipe-max-size
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# The helper imports this very curate, first on its path: `python -m` would put the working directory
# first, and a `curate/` folder there (another checkout, another version) would answer instead.
_BOOT = ("import sys; sys.path[:] = [{root!r}] + [p for p in sys.path if p not in ('', '.')]; "
         "from curate.ingest.pool import serve; serve({fmt!r})")
log = logging.getLogger(__name__)

Chunk = tuple[str, int, bytes]  # source, first line's index, the lines


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else the CPU count (1 if unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _widen(fd: int) -> int:
    """The pipe's capacity after asking for _PIPE_BYTES (Linux only; elsewhere the 64 KiB default)."""
    try:
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        return 1 << 16


class Helper:
    """One helper process (`serve`) fed chunks through its stdin pipe; counts the bytes it has not answered.
    OSError when the interpreter cannot be started."""

    def __init__(self, fmt: str, tools: str | None = None):
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOT.format(root=_PACKAGE_ROOT, fmt=fmt)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        except OSError:
            self.stderr.close()
            raise
        # the tools go by pipe, not argv: a large tool set could pass the kernel's argument size limit
        text = b"" if tools is None else tools.encode()
        try:
            self.proc.stdin.write(_TOOLS.pack(-1 if tools is None else len(text)) + text)
            self.proc.stdin.flush()
        except OSError:  # it died at once: no process or file may outlive this failed start
            self.close(kill=True)
            raise
        self.capacity = _widen(self.proc.stdin.fileno())
        _widen(self.proc.stdout.fileno())  # a finished result waits in the pipe, not in the helper
        self.unanswered = 0  # bytes sent that have no answer yet

    def can_take(self, chunk: Chunk) -> bool:
        """Idle, or the chunk fits beside the unanswered ones in half the pipe: the write cannot block
        (the other half is slack for partly filled pipe pages)."""
        return self.unanswered == 0 or self.unanswered + _size(chunk) <= self.capacity // 2

    def send(self, chunk: Chunk) -> bool:
        """Write one chunk request; False when the helper is gone (broken pipe): the caller redoes the chunk."""
        source, start, data = chunk
        name = source.encode()
        try:
            self.proc.stdin.write(_REQUEST.pack(len(name), start, len(data)) + name)
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it died
            return False
        self.unanswered += _size(chunk)
        return True

    def receive(self, chunk: Chunk) -> ChunkResult | None:
        """The helper's answer to `chunk`, the oldest it has not answered; None when it died before answering."""
        result = read_encoded(self.proc.stdout.read)
        self.unanswered -= _size(chunk)
        return result

    def close(self, kill: bool = False) -> None:
        """Close its pipes and wait for the process (killed first with `kill`); its stderr file is dropped."""
        if kill:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.proc.wait()
        self.stderr.close()


def _size(chunk: Chunk) -> int:
    return _REQUEST.size + len(chunk[0].encode()) + len(chunk[2])


class HelperPool:
    """`with HelperPool(n, fmt, tools) as pool: for result in pool.map(source, chunks): ...`"""

    def __init__(self, n: int, fmt: str, tools: str | None = None):
        self.fmt, self.tools, self.lost = fmt, tools, 0  # lost: helpers that could not start or died
        self.helpers: list[Helper] = []
        self.pending: collections.deque = collections.deque()  # (helper or None: here, chunk), oldest first
        for _ in range(n):
            try:
                self.helpers.append(Helper(fmt, tools))
            except OSError as e:  # no usable interpreter to start: parse here instead
                self.lost += 1
                log.warning("ingest: could not start a helper process (%s); parsing in this process", e)

    def map(self, source: str, chunks: Iterable[tuple[int, bytes]]) -> Iterator[ChunkResult]:
        """Results of `curate.ingest.chunks.normalize_lines` for each (first line's index, lines) chunk, in
        order. If `chunks` raises, the results of the chunks before it are yielded first."""
        todo = ((source, start, data) for start, data in chunks)
        failure: list[Exception] = []

        def pull() -> Chunk | None:
            if failure:
                return None
            try:
                return next(todo, None)
            except Exception as e:  # an unreadable file: what came before it still counts
                failure.append(e)
                return None

        chunk = pull()
        try:
            while chunk is not None or self.pending:
                if chunk is not None and self._place(chunk):
                    chunk = pull()
                    continue
                result = self._oldest()
                while chunk is not None and self._place(chunk):  # refill helpers before handing it out
                    chunk = pull()
                yield result
        except GeneratorExit:  # the caller stopped early (--limit): in-flight results are not wanted
            for helper in {h for h, _ in self.pending if h in self.helpers}:
                self.helpers.remove(helper)
                helper.close(kill=True)
            self.pending.clear()
            raise
        if failure:
            raise failure[0]

    def _place(self, chunk: Chunk) -> bool:
        """Send the chunk to the least loaded helper that can take it without waiting; with no helper
        left, queue it to be done here, one at a time. False: not now."""
        if not self.helpers:
            if self.pending:
                return False
            self.pending.append((None, chunk))
            return True
        for helper in sorted(self.helpers, key=lambda h: h.unanswered):
            if helper.can_take(chunk):
                if helper.send(chunk):
                    self.pending.append((helper, chunk))
                else:
                    self._lose(helper)
                    self.pending.append((None, chunk))
                return True
        return False

    def _oldest(self) -> ChunkResult:
        helper, chunk = self.pending.popleft()
        result = helper.receive(chunk) if helper in self.helpers else None
        if result is None:  # it died (killed, out of memory): redo its chunk here, in its place
            if helper in self.helpers:
                self._lose(helper)
            return normalize_lines(*chunk, self.fmt, self.tools)
        return result

    def _lose(self, helper: Helper) -> None:
        code = helper.proc.poll()
        helper.stderr.seek(0)
        why = helper.stderr.read()[-2000:].decode(errors="replace").strip()
        helper.close(kill=True)
        self.helpers.remove(helper)
        self.lost += 1
        log.warning("ingest: a helper process died (exit code %s)%s; its chunks are redone in this process",
                    code, f": {why}" if why else "")

    def close(self) -> None:
        """Kill every helper and forget the pending chunks (also on leaving the `with` block)."""
        for helper in self.helpers:  # killed: an orderly interpreter exit would take ~0.2 s, for nothing
            helper.close(kill=True)
        self.helpers.clear()
        self.pending.clear()

    def __enter__(self) -> HelperPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoPandas:
    """pyarrow imports pandas (0.3 s) on its first `pa.array` call only to ask whether a list is a
    pandas object; a helper has no pandas objects, so the import is refused and pyarrow goes on."""

    def find_spec(self, name, path=None, target=None):
        """The meta path finder hook: ModuleNotFoundError for pandas and its submodules, None (not found here)
        for any other module."""
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"{name} is not used by ingest helpers", name=name)
        return None


def serve(fmt: str) -> None:
    """A helper's main loop: read the default tools, then answer each chunk request on stdin with its
    ChunkResult frame on stdout, until stdin ends."""
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas())
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    (n_tools,) = _TOOLS.unpack(stdin.read(_TOOLS.size))
    tools = None if n_tools < 0 else stdin.read(n_tools).decode()
    gc.freeze()  # the imports' objects: per-record garbage collection then scans only new ones
    while len(header := stdin.read(_REQUEST.size)) == _REQUEST.size:
        n_source, start, n_data = _REQUEST.unpack(header)
        source = stdin.read(n_source).decode()
        data = stdin.read(n_data)
        stdout.write(encode(normalize_lines(source, start, data, fmt, tools)))
        stdout.flush()

