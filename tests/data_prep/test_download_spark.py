"""`python -m data_prep.download --distributor pyspark`: img2dataset's Spark distributor in local mode
(local[2]) against the fault-injecting local server gives the same successes, failures by reason and
sizes.json as the multiprocessing distributor on the same table, and resumes the same way. The Spark
download is data_prep/README.md's cluster example, run as written there.

    pytest tests/data_prep/test_download_spark.py      # ~60 s on 2 cores: three downloads, two of them on Spark
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from data_prep.demo import digits
from data_prep.demo.server import FAULTS, SLOW, FaultyImageServer, Route
from data_prep.download import download
from data_prep.download import main as download_main

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("pyspark") is None or shutil.which("java") is None,
        reason="needs pyspark and a Java runtime (pip install pyspark; JRE 17)",
    ),
]
REPO = Path(__file__).resolve().parents[2]
# "slow" faults cost a full timeout each and test nothing distributor-specific
SPARK_FAULTS = [f for f in FAULTS if f != SLOW]
OPTIONS = dict(processes=2, threads=4, timeout=10, image_size=32, shard_size=15, verbose=False)


@pytest.fixture(scope="module")
def table_and_server(tmp_path_factory):
    images, _ = digits.load_digits_arrays()
    pngs = [digits.png_bytes(digits.upscale(images[i], 48)) for i in range(60)]
    routes = {f"/ok/{i}.png": Route(pngs[i], "image/png") for i in range(40)}
    for f, fault in enumerate(SPARK_FAULTS):
        for j in range(2):
            routes[f"/{fault}/{j}.png"] = Route(pngs[40 + 2 * f + j], "image/png", fault)
    tmp = tmp_path_factory.mktemp("spark")
    with FaultyImageServer(routes) as web:
        table = pd.DataFrame(
            {"url": [web.url_for(p) for p in routes], "caption": [f"an image from {p}" for p in routes]}
        )
        table.to_parquet(tmp / "urls.parquet")
        yield tmp / "urls.parquet", tmp


def run_the_readmes_cluster_example(table: Path, out: Path) -> str:
    """data_prep/README.md's driver for a Spark cluster, run as the README says (`python driver.py`),
    with local[2] for the master; returns its output. (Fed to `python -` on stdin it downloaded too, but
    img2dataset's logger, a process started with multiprocessing's spawn, re-imports the main script by
    its file name, and died on FileNotFoundError: '<stdin>'.)"""
    readme = (REPO / "data_prep" / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S) if 'distributor="pyspark"' in b]
    here = {
        "spark://head:7077": "local[2]",
        '"urls.parquet"': repr(str(table)),
        '"/shared/shards"': repr(str(out)),
        "threads=64, shard_size=10000": "threads=4, shard_size=15, timeout=10, image_size=32",
    }
    for readme_value, value in here.items():
        assert readme_value in example, f"data_prep/README.md's Spark example no longer has {readme_value}"
        example = example.replace(readme_value, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    python_first = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python`: this interpreter
    result = subprocess.run(
        ["bash", "-c", example],
        cwd=out.parent,
        env={**os.environ, "PATH": python_first, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_the_readmes_spark_example_matches_multiprocessing_and_the_cli_resumes_it(table_and_server, capfd):
    """One Spark download (the README's cluster example) held to the multiprocessing distributor on the
    same table; then `python -m data_prep.download --distributor pyspark` resumes it."""
    table, tmp = table_and_server
    reference = download(table, tmp / "mp", distributor="multiprocessing", **OPTIONS)
    assert "pyspark" not in capfd.readouterr().out
    output = run_the_readmes_cluster_example(table, tmp / "spark")
    assert "Traceback" not in output, output[-3000:]
    spark = json.loads((tmp / "spark" / "stats.json").read_text())
    assert spark["this_run"]["distributor"] == "pyspark" and spark["complete"]
    for key in ("attempted", "successes", "failures", "failures_by_reason"):
        assert spark["download"][key] == reference["download"][key], key
    assert spark["download"]["successes"] == 40 and spark["download"]["failures"] == 2 * len(SPARK_FAULTS)
    assert json.loads((tmp / "spark" / "sizes.json").read_text()) == json.loads((tmp / "mp" / "sizes.json").read_text())

    # Resume through the CLI: a finished Spark download is not downloaded again; a lost shard is redone by Spark
    (tmp / "spark" / "00001_stats.json").unlink()
    argv = ["--input", str(table), "--output", str(tmp / "spark"), "--distributor", "pyspark", "--processes", "2"]
    argv += ["--threads", "4", "--timeout", "10", "--image-size", "32", "--shard-size", "15"]
    assert download_main(argv) == 0
    assert "No pyspark session found, creating a new one!" in capfd.readouterr().out
    resumed = json.loads((tmp / "spark" / "stats.json").read_text())
    assert resumed["this_run"]["distributor"] == "pyspark" and resumed["this_run"]["urls_downloaded"] == 15
    assert resumed["download"] == spark["download"]


def test_an_unknown_distributor_is_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"distributor 'ray' is not one of"):
        download(tmp_path / "none.parquet", tmp_path / "out", distributor="ray")
    assert not (tmp_path / "out").exists()
