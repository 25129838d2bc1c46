"""The HTML viewer's page, stylesheet and scripts are package files inlined verbatim into each page."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import networkx as nx
import pytest

from attncomm.viz.cytoscape import VIEWER_FILES, fill_template, graph_to_html, viewer_asset

ROOT = Path(__file__).resolve().parents[1]


def _graph() -> nx.MultiDiGraph:
    G = nx.MultiDiGraph()
    G.add_edge((0, 1, "end", "S2"), ("IO-S direction", "end"), weight=1.0, type="d")
    G.add_edge((0, "MLP", "S2", "S2"), (0, 1, "end", "S2"), weight=0.5, type="s")
    return G


def test_page_inlines_every_asset_and_fills_every_placeholder() -> None:
    page = graph_to_html(_graph(), "a {{css}} title")
    assert "<title>a {{css}} title</title>" in page  # a value's text is not searched for placeholders
    assert re.findall(r"\{\{\w+\}\}", page.replace("a {{css}} title", "")) == []
    for name in ("viewer.css", "viewer.js", "error_hook.js"):
        text = viewer_asset(name)
        assert len(text) > 100 and page.count(text) == 1, name
    assert "<span>3 nodes, 2 edges</span>" in page
    assert "dest (d) edge: 1</span>" in page and "source (s) edge: 1</span>" in page


def test_fill_template_rejects_a_missing_value() -> None:
    with pytest.raises(KeyError):
        fill_template("<p>{{title}} {{other}}</p>", {"title": "t"})
    with pytest.raises(ValueError, match="unknown viewer file"):
        viewer_asset("missing.js")


def test_viewer_files_are_package_data() -> None:
    """Installed (non-editable) copies need the files declared in pyproject's package-data."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in VIEWER_FILES:
        rel = f"viz/viewer/{name}"
        assert (ROOT / "attncomm" / rel).is_file(), rel
        assert any(fnmatch.fnmatch(rel, g) for g in globs["attncomm"]), rel
