"""Stage registry and the run context that every stage receives.

A stage is a function ``run(cfg: AppConfig, ctx: RunContext) -> dict`` registered under a name with
``@register_stage``; it declares the artifact kinds it consumes and produces. ``run_job`` builds the
context (run directory, device, dtype, wandb tracker), runs the stage, records the manifest and
logs the returned summary metrics. Stage modules under ``attncomm/stages/`` register themselves on
import; :func:`load_stages` imports them all, :func:`stage_catalog` reads their declarations from the
source without importing them (start-up imports only the selected stage's module).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attncomm.errors import AttncommError, ConfigError
from attncomm.io.artifacts import RunArtifacts, method_overrides, run_dir_for, update_manifest
from attncomm.runtime.config import AppConfig
from attncomm.runtime.tracking import Tracker

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.models.plain_model import PlainModel
    from attncomm.tasks.base import Task, TaskPrompts

log = logging.getLogger(__name__)

StageFn = Callable[[AppConfig, "RunContext"], dict[str, Any] | None]


class UnknownStageError(AttncommError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: the single declaration everything else about it is derived from.

    ``section`` names the :class:`AppConfig` field holding the stage's parameters (``None``: the stage
    has none); ``consumes``/``produces`` are artifact kinds, from which the producer of a missing
    artifact, the pipeline's order and its missing-input check are derived; ``description`` (the run
    function's docstring's first line) is what the log and ``--help`` show.
    """

    name: str
    run: StageFn
    section: str | None = None
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    needs_model: bool = False
    description: str = ""
    #: the stage works from any one of its inputs (``export`` exports whichever graphs exist)
    any_input: bool = False


STAGES: dict[str, StageSpec] = {}

_DEFAULT_SECTION = object()


def _completing(fn: StageFn) -> StageFn:
    """``fn``, then its provenance records marked finished: only a stage that returned has complete
    outputs (a killed or failed one leaves its records in progress, see ``io.provenance``)."""

    @functools.wraps(fn)
    def run(cfg: AppConfig, ctx: RunContext) -> dict[str, Any] | None:
        from attncomm.io.provenance import complete_stage_records

        metrics = fn(cfg, ctx)
        complete_stage_records(ctx)
        return metrics

    return run


def register_stage(
    name: str,
    *,
    section: str | None | object = _DEFAULT_SECTION,
    consumes: tuple[str, ...] = (),
    produces: tuple[str, ...] = (),
    needs_model: bool = False,
    any_input: bool = False,
) -> Callable[[StageFn], StageFn]:
    """Decorator registering ``fn`` as stage ``name`` (its docstring's first line describes it); the
    decorated function marks the provenance records its run wrote as finished when it returns.

    ``section`` defaults to ``name`` when :class:`AppConfig` has a field of that name, else ``None``.
    """

    def wrap(fn: StageFn) -> StageFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        sec = section
        if sec is _DEFAULT_SECTION:
            sec = name if name in {f.name for f in dataclasses.fields(AppConfig)} else None
        if sec is not None and sec not in {f.name for f in dataclasses.fields(AppConfig)}:
            raise TypeError(f"stage {name!r}: AppConfig has no section {sec!r}")
        run = _completing(fn)
        STAGES[name] = StageSpec(
            name,
            run,
            sec,
            tuple(consumes),
            tuple(produces),
            needs_model,
            doc[0] if doc else "",
            any_input,
        )
        return run

    return wrap


def load_stages() -> dict[str, StageSpec]:
    """Import every module of ``attncomm.stages`` so that all stages are registered."""
    import attncomm.stages as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return STAGES


@dataclass(frozen=True)
class StageEntry:
    """What a stage's ``@register_stage`` declaration says, read from its module's source."""

    name: str
    module: str
    description: str
    consumes: tuple[str, ...]
    produces: tuple[str, ...]


