"""The user's path, end to end: run the example briefly, serve its logs with a real TensorBoard
server on 127.0.0.1, and read them back through TensorBoard's HTTP data API."""

import csv
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def documented_keys():
    """Keys of the README's table of logged metrics: (scalars, figures, histograms).

    Rows whose key holds a placeholder (``<...>``), or whose meaning opens with the setting they
    need in brackets (``[ggn=True]``, ``[Adam/AdamW]``), depend on settings the example does not
    use."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- logged-keys:start -->")[1].split("<!-- logged-keys:end -->")[0]
    scalars, figures, histograms = set(), set(), set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`") or cells[2].startswith("["):
            continue
        for key in re.findall(r"`([^`]+)`", cells[0]):
            if "<" in key or "/" not in key:
                continue
            kind = cells[1].lower()
            if kind.startswith("figure"):
                figures.add(key)
            elif kind.startswith("histogram"):
                histograms.add(key)
            else:
                scalars.add(key)
    return scalars, figures, histograms


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_example_logs_are_served_by_tensorboard(tmp_path):
    scalars, figures, histograms = documented_keys()
    assert len(scalars) > 20 and figures and histograms

    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "digits.py"),
            "--max-epochs",
            "1",
            "--optimizer",
            "entropy-sgd",
            "--logdir",
            "logs",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tensorboard --logdir logs" in run.stdout
    logdir = tmp_path / "logs"
    summary = list(csv.DictReader(open(logdir / "version_0" / "landscape_summary.csv")))
    assert [int(float(r["epoch"])) for r in summary] == [0, 1]

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        served = {}
        while time.monotonic() < deadline:
            try:
                served = get(port, "/data/plugin/scalars/tags").get("version_0", {})
                if scalars <= set(served):
                    break
            except OSError:
                pass
            time.sleep(1)
        missing = scalars - set(served)
        assert not missing, f"documented but not served: {sorted(missing)}"
        images = get(port, "/data/plugin/images/tags").get("version_0", {})
        assert figures <= set(images), sorted(figures - set(images))
        hists = get(port, "/data/plugin/histograms/tags").get("version_0", {})
        assert histograms <= set(hists), sorted(histograms - set(hists))

        # The values the server gives are those the run logged (its summary CSV).
        checked = 0
        for tag in sorted(scalars):
            if tag not in summary[0] or tag.endswith("seconds"):
                continue
            points = {
                int(step): value
                for _, step, value in get(
                    port, "/data/plugin/scalars/scalars", run="version_0", tag=tag
                )
            }
            for row in summary:
                if row.get(tag, "") == "":
                    continue
                logged = float(row[tag])
                got = points[int(float(row["step"]))]
                if math.isnan(logged):  # the server sends non-finite values as strings ("NaN")
                    assert math.isnan(float(got)), tag
                else:
                    assert got == pytest.approx(logged, rel=1e-6, abs=1e-30), tag
                checked += 1
        assert checked >= 20
    finally:
        server.terminate()
        server.wait(timeout=30)
