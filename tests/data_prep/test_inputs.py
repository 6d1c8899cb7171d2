"""Bad input tables and options fail with a clear message before any download; hygiene and
failure-reason helpers on their own.

    pytest tests/data_prep/test_inputs.py
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from data_prep import captions, failures, shards, tables
from data_prep.demo import digits
from data_prep.demo.server import FaultyImageServer, Route
from data_prep.download import download

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def web():
    png = digits.png_bytes(digits.upscale(digits.load_digits_arrays()[0][0], 32))
    with FaultyImageServer({"/a.png": Route(png, "image/png")}) as server:
        yield server


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bad_tables(tmp: Path, url: str) -> dict[str, tuple[Path, str, dict]]:
    """name -> (table path, expected message pattern, extra options)."""
    pd.DataFrame({"link": [url], "caption": ["a good caption"]}).to_parquet(tmp / "no_url.parquet")
    pd.DataFrame({"url": [url], "caption": ["   "]}).to_parquet(tmp / "blank.parquet")
    pd.DataFrame({"url": [url], "caption": ["ok caption"], "status": ["x"]}).to_parquet(tmp / "reserved.parquet")
    return {
        "missing url column": (tmp / "no_url.parquet", r"missing column\(s\) \['url'\].*--url-col", {}),
        "missing url column (csv)": (
            _write(tmp / "no_url.csv", f"link,caption\n{url},hi there\n"),
            r"missing column.*url",
            {},
        ),
        "missing caption column": (
            _write(tmp / "no_cap.tsv", f"url\ttext\n{url}\thi there\n"),
            r"missing column\(s\) \['caption'\].*--caption-col",
            {},
        ),
        "empty file": (_write(tmp / "empty.csv", ""), r"the file is empty", {}),
        "empty jsonl": (_write(tmp / "empty.jsonl", ""), r"the file is empty", {}),
        "header only": (_write(tmp / "header.csv", "url,caption\n"), r"no rows", {}),
        "csv named parquet": (
            _write(tmp / "fake.parquet", f"url,caption\n{url},hi\n"),
            r"could not be read as parquet",
            {},
        ),
        "broken jsonl": (_write(tmp / "broken.jsonl", '{"url": "x", "caption": \n'), r"could not be read as jsonl", {}),
        "unknown format": (_write(tmp / "table.xlsx", "whatever"), r"unsupported table format 'xlsx'", {}),
        "no such file": (tmp / "missing.parquet", r"no such file", {}),
        "all rows dropped": (tmp / "blank.parquet", r"every row was dropped.*empty_caption", {}),
        "reserved column kept": (tmp / "reserved.parquet", r"reserves these names", {"keep_columns": ["status"]}),
        "bad resize mode": (tmp / "blank.parquet", r"resize_mode 'squash'", {"resize_mode": "squash"}),
        "unknown option": (tmp / "blank.parquet", r"known options", {"imagesize": 64}),
    }


def test_bad_inputs_fail_clearly_before_any_download(web, tmp_path):
    for name, (path, pattern, options) in _bad_tables(tmp_path, web.url_for("/a.png")).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        with pytest.raises((ValueError, TypeError), match=pattern):
            download(path, out, processes=1, verbose=False, **options)
        assert not out.exists(), f"{name}: output created before the input was checked"
    assert web.requests_total == 0


def test_cli_reports_bad_input_with_exit_status_2(tmp_path):
    bad = _write(tmp_path / "no_url.csv", "link,caption\nhttp://127.0.0.1:9/x.png,hello\n")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.download", "--input", str(bad), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "--url-col" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_output_folder_not_ours_is_refused(web, tmp_path):
    pd.DataFrame({"url": [web.url_for("/a.png")], "caption": ["a caption"]}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not made by data_prep"):
        download(tmp_path / "t.parquet", tmp_path / "precious", overwrite=True, verbose=False)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_folder_of_tables_and_mixed_formats(tmp_path):
    (tmp_path / "parts").mkdir()
    for i in range(2):
        pd.DataFrame({"url": [f"http://x/{i}"], "caption": [f"caption {i}"]}).to_parquet(
            tmp_path / "parts" / f"{i}.parquet"
        )
    assert len(tables.read_table(tmp_path / "parts")) == 2
    _write(tmp_path / "parts" / "2.csv", "url,caption\nhttp://x/2,c\n")
    with pytest.raises(tables.InputTableError, match="mixes table formats"):
        tables.read_table(tmp_path / "parts")


def test_extra_columns_default_keeps_all_unreserved():
    table = pd.DataFrame({"url": ["u"], "caption": ["c"], "label": [1], "width": [3], "source": ["s"]})
    kept, not_kept = tables.extra_columns(table, "url", "caption", None)
    assert kept == ["label", "source"]
    assert not_kept == {"width": "name reserved by img2dataset"}


def test_caption_hygiene_fixes_and_counts():
    assert captions.clean_caption("  caf\u00c3\u00a9 \t au  lait\n") == "caf\u00e9 au lait"
    assert captions.clean_caption("fish &amp; chips") == "fish & chips"
    assert captions.clean_caption(None) == ""
    table = pd.DataFrame(
        {
            "url": ["a", "a", " ", None, "b", "c", "d", "a"],
            "caption": ["caf\u00c3\u00a9  x", "ok ok", "x y z", "y y y", None, "z", "  hello\tthere ", "   "],
        }
    )
    kept, dropped, report = captions.apply_hygiene(table, min_chars=2, dedup_url=True)
    assert list(kept["url"]) == ["a", "d"]
    assert list(kept["caption"]) == ["caf\u00e9 x", "hello there"]
    assert report.as_dict()["dropped_by_reason"] == {
        "missing_url": 2,
        "empty_caption": 2,
        "short_caption": 1,
        "duplicate_url": 1,
    }
    assert len(kept) + len(dropped) == len(table)
    assert report.captions_unicode_fixed == 1
    # without URL dedup the repeated URL stays; the empty-caption row with the same URL never competes
    kept, _, report = captions.apply_hygiene(table, min_chars=2, dedup_url=False)
    assert list(kept["url"]) == ["a", "a", "d"]


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 500: Internal Server Error", "http_500"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("IncompleteRead(134 bytes read, 135 more expected)", "truncated_transfer"),
        ("Image decoding error", "not_an_image"),
        ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("image too small", "image_too_small"),
        ("something nobody has seen", "other"),
        (None, "unknown"),
    ],
)
def test_failure_reasons(message, reason):
    assert failures.reason_of(message) == reason


def test_message_groups_mask_numbers_but_keep_http_codes():
    a = failures.message_group("IncompleteRead(134 bytes read, 135 more expected)")
    b = failures.message_group("IncompleteRead(99 bytes read, 7 more expected)")
    assert a == b
    assert failures.message_group("HTTP Error 404: Not Found") == "HTTP Error 404: Not Found"


def test_drop_samples_is_idempotent_and_sizes_follow(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key in ("001", "002", "003"):
            for ext in ("jpg", "txt", "json"):
                path = tmp_path / f"{key}.{ext}"
                path.write_bytes(b"x")
                tar.add(path, arcname=f"{key}.{ext}")
    assert shards.drop_samples(tmp_path, {"00000": {"002"}}) == 3
    assert shards.drop_samples(tmp_path, {"00000": {"002"}}) == 0
    assert shards.samples_in_tar(tmp_path / "00000.tar") == ["001", "003"]
    (tmp_path / "00000_stats.json").write_text("{}")
    assert shards.write_sizes(tmp_path, shards.completed_shards(tmp_path)) == {"00000.tar": 2}


def test_text_formats_read_the_same_table(tmp_path):
    table = pd.DataFrame({"url": ["http://x/1", "http://x/2"], "caption": ["one, with comma", "two"], "label": [1, 2]})
    table.to_parquet(tmp_path / "t.parquet")
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_csv(tmp_path / "t.tsv.gz", sep="\t", index=False)
    table.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    for name in ("t.parquet", "t.csv", "t.tsv.gz", "t.jsonl"):
        pd.testing.assert_frame_equal(tables.read_table(tmp_path / name), table, check_dtype=False)


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_cli_downloads_a_jsonl_table(web, tmp_path):
    pd.DataFrame({"url": [web.url_for("/a.png")], "caption": ["a handwritten zero"], "source": ["test"]}).to_json(
        tmp_path / "t.jsonl", orient="records", lines=True
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.download",
            "--input",
            str(tmp_path / "t.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--processes",
            "1",
            "--threads",
            "4",
            "--image-size",
            "32",
            "--resize-mode",
            "center_crop",
            "--encode-format",
            "png",
            "--encode-quality",
            "3",
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "successes               1  (100.0 %)" in proc.stdout
    with tarfile.open(tmp_path / "o" / "00000.tar") as tar:
        names = sorted(m.name.split(".", 1)[1] for m in tar)
    assert names == ["json", "png", "txt"]