def _declarations(path: Path, module: str) -> list[StageEntry]:
    """The ``@register_stage("name", consumes=..., produces=...)`` declarations of one source file."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for dec in node.decorator_list:
            func = dec.func if isinstance(dec, ast.Call) else None
            called = getattr(func, "id", None) or getattr(func, "attr", None)
            if called != "register_stage" or not isinstance(dec, ast.Call):
                continue
            kw = {k.arg: ast.literal_eval(k.value) for k in dec.keywords if k.arg in ("consumes", "produces")}
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            out.append(
                StageEntry(
                    ast.literal_eval(dec.args[0]),
                    module,
                    doc[0] if doc else "",
                    tuple(kw.get("consumes", ())),
                    tuple(kw.get("produces", ())),
                )
            )
    return out


@functools.cache
def stage_catalog() -> dict[str, StageEntry]:
    """Every stage's declaration, read from the source of ``attncomm/stages/`` without importing it.

    Starting a job imports only the module of the stage it runs (:func:`get_stage`), not every stage
    module with its plotting, clustering and data-frame dependencies; the names, descriptions and
    declared artifacts come from here. The declarations are the ``@register_stage`` calls themselves
    (tested equal to what importing registers). A declaration that is not literal falls back to
    importing everything (:func:`load_stages`).
    """
    import attncomm.stages as pkg

    entries: dict[str, StageEntry] = {}
    try:
        for mod in pkgutil.iter_modules(pkg.__path__):
            path = Path(pkg.__path__[0]) / f"{mod.name}.py"
            if not path.is_file():
                raise ValueError(f"{mod.name} is not a plain module")
            for entry in _declarations(path, f"{pkg.__name__}.{mod.name}"):
                entries.setdefault(entry.name, entry)
    except (ValueError, SyntaxError, TypeError, IndexError, OSError) as err:
        log.debug("stage declarations not readable from source (%s); importing every stage", err)
        return {
            n: StageEntry(n, s.run.__module__, s.description, s.consumes, s.produces)
            for n, s in load_stages().items()
        }
    return entries


def producers() -> dict[str, str]:
    """Artifact kind -> the stage that produces it (derived from the declarations).

    A stage that both consumes and produces a kind (``trace_merge`` rebuilding tracing results) is not
    its producer: the producer is the stage that makes it from other inputs.
    """
    out: dict[str, str] = {}
    for spec in stage_catalog().values():
        for kind in spec.produces:
            if kind not in spec.consumes:
                out.setdefault(kind, spec.name)
    return out


def pipeline_order(names: list[str]) -> list[StageSpec]:
    """The listed stages ordered by their declared inputs (stable: ties keep the listed order).

    A stage runs after every listed stage that produces a kind it consumes; stages with no such
    relation keep the order given.
    """
    specs = [get_stage(n) for n in dict.fromkeys(names)]
    after: dict[str, set[str]] = {
        s.name: {p.name for p in specs if p is not s and set(p.produces) & set(s.consumes)} for s in specs
    }
    # a stage that rebuilds what it consumes (trace_merge) runs after the producer, before the consumers
    for s in specs:
        for other in specs:
            rebuilt = set(s.produces) & set(s.consumes)
            if other is not s and rebuilt & set(other.consumes) and not set(other.produces) & rebuilt:
                after[other.name].add(s.name)
    ordered: list[StageSpec] = []
    done: set[str] = set()
    while len(ordered) < len(specs):
        ready = [s for s in specs if s.name not in done and after[s.name] <= done]
        if not ready:
            cycle = sorted(s.name for s in specs if s.name not in done)
            raise ConfigError(f"pipeline.stages: the stages {cycle} depend on each other's outputs")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def missing_inputs(ordered: list[StageSpec], available: Callable[[str], bool]) -> list[tuple[str, str, str]]:
    """``(stage, kind, producer)`` for every input that no earlier stage makes and ``available`` lacks."""
    made: set[str] = set()
    prod = producers()
    missing = []
    for spec in ordered:
        lacking = [kind for kind in spec.consumes if kind not in made and not available(kind)]
        if spec.any_input and len(lacking) < len(spec.consumes):
            lacking = []
        missing += [(spec.name, kind, prod.get(kind, "?")) for kind in lacking]
        made.update(spec.produces)
    return missing


def get_stage(name: str) -> StageSpec:
    """The stage registered as ``name`` (importing only its module); an unknown name lists the valid ones."""
    if name not in STAGES and name in stage_catalog():
        importlib.import_module(stage_catalog()[name].module)
    if name not in STAGES:
        load_stages()
    if name not in STAGES:
        valid = ", ".join(sorted(STAGES))
        raise UnknownStageError(f"unknown stage {name!r}. Valid stages: {valid}. Use e.g. stage=trace")
    return STAGES[name]


def torch_dtype(name: str) -> torch.dtype:
    """``float32``/``float64`` to a torch dtype, with a clear error for anything else."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise ConfigError(f"device.dtype={name!r} is not supported; use float32 (default) or float64")
    return table[name]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class RunContext:
    """Everything a stage needs besides its config: where to write, on what device, how to log."""

    cfg: AppConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    tracker: Tracker
    config_dict: dict[str, Any] = field(default_factory=dict)
    #: provenance records written as in progress by this job's stages, marked finished when they return
    pending_records: dict[Path, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: AppConfig, tracker: Tracker | None = None) -> RunContext:
        """Validate the job's config and resolve its run directory, device and dtype."""
        from attncomm.io.provenance import model_dir_name
        from attncomm.models.architectures import resolve_model_config
        from attncomm.runtime.validation import validate_config
        from attncomm.tasks import task_run_name

        cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
        validate_config(cfg)
        config_dict = dataclasses.asdict(cfg)
        if cfg.paths.run_dir:
            run_dir = Path(cfg.paths.run_dir)
        else:
            overrides = method_overrides(flatten(config_dict))
            run_dir = run_dir_for(
                cfg.paths.root,
                model_dir_name(cfg.paths.root, cfg),  # a model.path checkpoint gets its own folder
                task_run_name(cfg.task),
                cfg.task.n_prompts,
                cfg.task.seed,
                overrides,
            )
        device_name = cfg.device.name
        if device_name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device={device_name} requested but CUDA is not available; use device=cpu")
            torch.backends.cuda.matmul.allow_tf32 = cfg.device.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.device.allow_tf32
        if cfg.device.threads is not None:
            torch.set_num_threads(cfg.device.threads)
        tracker = tracker or Tracker(dataclasses.replace(cfg.logger, mode="disabled"))
        return cls(
            cfg, run_dir, torch.device(device_name), torch_dtype(cfg.device.dtype), tracker, config_dict
        )

    @classmethod
    def for_tests(cls, cfg: AppConfig, run_dir: str | Path) -> RunContext:
        """A context writing to ``run_dir`` with logging disabled (for calling stages without Hydra)."""
        cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, run_dir=str(run_dir)))
        return cls.from_config(cfg)

    # --- names ------------------------------------------------------------------------------
    @property
    def model_short(self) -> str:
        return self.cfg.model.short_name

    @property
    def task_name(self) -> str:
        """The task's name in artifact names (``file-{stem}`` for ``task=file``)."""
        from attncomm.tasks import task_run_name

        return task_run_name(self.cfg.task)

    @property
    def n_prompts(self) -> int:
        return self.cfg.task.n_prompts

    @property
    def seed(self) -> int:
        return self.cfg.task.seed

    @cached_property
    def artifacts(self) -> RunArtifacts:
        published_n_min = self.cfg.model.n_min.get(self.task_name, self.cfg.prune.n_min_default)
        n_min = self.cfg.prune.n_min
        variant = "" if n_min is None or n_min == published_n_min else f"_nmin{n_min}"
        return RunArtifacts(
            self.run_dir, self.model_short, self.task_name, self.n_prompts, self.seed, variant, producers()
        )

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.paths.cache_dir)

    # --- lazily loaded model, task and prompts ----------------------------------------------
    @cached_property
    def model(self) -> ModelAdapter:
        from attncomm.models.adapter import load_model

        return load_model(self.cfg.model, device=str(self.device), dtype=self.dtype, cache_dir=self.cache_dir)

    @cached_property
    def tracing_model(self) -> ModelAdapter | PlainModel:
        """The model as the trace stage runs it: the plain forward for GPT-2-family models (no bridge,
        see ``models.plain_model``), else :attr:`model` itself."""
        if "model" in self.__dict__:
            loaded = self.__dict__["model"]
            if loaded.cfg.family != "gpt2":
                return loaded
        from attncomm.models.plain_model import PlainModel, load_tracing_model

        model = load_tracing_model(
            self.cfg.model, device=str(self.device), dtype=self.dtype, cache_dir=self.cache_dir
        )
        if not isinstance(model, PlainModel):
            self.__dict__.setdefault("model", model)  # the bridge: later stages reuse it
        return model

    def release_tracing_model(self) -> None:
        """Drop the tracing model when it is not :attr:`model` (its weights are a second copy)."""
        traced = self.__dict__.get("tracing_model")
        if traced is not None and traced is not self.__dict__.get("model"):
            del self.__dict__["tracing_model"]

    def _loaded_model(self) -> ModelAdapter | PlainModel:
        """The model this job has loaded (the tracing model when only it is), else :attr:`model`."""
        if "model" not in self.__dict__ and "tracing_model" in self.__dict__:
            return self.__dict__["tracing_model"]
        return self.model

    @cached_property
    def task(self) -> Task:
        from attncomm.tasks import get_task, task_kwargs

        try:
            return get_task(self.cfg.task.name, **task_kwargs(self.cfg.task))
        except (TypeError, ValueError) as err:
            if isinstance(err, AttncommError):
                raise
            raise ConfigError(
                f"task={self.cfg.task.name} task.options={dict(self.cfg.task.options)} is not valid: {err}; "
                "remove or correct the option (e.g. drop +task.options.NAME=...)"
            ) from err

    @cached_property
    def prompts(self) -> TaskPrompts:
        """The task's prompts for this job's N and seed, tokenized by the model's tokenizer."""
        task = self.task  # first: a prompt file's format errors need no model loaded
        loaded = self._loaded_model()  # tracing's plain model tokenizes as the bridge's (checked)
        tok = loaded.tokenizer
        task.check_tokenizer(tok)
        tc = self.cfg.task
        try:
            prompts = task.make_prompts(
                tok, tc.n_prompts, tc.seed, self.cfg.model.prepend_bos, prompt_type=tc.prompt_type
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, AttncommError):
                raise
            raise ConfigError(
                f"task={tc.name} task.n_prompts={tc.n_prompts} task.prompt_type={tc.prompt_type} "
                f"task.options={dict(tc.options)}: {err}"
            ) from err
        n_ctx = loaded.arch.n_ctx
        if prompts.tokens.shape[1] > n_ctx:
            raise ConfigError(
                f"task={tc.name} makes prompts of {prompts.tokens.shape[1]} tokens but model "
                f"{self.cfg.model.name} has a context of n_ctx={n_ctx} tokens; make the prompts shorter "
                f"(e.g. task.options.seq_len) or use a model with a longer context"
            )
        report = prompts.extra.get("prompt_file")
        if report:  # a prompt-file task: rows read / dropped (and why) go to wandb and the manifest
            counts = {f"task_file/{k}": v for k, v in report.items() if isinstance(v, int)}
            counts |= {f"task_file/dropped/{k}": v for k, v in report["dropped_reasons"].items()}
            self.tracker.log_metrics(counts)
        return prompts

    def record(self, stage: str, files: list[Path], extra: Any = None) -> None:
        """Write the manifest entry of ``stage`` for the files it produced (with the prompt file's
        rows read and dropped when this job read one)."""
        report = self.__dict__["prompts"].extra.get("prompt_file") if "prompts" in self.__dict__ else None
        update_manifest(self.artifacts, stage, files, self.config_dict, extra, prompt_file=report)


