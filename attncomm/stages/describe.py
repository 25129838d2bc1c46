"""``describe``: load the model and task and report what a run would work on.

Prints and logs the architecture (layers, heads, widths, rotary/GQA/post-norm facts), the number of
prompts, how many the model gets wrong (and so would be skipped by ``trace``), the mean task metric,
and one example prompt with the position of every role.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from attncomm.analyses.common import prompt_metrics
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


def example_roles(ctx: RunContext, index: int = 0) -> pd.DataFrame:
    """Position, token and role label of every token of one prompt."""
    prompts, tok = ctx.prompts, ctx.model.tokenizer
    length = int(prompts.lengths[index])
    labels = prompts.labels[index]
    ids = prompts.tokens[index, :length].tolist()
    return pd.DataFrame(
        {
            "position": list(range(length)),
            "token": [tok.decode([i]) for i in ids],
            "role": [labels.get(p, "") for p in range(length)],
        }
    )


def prompt_file_lines(ctx: RunContext, summary: dict[str, Any]) -> list[str]:
    """For a prompt-file task: rows read, dropped (and why), used, and the answer tokens (added to
    ``summary`` too); nothing for the other tasks."""
    prompts = ctx.prompts
    report = prompts.extra.get("prompt_file")
    if not report:
        return []
    summary.update({f"file_{k}": v for k, v in report.items() if k != "dropped_reasons"})
    reasons = ", ".join(f"{k}: {v}" for k, v in report["dropped_reasons"].items()) or "none"
    lines = [
        f"prompt file {report['path']}: read {report['rows_read']} rows, dropped {report['rows_dropped']} "
        f"({reasons}), usable {report['rows_usable']}, used {report['rows_used']}; "
        f"{report['multi_token_answers']} answers cut to their first token",
        f"corrupted prompts: {'yes' if prompts.corrupted_tokens is not None else 'none'}",
        "answer tokens (answer | wrong answer) of the first prompts:",
    ]
    for i in range(min(5, len(prompts))):
        meta = prompts.meta[i]
        wrong = meta["wrong_answers"] or ["(mean over the vocabulary)"]
        lines.append(f"  {meta['source']}: {meta['answers']} | {wrong}")
    return lines


@register_stage("describe", needs_model=True)
def run_describe(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Load the model and task; summarise architecture, prompts, accuracy and role positions."""
    _ = ctx.task  # a task that cannot be built (e.g. a bad prompt file) fails before the model loads
    model = ctx.model
    arch = model.describe()
    metric, correct = prompt_metrics(ctx.model, ctx.task, ctx.prompts, max(1, cfg.task.batch_size))
    n = int(correct.numel())
    n_incorrect = int((~correct).sum())
    roles = example_roles(ctx)
    summary: dict[str, Any] = {
        "model": cfg.model.short_name,
        "task": cfg.task.name,
        "n_layers": int(model.arch.n_layers),
        "n_heads": int(model.arch.n_heads),
        "d_model": int(model.arch.d_model),
        "d_head": int(model.arch.d_head),
        "n_prompts": n,
        "n_incorrect": n_incorrect,
        "accuracy": (n - n_incorrect) / n,
        "mean_metric": float(metric.mean()),
    }
    lines = [
        f"model {cfg.model.short_name}: " + ", ".join(f"{k}={v}" for k, v in arch.items()),
        f"task {cfg.task.name}: {n} prompts (seed {cfg.task.seed}); model correct on {n - n_incorrect}, "
        f"incorrect (skipped by trace) {n_incorrect}; mean metric {summary['mean_metric']:.4f}",
        f"example prompt 0: {ctx.prompts.texts[0]!r}",
        roles.to_string(index=False),
    ]
    lines += prompt_file_lines(ctx, summary)
    text = "\n".join(lines)
    log.info("\n%s", text)
    ctx.tracker.log_metrics(summary)
    ctx.tracker.log_table("example_roles", roles)
    ctx.tracker.log_table("architecture", pd.DataFrame([{k: str(v) for k, v in arch.items()}]))
    return summary
