"""data_prep.download against a real local web server with injected faults and the real img2dataset.

pytest tests/data_prep/test_download.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.demo import digits
from data_prep.demo.build import EXPECTED_REASON
from data_prep.demo.server import FAULTS, HEALTHY, OPTED_OUT, SLOW, FaultyImageServer, Route
from data_prep.download import download

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]  # a module fixture downloads a corpus: > ~15 s

N_HEALTHY = 40
PER_FAULT = 2
# No race between a deadline and a loaded machine: a healthy local request never takes 10 s, and a
# "slow" URL never answers at all (it waits until the server stops), so it always times out.
FAST = dict(processes=1, threads=4, timeout=10, image_size=32, verbose=False, user_agent_token="ClipBot")
NEVER = 3600  # slow_seconds: the server's stop releases those requests


def _distinct_pngs(n: int) -> list[bytes]:
    images, _ = digits.load_digits_arrays()
    return [digits.png_bytes(digits.upscale(images[i], 48)) for i in range(n)]


def _tar_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def faulty_web():
    """Healthy images, PER_FAULT URLs of each fault, one healthy URL serving a repeat of another's bytes."""
    pngs = _distinct_pngs(N_HEALTHY + len(FAULTS) * PER_FAULT + 2)
    routes, kinds = {}, {}
    for i in range(N_HEALTHY):
        routes[f"/ok/{i}.png"] = Route(pngs[i], "image/png")
    for f, fault in enumerate(FAULTS):
        for j in range(PER_FAULT):
            routes[f"/{fault}/{j}.png"] = Route(pngs[N_HEALTHY + f * PER_FAULT + j], "image/png", fault)
    routes["/copy-of-ok-0.png"] = Route(pngs[0], "image/png")  # same bytes, other URL
    # X-Robots-Tag addressed to a user-agent token: ours (refused) and another bot's (downloaded)
    routes["/noai-for-us.png"] = Route(pngs[-2], "image/png", OPTED_OUT, "clipbot: noimageai")
    routes["/noai-for-others.png"] = Route(pngs[-1], "image/png", OPTED_OUT, "otherbot: noai")
    kinds = {path: route.fault for path, route in routes.items()}
    kinds["/noai-for-others.png"] = HEALTHY  # what the downloader should make of it
    with FaultyImageServer(routes, slow_seconds=NEVER) as web:
        yield web, kinds


def _table(web, kinds) -> pd.DataFrame:
    rows = [(web.url_for(p), f"an image   from {p}", k, i) for i, (p, k) in enumerate(kinds.items())]
    table = pd.DataFrame(rows, columns=["url", "caption", "kind", "row_id"])
    junk = pd.DataFrame(
        [
            (web.url_for("/ok/1.png"), "a repeated url, dropped by --dedup-url", "dup", 900),
            (web.url_for("/ok/2.png"), "   ", "empty", 901),
            (web.url_for("/ok/3.png"), "x", "short", 902),
            (None, "no url at all", "nourl", 903),
        ],
        columns=table.columns,
    )
    return pd.concat([table, junk], ignore_index=True)


@pytest.fixture(scope="module")
def first_run(faulty_web, tmp_path_factory):
    web, kinds = faulty_web
    tmp = tmp_path_factory.mktemp("download")
    table = _table(web, kinds)
    table.to_parquet(tmp / "urls.parquet")
    before = web.requests_total
    stats = download(
        tmp / "urls.parquet",
        tmp / "out",
        shard_size=20,
        dedup_url=True,
        dedup_image_hash=True,
        min_caption_chars=3,
        **FAST,
    )
    return {
        "stats": stats,
        "out": tmp / "out",
        "table": table,
        "input": tmp / "urls.parquet",
        "requests": web.requests_total - before,
    }


def test_successes_equal_healthy_urls(first_run, faulty_web):
    _, kinds = faulty_web
    healthy = sum(k == HEALTHY for k in kinds.values())
    d = first_run["stats"]["download"]
    assert d["successes"] == healthy
    assert d["attempted"] == len(kinds)
    # the repeated bytes are downloaded, then dropped as an image duplicate, and counted
    assert first_run["stats"]["image_hash_duplicates_dropped"] == 1
    assert first_run["stats"]["samples_in_shards"] == healthy - 1
    assert first_run["stats"]["complete"] is True