def wandb_group(name: str, sweep_dir: str | None) -> str:
    """The wandb group of a job: the experiment ``name``; for a multirun left at the default name, the
    sweep itself (``sweep-{date}_{time}`` from its directory), so each sweep's jobs are grouped together."""
    if name != "default" or not sweep_dir:
        return name
    sweep = Path(sweep_dir)
    return f"sweep-{sweep.parent.name}_{sweep.name}"


def _hydra_sweep_dir() -> str | None:
    """The sweep directory when running inside a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def run_job(cfg: AppConfig) -> dict[str, Any]:
    """Run the stage ``cfg.stage.name`` with a wandb run around it; return its summary metrics."""
    from attncomm.models.architectures import resolve_model_config

    spec = get_stage(cfg.stage.name)
    # model=hf: the short name from model.path / model.hf_name, the family from config.json
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    ctx = RunContext.from_config(cfg)
    config_dict = ctx.config_dict
    logger_cfg = cfg.logger
    if logger_cfg.group is None:
        logger_cfg = dataclasses.replace(logger_cfg, group=wandb_group(cfg.name, _hydra_sweep_dir()))
    name = f"{cfg.model.short_name}-{cfg.task.name}-{spec.name}"
    ctx.tracker = Tracker(logger_cfg, name=name, job_type=spec.name, config=config_dict)
    log.info("stage %s: %s -> run dir %s", spec.name, spec.description, ctx.run_dir)
    exit_code = 1
    try:
        metrics = spec.run(cfg, ctx) or {}
        ctx.tracker.summary(metrics)
        exit_code = 0
        return metrics
    finally:
        if ctx.tracker.run_path is not None:
            log.info("wandb %s run files: %s", logger_cfg.mode, ctx.tracker.run_path)
        ctx.tracker.finish(exit_code)
