"""The notebook API: ``attncomm.load("toy-ioi", task="ioi", n_prompts=32)``.

Returns a :class:`Session` holding the loaded model (a :class:`~attncomm.models.adapter.ModelAdapter`;
its TransformerLens bridge is ``session.bridge``), the task, its prompts with their corrupted
counterparts and the metric. Each toolkit analysis is a method returning an :class:`AnalysisResult`
(the same long-form table and figures the stage writes), e.g.::

    import attncomm
    s = attncomm.load("toy-ioi", task="ioi", n_prompts=32)
    s.metric().mean()
    r = s.act_patch(kinds=["z"]); r.table.head(); r.figures["denoising_z_layer_head"]
    s.path_patch(receivers=[[2, 0, "q"], ["logits"]]).table

Model and task names are the config names of ``conf/model`` and ``conf/task``; ``overrides`` adds any
other Hydra override (``["model.prepend_bos=true"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from torch import Tensor

    from attncomm.models.adapter import ModelAdapter
    from attncomm.runtime.config import AppConfig
    from attncomm.tasks.base import Task, TaskPrompts

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class AnalysisResult:
    """An analysis's long-form table, its figures (name -> matplotlib Figure) and any extra tables."""

    table: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class Session:
    """A loaded model, task and prompts (with corrupted counterparts) for interactive analysis."""

    cfg: AppConfig
    model: ModelAdapter
    task: Task
    prompts: TaskPrompts

    @property
    def bridge(self) -> Any:
        """The TransformerLens ``TransformerBridge`` (compatibility mode)."""
        return self.model.bridge

    @property
    def corrupted(self) -> Tensor:
        """The corrupted tokens (same shape as ``prompts.tokens``); an error if the task has none."""
        return self.prompts.require_corrupted("the corrupted tokens")

    @property
    def title(self) -> str:
        return f"{self.model.short_name} {self.task.name}"

    def metric(self, tokens: Tensor | None = None) -> Tensor:
        """The task metric per prompt of a run on ``tokens`` (default: the clean prompts)."""
        logits = self.model.run_with_hooks(self.prompts.tokens if tokens is None else tokens, [])
        return self.task.metric(logits, self.prompts)

    def _labels(self) -> list[str]:
        from attncomm.analyses.common import position_labels

        return position_labels(self.model, self.prompts.tokens)

    def dla(self, top_k: int = 10) -> AnalysisResult:
        """Direct logit attribution (see :mod:`attncomm.analyses.logit_attribution`)."""
        from attncomm.analyses.logit_attribution import direct_logit_attribution, dla_summary
        from attncomm.viz.toolkit_figures import dla_figures

        df = direct_logit_attribution(self.model, self.task, self.prompts)
        return AnalysisResult(df, dla_figures(df, self.title, top_k)[0], {"mean": dla_summary(df)})

    def logit_lens(self, incl_mid: bool = True) -> AnalysisResult:
        """The metric after every (sub)layer."""
        from attncomm.analyses.logit_attribution import logit_lens
        from attncomm.viz.toolkit_figures import logit_lens_figures

        df = logit_lens(self.model, self.task, self.prompts, incl_mid=incl_mid)
        return AnalysisResult(df, logit_lens_figures(df, self.title)[0])

    def act_patch(
        self,
        kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"),
        direction: str = "denoising",
        by_position: bool = True,
        max_batch: int = 256,
    ) -> AnalysisResult:
        """Activation patching (``direction``: denoising, noising or both)."""
        from attncomm.analyses.activation_patching import activation_patching
        from attncomm.viz.toolkit_figures import patch_figures

        dirs = ["denoising", "noising"] if direction == "both" else [direction]
        df = activation_patching(
            self.model, self.task, self.prompts, self.corrupted, kinds, dirs, by_position, max_batch
        )
        return AnalysisResult(df, patch_figures(df, self.title, self._labels())[0])

    def path_patch(
        self,
        receivers: Sequence[Any] = (("logits",),),
        senders: Sequence[Any] | None = None,
        positions: Sequence[int] | None = None,
        direction: str = "denoising",
        max_batch: int = 256,
    ) -> AnalysisResult:
        """Path patching from every (or each given) sender head to ``receivers``."""
        from attncomm.analyses.path_patching import path_patching
        from attncomm.viz.toolkit_figures import head_grid_figures

        df = path_patching(
            self.model,
            self.task,
            self.prompts,
            self.corrupted,
            receivers,
            senders,
            positions,
            direction,
            max_batch,
        )
        return AnalysisResult(
            df, head_grid_figures(df, self.title, "normalised", "direction", "normalised")[0]
        )

    def ablate(
        self, heads: Sequence[Any], method: str = "mean", positions: Sequence[int] | None = None
    ) -> AnalysisResult:
        """Knock out ``heads`` (zero / mean / resample); DLA before and after."""
        from attncomm.analyses.ablation import ablate_heads
        from attncomm.viz.toolkit_figures import head_grid_figures

        corrupted = self.corrupted if method == "resample" else None
        df = ablate_heads(self.model, self.task, self.prompts, heads, method, positions, corrupted)
        figs = head_grid_figures(df[df["kind"] == "head"], self.title, "value", "condition", "DLA")[0]
        return AnalysisResult(df, figs)

    def attr_patch(
        self,
        kinds: Sequence[str] = ("z", "q", "k", "v", "mlp_out"),
        direction: str = "denoising",
        compare: bool = True,
    ) -> AnalysisResult:
        """Attribution patching; with ``compare`` also activation patching of the same cells."""
        from attncomm.analyses.attribution_patching import (
            attribution_patching,
            compare_with_activation_patching,
            correlations,
        )
        from attncomm.viz.toolkit_figures import patch_figures

        df = attribution_patching(self.model, self.task, self.prompts, self.corrupted, kinds, direction)
        figs = patch_figures(df[df["grid"] != "layer"], self.title, self._labels())[0]
        tables = {}
        if compare:
            df = compare_with_activation_patching(self.model, self.task, self.prompts, self.corrupted, df)
            tables["correlation"] = correlations(df)
        return AnalysisResult(df, figs, tables)

    def heads(
        self, seq_len: int = 20, n_sequences: int = 16, seed: int = 0, top_k: int = 5
    ) -> AnalysisResult:
        """Head-type scores (previous-token, duplicate-token, induction, BOS)."""
        from attncomm.analyses.head_detection import head_scores, top_heads
        from attncomm.viz.toolkit_figures import head_grid_figures

        df = head_scores(self.model, self.prompts, seq_len, n_sequences, seed)
        figs = head_grid_figures(df, self.title, "value", "type", "score")[0]
        return AnalysisResult(df, figs, {"top": top_heads(df, top_k)})

    def qk_ov(
        self, heads: Sequence[Any], tokens: Sequence[int] | None = None, top_k: int = 10
    ) -> AnalysisResult:
        """QK/OV circuits of ``heads``; ``tokens`` (ids) default to the first prompts' answers."""
        from attncomm.analyses.qk_ov_circuits import qk_ov_tables

        ids = (
            list(tokens)
            if tokens is not None
            else sorted({int(t) for t in self.prompts.correct[:3].tolist()})
        )
        tables = qk_ov_tables(self.model, heads, ids, top_k)
        return AnalysisResult(tables.pop("top_k"), {}, tables)


def compose_config(overrides: Sequence[str]) -> AppConfig:
    """The job config of ``overrides`` composed from the repository's ``conf/`` (as ``run.py`` does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attncomm.runtime.config import AppConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))
    assert isinstance(cfg, AppConfig)
    return cfg


def load(
    model: str = "toy-ioi",
    task: str = "ioi",
    n_prompts: int = 32,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    overrides: Sequence[str] = (),
) -> Session:
    """Load ``model`` and ``task``'s prompts (with corrupted counterparts) for notebook analysis."""
    from attncomm.runtime.registry import RunContext

    cfg = compose_config(
        [
            f"model={model}",
            f"task={task}",
            f"task.n_prompts={n_prompts}",
            f"task.seed={seed}",
            f"device={'cuda' if device.startswith('cuda') else 'cpu'}",
            f"device.name={device}",
            f"device.dtype={dtype}",
            "logger.mode=disabled",
            *overrides,
        ]
    )
    ctx = RunContext.from_config(cfg)
    return Session(cfg, ctx.model, ctx.task, ctx.prompts)