def test_every_injected_fault_counted_under_its_reason(first_run):
    by_reason = first_run["stats"]["download"]["failures_by_reason"]
    expected = {EXPECTED_REASON[f]: PER_FAULT for f in FAULTS}
    expected["opted_out"] += 1  # the directive addressed to our token
    assert by_reason == expected
    assert first_run["stats"]["download"]["failures"] == sum(expected.values())


def test_hygiene_drops_counted_by_reason(first_run):
    hygiene = first_run["stats"]["hygiene"]
    assert hygiene["dropped_by_reason"] == {
        "missing_url": 1,
        "empty_caption": 1,
        "short_caption": 1,
        "duplicate_url": 1,
    }
    assert hygiene["rows_in"] == len(first_run["table"])
    assert hygiene["captions_whitespace_normalised"] >= len(first_run["table"]) - 4


def test_no_opted_out_image_is_stored(first_run, faulty_web):
    web, kinds = faulty_web
    opted_out = {web.url_for(p) for p, k in kinds.items() if k == OPTED_OUT}
    assert all(web.requests_by_path[p] >= 1 for p, k in kinds.items() if k == OPTED_OUT), "never even asked"
    stored = set()
    for tar in first_run["out"].glob("*.tar"):
        for sample in _tar_samples(tar).values():
            stored.add(json.loads(sample["json"])["url"])
    assert stored and not (stored & opted_out)


def test_sizes_json_matches_tar_contents(first_run):
    out = first_run["out"]
    sizes = json.loads((out / "sizes.json").read_text())
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert sorted(sizes) == tars == ["00000.tar", "00001.tar", "00002.tar"]
    for name, n in sizes.items():
        samples = _tar_samples(out / name)
        assert len(samples) == n
        for sample in samples.values():
            assert set(sample) == {"jpg", "txt", "json"}
            meta = json.loads(sample["json"])
            assert sample["txt"].decode() == meta["caption"] == " ".join(meta["caption"].split())
            assert "kind" in meta and "row_id" in meta  # extra columns are carried through
    assert sum(sizes.values()) == first_run["stats"]["samples_in_shards"]


def test_stats_json_written_and_consistent(first_run):
    on_disk = json.loads((first_run["out"] / "stats.json").read_text())
    assert on_disk["download"] == first_run["stats"]["download"]
    assert 0 < on_disk["success_rate"] < 1
    assert on_disk["this_run"]["urls_downloaded"] == first_run["stats"]["download"]["attempted"]
    assert on_disk["this_run"]["urls_per_second"] > 0


def test_second_run_is_incremental(first_run, faulty_web):
    web, _ = faulty_web
    before = web.requests_total
    again = download(
        first_run["input"],
        first_run["out"],
        shard_size=20,
        dedup_url=True,
        dedup_image_hash=True,
        min_caption_chars=3,
        **FAST,
    )
    assert web.requests_total == before, "a finished download must not fetch anything again"
    assert again["this_run"]["urls_downloaded"] == 0
    for part in ("download", "hygiene", "samples_in_shards", "image_hash_duplicates_dropped"):
        assert again[part] == first_run["stats"][part]


