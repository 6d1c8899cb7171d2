"""The sequential tar reader agrees with Python's tarfile on every format it may meet, and fails loudly.

python -m pytest tests/data/test_tarstream.py -q
"""

from __future__ import annotations

import io
import tarfile

import pytest

from clip_pl.data.tarstream import TarError, iter_tar


def _archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        dir_info = tarfile.TarInfo("somedir")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        files = [
            ("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
            ("000001.txt", "café ☕".encode()),
            ("000002.txt", b""),
            ("sub/" + "d" * 120 + "/000003.json", b"{}" * 700),
            ("ünïcode_" + "n" * 110 + ".txt", b"x" * 512),
        ]
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "c" * 600} if fmt == tarfile.PAX_FORMAT else {}
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _with_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_same_members_as_tarfile(fmt):
    data = _archive(fmt)
    expected = _with_tarfile(data)
    assert len(expected) == 5
    assert list(iter_tar(io.BytesIO(data))) == expected


def test_ustar_short_names():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a/b/000001.jpg", "000001.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    assert list(iter_tar(io.BytesIO(buf.getvalue()))) == [("a/b/000001.jpg", b"abc"), ("000001.txt", b"abc")]


def test_truncated_and_garbage_raise():
    data = _archive(tarfile.PAX_FORMAT)
    members = []
    with pytest.raises(TarError, match="truncated|end of data"):
        for member in iter_tar(io.BytesIO(data[: len(data) // 2 + 7])):
            members.append(member)
    assert 0 < len(members) < 5, "the members before the cut are still delivered"
    with pytest.raises(TarError, match="checksum"):
        list(iter_tar(io.BytesIO(b"not a tar file at all " * 60)))
    assert list(iter_tar(io.BytesIO(b""))) == []


class _ReadOnly:
    """A stream with read() only, like webdataset's pipe: wrapper (the reader's other branch)."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(size)  # whole, as the pipe's BufferedReader reads


class _ShortReads(io.RawIOBase):
    """readinto() that fills at most 1000 bytes a call, as a socket or FIFO may."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._inner.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("stream", [io.BytesIO, _ShortReads, _ReadOnly])
def test_every_kind_of_stream_gives_the_same_members(stream):
    """Files are read into bytearrays (writable: the JPEG decode wraps them without a copy), a pipe gives
    bytes; the members are the same either way, short reads included."""
    data = _archive(tarfile.PAX_FORMAT)
    members = list(iter_tar(stream(data)))
    assert members == _with_tarfile(data)
    assert all(type(d) is (bytes if stream is _ReadOnly else bytearray) for _, d in members)


def test_any_changed_header_byte_fails_the_checksum():
    """The checksum is taken through Adler-32; it must still catch a change anywhere in a header."""
    data = _archive(tarfile.GNU_FORMAT)
    first_file = 512  # the directory's header comes first, then this file's
    for offset in (0, 99, 124, 147, 156, 300, 511):
        broken = bytearray(data)
        broken[first_file + offset] ^= 0x01
        with pytest.raises(TarError, match="checksum"):
            list(iter_tar(io.BytesIO(bytes(broken))))
