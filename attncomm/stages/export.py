"""``export``: graphs as Cytoscape JSON and self-contained HTML viewers (``export/`` of the run dir).

For every threshold of ``export.thresholds`` the pruned graph and the combined graph (where present),
and every traced graph of the run, are written as ``export/{kind}/{graph file stem}.cyjs`` (and
``.html`` when ``export.html``), ``kind`` being ``pruned_graphs``, ``combined_graphs`` or
``traced_graphs``. Absent kinds are skipped with a log line; no graph at all is an error naming the
stage that makes them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attncomm.errors import MissingArtifactError
from attncomm.io.artifacts import format_threshold
from attncomm.io.graphml import read_graph, traced_graph_prompt
from attncomm.io.provenance import guard_stage_outputs
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.cytoscape import write_cyjs, write_html

log = logging.getLogger(__name__)

#: the graph kinds exported, each into ``export/{kind}/``
_KINDS = ("pruned_graphs", "combined_graphs", "traced_graphs")


def graphs_to_export(cfg: AppConfig, ctx: RunContext) -> list[tuple[str, str, Path]]:
    """``(kind, title, path)`` of every graph this run holds that ``export`` writes, in order."""
    arts = ctx.artifacts
    found: list[tuple[str, str, Path]] = []
    name = f"{ctx.model_short} {ctx.task_name}"
    for th in cfg.export.thresholds:
        t = format_threshold(th)
        pruned, combined = arts.pruned_graph(th), arts.combined_graph(th)
        if pruned.is_file():
            found.append(("pruned_graphs", f"{name} pruned graph, |logit diff| >= {t}", pruned))
        else:
            log.info("export: no pruned graph at th=%s (%s), skipped", t, pruned)
        if combined.is_file():
            found.append(("combined_graphs", f"{name} combined graph, node frequency >= {t}", combined))
        else:
            log.info("export: no combined graph at th=%s (%s), skipped", t, combined)
    traced: dict[int, Path] = {}
    if arts.traced_graphs_dir.is_dir():
        for path in arts.traced_graphs_dir.glob(f"{arts.prefix}_*_{arts.seed}.graphml"):
            prompt = traced_graph_prompt(path)
            if arts.traced_graph(prompt) == path:
                traced[prompt] = path
    if not traced:
        log.info("export: no traced graphs in %s, skipped", arts.traced_graphs_dir)
    for prompt, path in sorted(traced.items()):
        found.append(("traced_graphs", f"{name} traced graph, prompt {prompt}", path))
    return found


@register_stage(
    "export",
    consumes=("pruned_graphs", "combined_graphs", "traced_graphs"),
    produces=("export",),
    needs_model=False,
    any_input=True,
)
def run_export(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Write pruned, combined and traced graphs as Cytoscape JSON and HTML viewers."""
    arts = ctx.artifacts
    graphs = graphs_to_export(cfg, ctx)
    if not graphs:
        ths = ",".join(format_threshold(t) for t in cfg.export.thresholds)
        raise MissingArtifactError(
            f"{arts.pruned_graphs_dir} at th={ths} (nor combined graphs at th={ths}, nor traced graphs)",
            "prune",
            f"python run.py stage=prune model=<model> task={arts.task} task.n_prompts={arts.n}",
        )
    guard_stage_outputs(cfg, ctx, "export")
    out_dir = arts.stage_dir("export")
    written: list[Path] = []
    counts: dict[str, int] = {}
    for kind, title, path in tqdm(graphs, desc="export graphs", leave=False):
        G = read_graph(path)
        stem = out_dir / kind / path.stem
        written.append(write_cyjs(G, stem.with_name(stem.name + ".cyjs"), title))
        if cfg.export.html:
            written.append(write_html(G, stem.with_name(stem.name + ".html"), title))
        counts[kind] = counts.get(kind, 0) + 1
        log.debug("exported %s (%d nodes, %d edges)", path.name, G.number_of_nodes(), G.number_of_edges())
    log.info(
        "export: %s -> %s",
        ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items()),
        out_dir,
    )
    metrics: dict[str, Any] = {f"export/n_{kind}": counts.get(kind, 0) for kind in _KINDS}
    metrics["export/n_files"] = len(written)
    ctx.record("export", written, {"graphs": [str(p.relative_to(arts.run_dir)) for _, _, p in graphs]})
    ctx.tracker.log_metrics(metrics)
    for page in sorted((out_dir / "pruned_graphs").glob("*.html")):
        ctx.tracker.log_html(f"export/viewer_{page.stem}", page)
    ctx.tracker.log_artifact(out_dir, f"{arts.prefix}_export", "export")
    return metrics
