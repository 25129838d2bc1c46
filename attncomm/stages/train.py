"""``train``: train a shipped toy model (``model=toy-induction`` | ``model=toy-ioi``) on CPU.

``python run.py stage=train model=toy-ioi`` trains the toy named by ``model.name`` with ``train.steps``,
``train.batch_size``, ``train.lr`` and ``train.seed`` (the toy's model yaml sets its own defaults) and
writes an ordinary local HF model directory (``model.safetensors``, ``config.json``, tokenizer files,
``training_config.json``, ``metrics.json``) to ``{paths.root}/{model}/train/train/{model.short_name}``
(``{paths.run_dir}/train/{model.short_name}`` when a run directory is given). Shipping the
toy is copying that directory into ``attncomm/toys/{name}/`` (and recomputing its reference circuit
with :mod:`attncomm.toys.reference`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from attncomm.errors import ConfigError
from attncomm.io.artifacts import RunArtifacts, update_manifest
from attncomm.io.crashpoints import before_commit
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.toys.training import TOY_SPECS, save_toy, train_toy

log = logging.getLogger(__name__)


def training_artifacts(ctx: RunContext) -> RunArtifacts:
    """The run directory of a training job: ``paths.run_dir`` when set, else ``{paths.root}/{model}/train``.

    Training does not depend on ``task`` (a toy trains on its own task), so its outputs do not go
    under a task's run directory.
    """
    paths = ctx.cfg.paths  # the context's config is the authority on where a job writes
    if paths.run_dir:
        return ctx.artifacts
    return dataclasses.replace(ctx.artifacts, run_dir=Path(paths.root) / ctx.model_short / "train")


def toy_output_dir(arts: RunArtifacts, model_short: str) -> Path:
    """Where the trained model directory goes: ``{run dir}/train/{model.short_name}``."""
    return arts.stage_dir("train") / model_short


@register_stage("train", produces=("toy_model",), needs_model=False)
def run_train(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Train a toy model (model=toy-induction | toy-ioi) and write its HF directory to the run dir."""
    name = cfg.model.name
    if name not in TOY_SPECS:
        raise ConfigError(
            f"stage=train trains the shipped toy models only; model={name!r} is not one of "
            f"{', '.join(sorted(TOY_SPECS))} (use e.g. model=toy-ioi)"
        )
    spec = TOY_SPECS[name]
    if cfg.task.name != spec.task:
        log.info(
            "toy %s is trained on task %s (task=%s is ignored by stage=train)", name, spec.task, cfg.task.name
        )
    t = cfg.train
    result = train_toy(
        name,
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        on_eval=lambda step, record: ctx.tracker.log_metrics(
            {f"train/{k}": v for k, v in record.items() if k != "step"}, step=step
        ),
    )
    arts = training_artifacts(ctx)
    target = toy_output_dir(arts, ctx.model_short)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}-*"):  # left by a job killed before its rename
        log.info("removing %s, left by an interrupted training job", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_toy(result, tmp)
        before_commit()  # the directory is complete, not yet renamed into place
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for p in target.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    m = result.metrics
    summary: dict[str, Any] = {
        "train/accuracy": m["accuracy_nobos"],
        "train/accuracy_bos": m["accuracy_bos"],
        "train/mean_metric": m["mean_metric_nobos"],
        "train/final_loss": m["final_loss"],
        "train/seconds": m["train_seconds"],
        "train/bytes": size,
    }
    update_manifest(arts, "train", files, ctx.config_dict, {"toy": name, "directory": str(target), **summary})
    ctx.tracker.log_metrics(summary)
    log.info(
        "trained %s in %.0f s: held-out accuracy %.3f (with BOS %.3f), %d bytes -> %s; ship it with "
        "`cp %s/* attncomm/toys/%s/` and rebuild the reference circuit "
        "(python -m attncomm.toys.reference %s)",
        name,
        m["train_seconds"],
        m["accuracy_nobos"],
        m["accuracy_bos"],
        size,
        target,
        target,
        name,
        name,
    )
    return summary
