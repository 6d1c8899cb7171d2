"""The demo corpus end to end on a small slice of the digits: layout, faults injected vs counted,
held-out split, clean server shutdown.

    pytest tests/data_prep/test_demo.py
"""

from __future__ import annotations

import json
import tarfile
import threading
from collections import Counter

import pandas as pd
import pytest
from PIL import Image

from data_prep.demo import build_demo_corpus
from data_prep.demo.server import FAULTS, HEALTHY

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]  # a module fixture downloads a corpus: > ~15 s


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads_before = set(threading.enumerate())
    # No deadline race on a loaded machine: healthy requests get 10 s (they take milliseconds), and
    # the "slow" ones never answer before the server stops (which releases them), so they always time out.
    manifest = build_demo_corpus(
        out,
        max_images=150,
        copies=2,
        fault_share=0.15,
        num_shards=3,
        processes=1,
        threads=8,
        timeout=10.0,
        slow_seconds=3600.0,
        verbose=False,
    )
    return out, manifest, threads_before


def test_every_fault_counted_as_injected(demo):
    _, manifest, _ = demo
    faults = manifest["faults"]
    assert set(faults) == {HEALTHY, "empty_caption", *FAULTS}
    for fault, row in faults.items():
        assert row["injected"] > 0
        assert row["counted"] == row["injected"], (fault, row)
    stats = manifest["stats"]
    assert stats["download"]["successes"] == faults[HEALTHY]["injected"]
    assert stats["hygiene"]["dropped_by_reason"]["empty_caption"] == faults["empty_caption"]["injected"]
    # every URL that reached the downloader was requested once (retries=0), dropped ones never
    assert manifest["counts"]["http_requests"] == stats["download"]["attempted"]


def test_layout_training_shards(demo):
    out, manifest, _ = demo
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sorted(sizes) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(sizes.values()) == manifest["counts"]["train_samples"] > 0
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        exts = Counter(m.name.split(".", 1)[1] for m in tar)
        first_jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = Image.open(tar.extractfile(first_jpg))
        image.load()
    assert exts["jpg"] == exts["txt"] == exts["json"] == sizes["00000.tar"]
    assert image.size == (64, 64)
    urls = pd.read_parquet(out / "urls.parquet")
    assert list(urls.columns) == ["url", "caption", "label"]
    assert urls["url"].is_unique
    assert urls["caption"].nunique() > 20, "captions should come from many templates"
    assert (out / "shards" / "stats.json").exists()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]


def test_layout_held_out_split(demo):
    out, manifest, _ = demo
    classnames = (out / "test" / "classnames.txt").read_text().splitlines()
    assert classnames == [str(k) for k in range(10)]
    templates = (out / "test" / "templates.txt").read_text().splitlines()
    assert templates and all("{}" in t for t in templates)
    folder = {int(d.name): sorted(d.glob("*.png")) for d in (out / "test").iterdir() if d.is_dir()}
    assert sorted(folder) == list(range(10)) and all(folder.values())
    n_test = sum(len(v) for v in folder.values())
    assert n_test == manifest["counts"]["test"]["images"] == pytest.approx(0.2 * 150, abs=1)
    with tarfile.open(out / "test_wds" / "00000.tar") as tar:
        samples = {}
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert len(samples) == n_test
    for key, sample in samples.items():
        label = int(sample["cls"])
        assert (out / "test" / str(label) / f"{key}.png").read_bytes() == sample["png"]
        assert sample["txt"].decode().strip()
    # held out means held out: no test image id is among the training URLs
    train_ids = {int(u.rsplit("/", 1)[1][:5]) for u in pd.read_parquet(out / "urls.parquet")["url"]}
    assert not train_ids & {int(k) for k in samples}


def test_server_shut_down_cleanly(demo):
    _, _, threads_before = demo
    # the server thread and its (non-daemon) request handlers are gone; tqdm's daemon monitor may stay
    leftover = [t for t in threading.enumerate() if t not in threads_before and not t.daemon]
    assert not leftover, leftover
    assert not [t for t in threading.enumerate() if t.name == "faulty-image-server"]
