"""Tar shards: which files are shards, and their raw samples read member by member.

A raw sample is a run of consecutive tar members sharing a key (`000123.jpg`, `000123.txt`,
`000123.json` -> key `000123`), as in webdataset. The reader is our own rather than `tarfile`
because the pipeline needs two things `tarfile` does not give: skipping samples without reading
their bytes (to reach a resume point cheaply), and telling a truncated or corrupt shard apart from
a clean end (`tarfile` silently stops at a cut between members or at a garbage header).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import tarfile
from typing import Iterator

import braceexpand

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split: key up to the first dot of the basename


class ShardLost(Exception):
    """The rest of a shard cannot be read. `reason` is the skip-count key, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _is_local(url: str) -> bool:
    return not _URL_SCHEME.match(url)


def _tars_in(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(TAR_SUFFIXES))


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard URLs in the given order: brace notation expanded, a local directory replaced by its tar
    files (sorted by name), and local files that are not tars left out with a warning: img2dataset
    writes `00000.parquet` and `00000_stats.json` next to `00000.tar`, and `dir/*` picks them up."""
    urls, ignored = [], []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if _is_local(url) and os.path.isdir(url):
                urls += _tars_in(url)
            elif _is_local(url) and os.path.isfile(url) and not url.endswith(TAR_SUFFIXES):
                ignored.append(url)
            else:
                urls.append(url)
    if ignored:
        log.warning("not tar shards, ignored: %s%s", ", ".join(ignored[:3]),
                    f" ... ({len(ignored)} in all)" if len(ignored) > 3 else "")
    return urls


def missing_local_shards(patterns: list[str]) -> list[str]:
    """Local shard paths (brace notation expanded) that do not exist, and local directories holding no
    tar files; URLs are not checked."""
    missing = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if not _is_local(url):
                continue
            if os.path.isdir(url):
                if not _tars_in(url):
                    missing.append(f"{url} (a directory with no {'/'.join(TAR_SUFFIXES)} files)")
            elif not os.path.isfile(url):
                missing.append(url)
    return missing


class TarStream:
    """Sequential reader of an uncompressed tar stream: `next()` gives (name, size) of each regular
    file, `read()` its bytes; a file not read is skipped (by seeking where the stream allows).
    Raises ShardLost where `tarfile` would stop silently: a stream that ends before the end-of-archive
    block (a cut between members or inside a header) or a header with a bad checksum."""

    def __init__(self, f):
        self.f, self.size, self.left = f, 0, 0  # current file's size, and its padded bytes not yet consumed
        try:
            self.seekable = f.seekable()
        except (AttributeError, OSError):
            self.seekable = False

    def next(self) -> tuple[str, int] | None:
        self._skip(self.left)
        long_name = None
        while True:
            header = self._read(512, "archive ends without its end-of-archive block")
            if header.count(0) == 512:
                return None
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")  # checks the checksum
            except (tarfile.HeaderError, ValueError) as e:
                raise ShardLost("corrupt shard", f"bad tar header ({e})") from None
            self.size, self.left = info.size, -(-info.size // 512) * 512
            if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):  # the next member's long name
                long_name = _long_name(info.type, self.read())
            elif info.isreg():
                return long_name or info.name, info.size
            else:  # directories, links, global pax headers: nothing to read
                self._skip(self.left)
                long_name = None

    def read(self) -> bytes:
        data = self._read(self.left, "cut inside a file")[: self.size]
        self.left = 0
        return data

    def _read(self, n: int, where: str) -> bytes:
        buf = self.f.read(n)
        while len(buf) < n:  # pipes may return less than asked
            more = self.f.read(n - len(buf))
            if not more:
                raise ShardLost("truncated shard", where)
            buf += more
        return buf

    def _skip(self, n: int) -> None:
        if n and self.seekable:
            self.f.seek(n, os.SEEK_CUR)  # past the end is caught by the next header read
        else:
            while n:
                step = min(n, 1 << 20)
                self._read(step, "cut inside a file")
                n -= step


def _long_name(kind: bytes, data: bytes) -> str | None:
    if kind == tarfile.GNUTYPE_LONGNAME:
        return data.rstrip(b"\0").decode("utf-8", "surrogateescape")
    path, i = None, 0
    try:
        while i < len(data) and data[i:i + 1] != b"\0":  # pax records: b"<len> <key>=<value>\n"
            length = int(data[i:data.index(b" ", i)])
            key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
            if key == b"path":
                path = value.decode("utf-8", "surrogateescape")
            i += max(length, 1)
    except ValueError:
        raise ShardLost("corrupt shard", "bad pax header") from None
    return path


def _open(url: str):
    from webdataset.gopen import gopen

    f = gopen(url, "rb")
    return gzip.GzipFile(fileobj=f) if url.endswith((".gz", ".tgz")) else f


def _close(f) -> None:
    try:
        f.close()
    except Exception as e:  # a pipe closed before its end reports the killed child; nothing is lost by it
        log.debug("closing shard: %r", e)


def tar_samples(url: str, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes]] | ShardLost]:
    """Raw samples (key, {ext: bytes}) of a shard in tar order, after the first `skip`, whose bytes are
    passed over unread. Members without an extension are ignored. If the shard cannot be read to its
    end, the last item is a ShardLost instead (the sample being read at the cut is part of the loss)."""
    try:
        f = _open(url)
    except Exception as e:
        yield ShardLost("unreadable shard", repr(e))
        return
    tar, key, fields, n = TarStream(f), None, {}, 0  # n: samples started so far
    try:
        while (member := tar.next()) is not None:
            m = _KEY_EXT.match(member[0])
            if m is None:
                continue
            if m.group(1) != key:
                if n > skip:
                    yield key, fields
                key, fields, n = m.group(1), {}, n + 1
            if n > skip:
                fields[m.group(2).lower()] = tar.read()
        if n > skip:
            yield key, fields
    except ShardLost as e:
        yield e
    except EOFError as e:  # a cut .tar.gz
        yield ShardLost("truncated shard", repr(e))
    except Exception as e:  # corrupt gzip data, network errors from a pipe, ...
        yield ShardLost("unreadable shard", repr(e))
    finally:
        _close(f)
