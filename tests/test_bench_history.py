"""asv_bench/history.py: the README's generated table and the offline page's links.

The README table must be what the committed results give (a hand edit, or results committed
without regenerating it, fails here). The table logic is checked on small hand-written result
files whose ratios are known; the page's relinking on a hand-written page with a fake package
cache (no npm, no network).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "asv_bench"))
import history  # noqa: E402

COLUMNS = ["result", "params", "version", "started_at", "duration"]


def test_readme_table_is_generated_from_the_results(capsys):
    assert history.table(check=True) == 0, capsys.readouterr().err


def _write(results: Path, commit: str, date: int, entries: dict) -> None:
    (results / "m").mkdir(parents=True, exist_ok=True)
    data = {
        "commit_hash": commit * 5,
        "date": date,
        "env_name": "existing",
        "params": {"machine": "m", "python": "existing"},
        "python": "existing",
        "result_columns": COLUMNS,
        "results": {k: [*v, "1", 0, 1.0] for k, v in entries.items()},
        "version": 2,
    }
    (results / "m" / f"{commit}.json").write_text(json.dumps(data))


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    benchmarks = {
        "s.Pair.track_ratio": {
            "type": "track",
            "unit": "refattn/torch",
            "param_names": ["dtype"],
            "params": [["'float32'", "'float64'"]],
            "version": "1",
        },
        "s.Time.time_f": {
            "type": "time",
            "unit": "seconds",
            "param_names": ["implementation", "n"],
            "params": [["'refattn'", "'torch'"], ["1", "2"]],
            "version": "1",
        },
        "s.Mem.track_mib": {
            "type": "track",
            "unit": "MiB",
            "param_names": [],
            "params": [],
            "version": "1",
        },
        "version": 2,
    }
    (results / "benchmarks.json").write_text(json.dumps(benchmarks))
    params = [["'float32'", "'float64'"]]
    _write(results, "a", 1, {"s.Pair.track_ratio": [[0.9, 1.2], params], "s.Mem.track_mib": [5]})
    # the newer commit lost its float64 value (skipped): the older one stays in the table
    _write(
        results,
        "b",
        2,
        {
            "s.Pair.track_ratio": [[0.8, None], params],
            "s.Time.time_f": [[2.0, 6.0, 4.0, 3.0], [["'refattn'", "'torch'"], ["1", "2"]]],
        },
    )
    return results


def test_latest_ratios_paired_separate_and_older_values(tmp_path):
    rows = history.latest_ratios(_results(tmp_path), machine="m")
    got = {(r["benchmark"], r["params"], r["kind"]): (r["value"], r["commit"]) for r in rows}
    assert got == {
        ("s.Pair.track_ratio", "float32", "paired"): (0.8, "bbbbb"),
        ("s.Pair.track_ratio", "float64", "paired"): (1.2, "aaaaa"),
        # refattn [n=1, n=2] = [2, 6], torch = [4, 3]: 2/4 and 6/3
        ("s.Time.time_f", "1", "separate"): (0.5, "bbbbb"),
        ("s.Time.time_f", "2", "separate"): (2.0, "bbbbb"),
    }  # and the MiB track is not a ratio: left out
    table = history.render_table(rows)
    assert "| `s.Time.time_f` | 2 | 2 | refattn/torch | separate | bbbbb |" in table.splitlines()


def test_readme_markers_are_required():
    with pytest.raises(SystemExit, match="markers"):
        history._readme_with_table("no markers here", "| table |")


def _fake_cache(cache: Path) -> None:
    for spec, path in {*history.VENDOR.values()}:
        package = cache / spec
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(f"/* {spec} {path} */")
        (package / "package.json").write_text("{}")
        for extra in history.VENDOR_EXTRA.get(spec, []):
            (package / extra).mkdir(parents=True, exist_ok=True)
            (package / extra / "font.woff").write_text("font")


def test_vendor_page_relinks_every_cdn_link(tmp_path):
    cache, html = tmp_path / "cache", tmp_path / "html"
    _fake_cache(cache)
    html.mkdir()
    url = next(iter(history.VENDOR))
    css = next(u for u in history.VENDOR if u.endswith(".css"))
    (html / "index.html").write_text(
        f'<script src="{url}" integrity="sha256-x" crossorigin="anonymous"></script>\n'
        f'<link rel="stylesheet" href="{css}" integrity="sha256-y" crossorigin="anonymous">\n'
        '<a href="https://github.com/airspeed-velocity/asv/">asv</a>\n'
    )
    history.vendor_page(html, cache)
    page = (html / "index.html").read_text()
    spec, path = history.VENDOR[url]
    local = f"vendor/{spec.rsplit('@', 1)[0]}/{path}"
    assert f'<script src="{local}"></script>' in page
    assert (html / local).read_text() == f"/* {spec} {path} */"
    assert "integrity" not in page and "crossorigin" not in page
    assert "https://github.com/airspeed-velocity/asv/" in page  # a link, not a resource
    assert (html / "vendor" / "bootstrap" / "dist" / "fonts" / "font.woff").exists()


def test_vendor_page_refuses_an_unknown_cdn_link(tmp_path):
    cache, html = tmp_path / "cache", tmp_path / "html"
    _fake_cache(cache)
    html.mkdir()
    (html / "index.html").write_text('<script src="https://cdn.example/new-lib.js"></script>')
    with pytest.raises(SystemExit, match=r"new-lib\.js"):
        history.vendor_page(html, cache)
