"""Helper processes that parse and normalise JSON-lines chunks for ingest, so it uses every core.

Each helper is `python -m curate.stages.ingest_pool FORMAT`: it reads chunks on stdin and answers each
with its `ChunkResult` frame on stdout. Plain pipes rather than multiprocessing: nothing is pickled,
the caller's script needs no `__main__` guard, and a helper whose parent dies reads end-of-file and
exits. Each helper holds one chunk at a time and results are taken oldest first, so they come back in
input order and neither side can block the other on a full pipe. A helper that dies has its chunk
redone in this process: the output does not change."""

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

from curate.stages.ingest_chunks import ChunkResult, encode, normalize_lines, read_encoded

_REQUEST = struct.Struct("<QQQ")  # source length, first line's index, data length
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
log = logging.getLogger(__name__)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Helper:
    def __init__(self, fmt: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, fmt], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)

    def send(self, source: str, start: int, data: bytes) -> bool:
        name = source.encode()
        try:
            self.proc.stdin.write(_REQUEST.pack(len(name), start, len(data)) + name)
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self) -> ChunkResult | None:
        return read_encoded(self.proc.stdout.read)

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.proc.wait()
        self.stderr.close()


class HelperPool:
    """`with HelperPool(n, fmt) as pool: for result in pool.map(source, chunks): ...`"""

    def __init__(self, n: int, fmt: str):
        self.fmt, self.lost = fmt, 0  # lost: helpers that could not start or died
        self.idle: collections.deque = collections.deque()
        self.busy: collections.deque = collections.deque()  # (helper or None: here, chunk), oldest first
        for _ in range(n):
            try:
                self.idle.append(Helper(fmt))
            except OSError as e:  # no usable interpreter to start: parse here instead
                self.lost += 1
                log.warning("ingest: could not start a helper process (%s); parsing in this process", e)

    def map(self, source: str, chunks: Iterable[tuple[int, list[bytes]]]) -> Iterator[ChunkResult]:
        """Results of `ingest_chunks.normalize_lines` for each chunk, in order. If `chunks` raises, the
        results of the chunks before it are yielded first."""
        try:
            for start, lines in chunks:
                chunk = (source, start, b"".join(lines))
                while not self.idle and self.busy:
                    yield self._oldest()
                helper = self.idle.popleft() if self.idle else None  # None: every helper died
                if helper and not helper.send(*chunk):
                    self._lose(helper)
                    helper = None
                self.busy.append((helper, chunk))
        except GeneratorExit:  # the caller stopped early (--limit): in-flight results are not wanted
            for helper, _ in self.busy:
                if helper:
                    helper.close(kill=True)
            self.busy.clear()
            raise
        except Exception:
            while self.busy:
                yield self._oldest()
            raise
        while self.busy:
            yield self._oldest()

    def _oldest(self) -> ChunkResult:
        helper, chunk = self.busy.popleft()
        result = helper.receive() if helper else None
        if result is None:  # it died (killed, out of memory): redo its chunk here, in its place
            if helper:
                self._lose(helper)
            return normalize_lines(*chunk, self.fmt)
        self.idle.append(helper)
        return result

    def _lose(self, helper: Helper) -> None:
        code = helper.proc.poll()
        helper.stderr.seek(0)
        why = helper.stderr.read()[-2000:].decode(errors="replace").strip()
        helper.close(kill=True)
        self.lost += 1
        log.warning("ingest: a helper process died (exit code %s)%s; its chunk is redone in this process",
                    code, f": {why}" if why else "")

    def close(self) -> None:
        for helper, _ in self.busy:
            if helper:
                helper.close(kill=True)
        for helper in self.idle:
            helper.close()
        self.busy.clear()
        self.idle.clear()

    def __enter__(self) -> HelperPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(fmt: str) -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    gc.freeze()  # the imports' objects: per-record garbage collection then scans only new ones
    while len(header := stdin.read(_REQUEST.size)) == _REQUEST.size:
        n_source, start, n_data = _REQUEST.unpack(header)
        source = stdin.read(n_source).decode()
        data = stdin.read(n_data)
        stdout.write(encode(normalize_lines(source, start, data, fmt)))
        stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
