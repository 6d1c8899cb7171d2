"""The shard reader's grouping of tar members into samples is webdataset's.

python -m pytest tests/data/test_reader.py -q
"""

from __future__ import annotations

import pytest
from webdataset.tariterators import group_by_keys

from clip_pl.data.reader import _META, _group

URL = "shards/00000.tar"
NAMES = [
    "000001.jpg",
    "000001.TXT",
    "000001.json",
    "__index__",
    "__meta__/info.json",
    "noextension",
    ".hidden.jpg",
    "dir.x/file",
    "a/b.c/000002.tar.gz",
    "a/b.c/000002.txt",
    "000003.jpg",
    "000003.cls",
    "sub/000004.JPG",
    "sub/000004.txt",
    "000001.jpg",
]  # the key seen again later: a new sample


def _webdatasets(names: list[str]) -> list[dict]:
    files = ({"fname": n, "data": n.encode(), "__url__": URL} for n in names if not _META.match(n))
    return list(group_by_keys(files))


def test_samples_are_webdatasets_group_by_keys():
    ours = list(_group(((n, n.encode()) for n in NAMES), URL))
    assert ours == _webdatasets(NAMES)
    assert [s["__key__"] for s in ours] == ["000001", "a/b.c/000002", "000003", "sub/000004", "000001"]


def test_a_field_twice_in_one_sample_is_an_error_as_in_webdataset():
    names = ["000001.jpg", "000001.txt", "000001.JPG"]
    with pytest.raises(ValueError, match="duplicate"):
        _webdatasets(names)
    with pytest.raises(ValueError, match="duplicate"):
        list(_group(((n, b"") for n in names), URL))