def test_changed_table_in_same_output_is_refused(first_run):
    changed = first_run["table"].iloc[:-5]
    path = first_run["out"].parent / "changed.parquet"
    changed.to_parquet(path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        download(path, first_run["out"], shard_size=20, **FAST)
    # same table, but a policy that would mix opted-out images into the finished shards
    same = dict(shard_size=20, dedup_url=True, dedup_image_hash=True, min_caption_chars=3, **FAST)
    with pytest.raises(FileExistsError, match="respect_optouts"):
        download(first_run["input"], first_run["out"], **{**same, "respect_optouts": False})
    assert json.loads((first_run["out"] / "stats.json").read_text())["complete"]  # left as it was


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {what}")
        time.sleep(0.1)


def test_interrupted_run_resumes_only_unfinished_shards(tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-run, then the same command again."""
    pngs = _distinct_pngs(30)
    routes = {f"/{i}.png": Route(png, "image/png") for i, png in enumerate(pngs)}
    # Shard 1 (rows 10-19) stalls, so the run is surely still going after shard 0 has finished.
    for i in range(10, 20):
        routes[f"/{i}.png"] = Route(pngs[i], "image/png", SLOW)
    with FaultyImageServer(routes, slow_seconds=NEVER) as web:
        pd.DataFrame(
            {"url": [web.url_for(f"/{i}.png") for i in range(30)], "caption": [f"digit picture {i}" for i in range(30)]}
        ).to_parquet(tmp_path / "urls.parquet")
        out = tmp_path / "out"
        cli = [
            sys.executable,
            "-m",
            "data_prep.download",
            "--input",
            str(tmp_path / "urls.parquet"),
            "--output",
            str(out),
            "--shard-size",
            "10",
            "--processes",
            "1",
            "--threads",
            "10",
            "--timeout",
            "30",
            "--image-size",
            "32",
            "--user-agent-token",
            "ClipBot",
        ]
        proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _wait_for(lambda: (out / "00000_stats.json").exists(), 90, "shard 0 to finish")
            _wait_for(
                lambda: sum(web.requests_by_path.get(f"/{i}.png", 0) for i in range(10, 20)) == 10,
                30,
                "shard 1 to be under way",
            )
            os.killpg(proc.pid, signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130, stderr[-2000:]
        assert "run the same command again to resume" in stderr
        assert not (out / "stats.json").exists() and not (out / "00001_stats.json").exists()

        for i in range(10, 20):  # the stall is over
            web.set_route(f"/{i}.png", Route(pngs[i], "image/png"))
        before = dict(web.requests_by_path)
        resumed = download(tmp_path / "urls.parquet", out, shard_size=10, **FAST)
        fetched = {p for p, n in web.requests_by_path.items() if n > before.get(p, 0)}
    assert fetched == {f"/{i}.png" for i in range(10, 30)}, "shard 0 must not be fetched again"
    assert resumed["this_run"]["urls_downloaded"] == 20
    assert resumed["download"]["successes"] == 30 and resumed["complete"]
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 10}


def test_no_respect_optouts_downloads_opted_out_images(tmp_path):
    png = _distinct_pngs(1)[0]
    routes = {
        "/plain-noai.png": Route(png, "image/png", OPTED_OUT, "noai"),
        "/for-us.png": Route(png, "image/png", OPTED_OUT, "clipbot: noimageai"),
    }
    with FaultyImageServer(routes) as web:
        pd.DataFrame({"url": [web.url_for(p) for p in routes], "caption": list(routes)}).to_parquet(
            tmp_path / "u.parquet"
        )
        ignored = download(tmp_path / "u.parquet", tmp_path / "b", respect_optouts=False, **FAST)
    assert ignored["download"]["successes"] == 2


def test_processes_and_threads_sized_from_machine(first_run):
    run = first_run["stats"]["this_run"]
    assert run["processes"] == 1 and run["threads"] == 4  # as asked
    from data_prep.download import DownloadOptions, _parallelism, usable_cpus

    assert _parallelism(DownloadOptions(), shards_to_do=1000) == (usable_cpus(), 64)
    assert _parallelism(DownloadOptions(), shards_to_do=1) == (1, 64)  # no idle spawned process


def test_counts_of_reasons_match_per_url_records(first_run):
    """The per-URL parquet img2dataset leaves agrees with our totals (nothing double counted)."""
    frames = [pd.read_parquet(p) for p in sorted(first_run["out"].glob("0*.parquet"))]
    statuses = Counter(pd.concat(frames)["status"])
    d = first_run["stats"]["download"]
    assert statuses["success"] == d["successes"]
    assert sum(v for k, v in statuses.items() if k != "success") == d["failures"]
    assert np.isclose(first_run["stats"]["success_rate"], d["successes"] / d["attempted"], atol=1e-4)
