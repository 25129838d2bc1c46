"""Provenance keys: the identity of what made an artifact, so that no stage trusts a stale or foreign one.

A *provenance key* is a flat JSON dictionary of the settings that determine an artifact:

- the model: ``model.weights`` (sha256 over the bytes of the weight files of its local HF directory)
  and ``model.config`` (sha256 of its ``config.json``, i.e. the architecture);
- the task and its prompt generation: ``task.name``, ``task.n_prompts``, ``task.seed``,
  ``task.prompt_type``, ``task.options``, ``model.prepend_bos``, ``model.tokenizer``;
- the producing stage's method settings (``trace.with_tokens``, ``trace.upstream_fraction`` ...,
  ``device.dtype``).

Each keyed folder holds its key in a ``provenance.json`` beside the artifacts. A stage that finds
existing artifacts with a different key either starts afresh (when told to overwrite) or stops with
a :class:`StaleArtifactError` that names the differing settings and the two ways out.

Weights are hashed once per file version: the digest of a file is cached under
``{cache_dir}/weight_hashes.json`` by (absolute path, size, mtime), so a 500 MB checkpoint costs a
second the first time and nothing afterwards.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attncomm.errors import AttncommError

log = logging.getLogger(__name__)

#: file name of a keyed folder's provenance record
PROVENANCE_FILE = "provenance.json"

#: suffixes of the files that hold a checkpoint's weights (HF formats)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")

_CHUNK = 1 << 22


class StaleArtifactError(AttncommError, ValueError):
    """Existing artifacts were made with other settings (or another model) than this job's."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cached_file_hash(path: Path, memo_file: Path | None) -> str:
    """sha256 of ``path``, memoised in ``memo_file`` by (absolute path, size, mtime_ns)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if memo_file is None:
        return _file_sha256(path)
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    with open(memo_file.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            memo: dict[str, str] = {}
            if memo_file.is_file():
                try:
                    memo = json.loads(memo_file.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    memo = {}  # a damaged memo only costs re-hashing
            if key in memo:
                return memo[key]
            digest = _file_sha256(path)
            memo[key] = digest
            tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, memo_file)
            return digest
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a local HF-format directory (sorted), e.g. ``model.safetensors``."""
    root = Path(model_dir)
    return sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def weights_hash(model_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Content hash of a local checkpoint: sha256 over (name, sha256 of bytes) of its weight files.

    ``cache_dir`` memoises per-file digests by (path, size, mtime); without it every call re-reads.
    A directory without weight files hashes to the digest of the empty list (its config still differs).
    """
    memo = Path(cache_dir) / "weight_hashes.json" if cache_dir is not None else None
    h = hashlib.sha256()
    for path in weight_files(model_dir):
        h.update(path.name.encode())
        h.update(_cached_file_hash(path, memo).encode())
    return h.hexdigest()


def config_hash(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of the directory's ``config.json`` with keys sorted (the architecture)."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttncommError(f"cannot read the model config {path}: {err}; fix or replace the file") from err
    for volatile in ("_name_or_path", "transformers_version"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def model_identity(
    model_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """``{"model.weights": ..., "model.config": ...}`` of a local HF-format directory."""
    return {"model.weights": weights_hash(model_dir, cache_dir), "model.config": config_hash(model_dir)}


def task_identity(cfg: Any) -> dict[str, Any]:
    """The task and prompt-generation settings of an :class:`AppConfig` (what the prompts depend on)."""
    return {
        "task.name": cfg.task.name,
        "task.n_prompts": cfg.task.n_prompts,
        "task.seed": cfg.task.seed,
        "task.prompt_type": cfg.task.prompt_type,
        "task.options": dict(cfg.task.options),
        "model.prepend_bos": cfg.model.prepend_bos,
        "model.tokenizer": cfg.model.tokenizer,
        **prompt_file_identity(cfg.task.path, cfg.task.strict_answers),
    }


def prompt_file_identity(path: str | None, strict_answers: bool) -> dict[str, Any]:
    """For a task read from a prompt file (``task.path``): the file's content hash (an edited file is
    another task, whatever its name) and how multi-token answers are treated; nothing otherwise."""
    if not path:
        return {}
    file = Path(path).expanduser()
    digest = _file_sha256(file) if file.is_file() else "missing"
    return {"task.path.sha256": digest, "task.strict_answers": strict_answers}


def trace_settings(cfg: Any) -> dict[str, Any]:
    """The method settings of ``trace`` that shape its outputs (not sharding, not overwrite)."""
    tc = cfg.trace
    return {
        "trace.with_tokens": tc.with_tokens,
        "trace.skip_incorrect": tc.skip_incorrect,
        "trace.seed_fraction": tc.seed_fraction,
        "trace.upstream_fraction": tc.upstream_fraction,
        "trace.max_firings": tc.max_firings,  # which prompts are skipped at the firing budget
        "device.dtype": cfg.device.dtype,
    }


def read_key(folder: Path) -> dict[str, Any] | None:
    """The provenance key recorded in ``folder``, or None when there is none (or it is unreadable)."""
    return read_key_file(folder / PROVENANCE_FILE)


#: set in a stage record from the moment the stage starts writing until it finished: outputs recorded
#: in progress (a killed run) are not used by later stages and are recomputed by the pipeline
IN_PROGRESS = "_in_progress"


def read_key_file(path: Path) -> dict[str, Any] | None:
    """A provenance record, or None when absent or unreadable (a warning names the file)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        log.warning("unreadable provenance record %s: treated as unknown", path)
        return None
    return data if isinstance(data, dict) else None


def write_key(folder: Path, key: Mapping[str, Any]) -> Path:
    """Record ``key`` in ``folder/provenance.json`` (atomically)."""
    return write_key_file(folder / PROVENANCE_FILE, key)


def write_key_file(path: Path, key: Mapping[str, Any]) -> Path:
    """Write a provenance record atomically."""
    from attncomm.io.artifacts import atomic_write_text

    atomic_write_text(path, json.dumps(dict(key), indent=2, sort_keys=True, default=str) + "\n")
    return path


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256 digest: its first 12 digits suffice
        return value[:12]
    return json.dumps(value, sort_keys=True, default=str)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["trace.with_tokens: false -> true", ...]``: every setting whose value differs (the
    in-progress marker of a stage record is not a setting)."""
    out = []
    for k in sorted((set(old) | set(new)) - {IN_PROGRESS}):
        a = json.loads(json.dumps(old.get(k), default=str))
        b = json.loads(json.dumps(new.get(k), default=str))
        if a != b:
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def check_key(
    folder: Path,
    key: Mapping[str, Any],
    *,
    what: str,
    has_outputs: bool,
    overwrite_option: str,
    run_dir: Path,
) -> bool:
    """Compare ``folder``'s recorded key with ``key``.

    Returns True when existing outputs are reusable (same key), False when there are no outputs to
    reuse. Raises :class:`StaleArtifactError` when outputs exist with another (or an unknown) key.
    """
    recorded = read_key(folder)
    if not has_outputs:
        return False
    if recorded is None:
        diff = ["(no provenance record: made by an older version or another tool)"]
    else:
        diff = differences(recorded, key)
        if not diff:
            return True
    raise StaleArtifactError(stale_message(what, folder, diff, overwrite_option, run_dir))


def stale_message(what: str, folder: Path, diff: list[str], overwrite_option: str, run_dir: Path) -> str:
    """The one message of a :class:`StaleArtifactError`: what, where, every differing setting, the two
    ways out."""
    return (
        f"{what} in {folder} were made with other settings than this job's: {'; '.join(diff)}. "
        f"Either recompute them here with {overwrite_option}=true, or write to a new run directory "
        f"with paths.run_dir=NEW_DIR (run directory now: {run_dir})."
    )


def recorded_differences(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """:func:`differences` over the settings of ``expected`` only (a record may hold more)."""
    return differences({k: recorded.get(k) for k in expected}, expected)


def stale_input_error(
    subject: str, made: str, diff: list[str], redo: str, run_dir: Path
) -> StaleArtifactError:
    """The refusal of an input made ``made`` (e.g. "with other settings") than this job's: every
    differing setting and the two ways out (recompute with ``redo``, or a new run directory)."""
    return StaleArtifactError(
        f"{subject} were made {made} than this job's: {'; '.join(diff)}. Use this job's settings, "
        f"recompute them here with {redo}, or write to a new run directory with paths.run_dir=NEW_DIR "
        f"(run directory now: {run_dir})"
    )


def model_key(cfg: Any) -> dict[str, Any]:
    """The model part of a provenance key for an :class:`AppConfig`: weights and config hashes of its
    local directory, or the hub id and revision when the weights are not local yet."""
    from attncomm.models.adapter import resolve_model_dir

    cache_dir = Path(cfg.paths.cache_dir)
    source = resolve_model_dir(cfg.model, cache_dir)
    if isinstance(source, Path):
        return model_identity(source, cache_dir)
    return {"model.hf_name": str(source), "model.revision": cfg.model.revision}


def trace_key(cfg: Any) -> dict[str, Any]:
    """Provenance key of the ``trace`` stage's outputs: model identity, task, prompts, trace settings."""
    return {**model_key(cfg), **task_identity(cfg), **trace_settings(cfg)}


def model_dir_name(root: str | os.PathLike[str], cfg: Any) -> str:
    """The model's folder under ``paths.root``: ``model.short_name``, unless another checkpoint already
    claimed that folder, then ``{short_name}-{weights hash8}``.

    Only models loaded from ``model.path`` are checked (builders and hub ids are named by their config).
    The first checkpoint to use a folder claims it in ``{folder}/model_identity.json``.
    """
    short = cfg.model.short_name
    path = cfg.model.path
    if not path or not (Path(path).expanduser() / "config.json").is_file():
        return short
    identity = model_identity(Path(path).expanduser(), cfg.paths.cache_dir)
    for name in (short, f"{short}-{identity['model.weights'][:8]}"):
        folder = Path(root) / name
        claimed = read_key_file(folder / "model_identity.json")
        if claimed is None:
            folder.mkdir(parents=True, exist_ok=True)
            write_key_file(folder / "model_identity.json", {**identity, "model.path": str(path)})
            return name
        if not differences({k: claimed.get(k) for k in identity}, identity):
            return name
    log.warning("model folder %s/%s is claimed by other weights; writing beside it", root, short)
    return f"{short}-{identity['model.weights'][:8]}"


def require_trace_inputs_match(cfg: Any, folder: Path, stage: str, *, include_model: bool) -> None:
    """Refuse tracing results recorded (``folder/provenance.json``) with other settings than ``cfg``'s.

    Compares the task, prompt and trace settings, and the model's identity when ``include_model``
    (stages that load the model anyway). Results without a record (made elsewhere, e.g. published
    ones copied in) are accepted.
    """
    recorded = read_key(folder)
    if recorded is None:
        return
    key = {**task_identity(cfg), **trace_settings(cfg)}
    if include_model:
        key.update(model_key(cfg))
    diff = recorded_differences(recorded, key)
    if diff:
        raise StaleArtifactError(
            f"{stage}: the tracing results in {folder} were made with other settings than this job's: "
            f"{'; '.join(diff)}. Use this job's settings, retrace with trace.overwrite=true, or write to "
            "a new run directory with paths.run_dir=NEW_DIR"
        )


# ----------------------------------------------------------------------------- stage keys
#
# Every stage that writes an artifact a later stage reads from disk records the key of its outputs:
# the keys of the stages whose outputs it read (down to the trace's model, task and trace settings),
# or, for a stage that reads the model itself, the model, task and dtype; plus its own settings.
# Settings that only choose a file's name (``compare.threshold``: one CSV per threshold) are left out,
# so a sweep over them shares one key; settings that change only speed or memory are left out too.

#: settings that change how fast or in which pieces a stage runs, never what it writes
OPERATIONAL = frozenset(
    {"overwrite", "batch_size", "max_batch", "shard", "n_shards", "merge", "max_memory_gb"}
)

#: the analysis-toolkit stages (outputs in ``analyses/{stage}/``, settings in the section of that name)
TOOLKIT_STAGES = ("dla", "logit_lens", "act_patch", "path_patch", "ablate", "attr_patch", "heads", "qk_ov")


@dataclass(frozen=True)
class StageKeySpec:
    """What identifies one stage's outputs and where they and their record are."""

    #: stages whose outputs on disk this stage reads (their keys are part of its key)
    inputs: tuple[str, ...] = ()
    #: config sections (``"prune"``) or single settings (``"interventions.threshold"``) that shape them
    settings: tuple[str, ...] = ()
    #: settings of those sections that only name the files (one file per value)
    excluded: tuple[str, ...] = ()
    #: the stage reads the model and the task's prompts itself
    model: bool = False
    #: the folder of its outputs, from the run context
    folder: Callable[[Any], Path] = lambda ctx: ctx.run_dir
    #: glob of its output files in ``folder``
    pattern: str = "*"
    #: name of its record in ``{run_dir}/provenance/`` (without ``.json``), from the run context;
    #: None: the stage's name
    record: Callable[[Any], str] | None = None


def _method_dir(ctx: Any) -> Path:
    from attncomm.methods.circuit_sources import method_dir

    return method_dir(ctx.run_dir, ctx.cfg.method.name)


STAGE_KEYS: dict[str, StageKeySpec] = {
    "unify": StageKeySpec(
        ("trace",), ("unify",), folder=lambda ctx: ctx.artifacts.combined_graphs_dir, pattern="*.graphml"
    ),
    "interventions": StageKeySpec(
        ("unify",),
        ("interventions",),
        excluded=("interventions.threshold",),
        pattern="interventions_graph_*.graphml",
    ),
    "prune": StageKeySpec(
        ("interventions",),
        ("prune", "interventions.threshold"),
        folder=lambda ctx: ctx.artifacts.pruned_graphs_dir,
        pattern="*.graphml",
        record=lambda ctx: f"prune{ctx.artifacts.prune_variant}",
    ),
    "compare": StageKeySpec(
        ("prune",),
        ("compare",),
        excluded=("compare.threshold",),
        folder=lambda ctx: ctx.artifacts.comparison_dir,
        pattern="*.csv",
        record=lambda ctx: f"compare{ctx.artifacts.prune_variant}",
    ),
    "experiments": StageKeySpec(
        ("unify",), ("experiments",), folder=lambda ctx: ctx.artifacts.intervention_data.parent
    ),
    "sparsity": StageKeySpec(
        ("trace",), ("sparsity",), folder=lambda ctx: ctx.artifacts.stage_dir("sparsity")
    ),
    "control_signals": StageKeySpec(
        (), ("control_signals",), model=True, folder=lambda ctx: ctx.artifacts.stage_dir("control_signals")
    ),
    "export": StageKeySpec(
        ("prune", "unify", "trace"),
        ("export",),
        excluded=("export.thresholds",),
        folder=lambda ctx: ctx.artifacts.stage_dir("export"),
        pattern="*/*",
    ),
    "discover": StageKeySpec(
        (),
        ("method",),
        model=True,
        folder=_method_dir,
        pattern="*_edges.json",
        record=lambda ctx: f"discover-{ctx.cfg.method.name}",
    ),
    "evaluate": StageKeySpec(
        ("discover",),
        ("evaluate",),
        folder=_method_dir,
        pattern="*_faithfulness.csv",
        record=lambda ctx: f"evaluate-{ctx.cfg.method.name}",
    ),
} | {
    name: StageKeySpec((), (name,), model=True, folder=lambda ctx, name=name: ctx.run_dir / "analyses" / name)
    for name in TOOLKIT_STAGES
}


def _setting(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def stage_inputs(cfg: Any, stage: str) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads from disk with this config (``discover method=acc``
    maps the pruned ACC graph)."""
    spec = STAGE_KEYS[stage]
    if stage == "discover" and cfg.method.name == "acc":
        return ("prune",)
    return spec.inputs


def stage_settings(cfg: Any, stage: str) -> dict[str, Any]:
    """``stage``'s own settings in its key (flat dotted names; operational and file-naming ones left out)."""
    spec = STAGE_KEYS[stage]
    out: dict[str, Any] = {}
    for name in spec.settings:
        out.update(_flat(name, _setting(cfg, name)))
    if stage == "discover" and cfg.method.name == "acc" and cfg.method.acc_threshold is None:
        out["compare.threshold"] = cfg.compare.threshold  # the pruned graph it maps
    if stage == "discover" and cfg.method.name == "exact":
        out["evaluate.ablation"] = cfg.evaluate.ablation  # how exact patching ablates an edge
    circuit = getattr(cfg.evaluate, "circuit", None) if stage == "evaluate" else None
    if circuit and not str(circuit).startswith("literature:") and Path(circuit).expanduser().is_file():
        out["evaluate.circuit.sha256"] = _file_sha256(Path(circuit).expanduser())  # its content, not name
    return {
        k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in OPERATIONAL and k not in spec.excluded
    }


def model_key_or_name(cfg: Any) -> dict[str, Any]:
    """:func:`model_key`, or ``{"model.name": ...}`` where the weights cannot be found (a stage that does
    not load the model may run on published artifacts without them)."""
    try:
        return model_key(cfg)
    except (AttncommError, ValueError, OSError) as err:
        log.debug("model identity of %s unavailable (%s): keyed by its name", cfg.model.name, err)
        return {"model.name": cfg.model.name}


#: the keys that identify the model itself (the weights, or the hub id, or only the name)
MODEL_IDENTITY = ("model.weights", "model.config", "model.hf_name", "model.revision", "model.name")


def traced_key(cfg: Any, ctx: Any = None) -> dict[str, Any]:
    """The trace's key as a later stage sees it: the model identity recorded beside the tracing results
    where there is a record (else :func:`model_key_or_name`), with ``cfg``'s task and trace settings.

    So a stage that does not load the model keys its outputs by the weights that were traced and never
    needs the weights itself, while every task or trace setting of the job is in its key."""
    model: dict[str, Any] | None = None
    if ctx is not None:
        recorded = read_key_file(ctx.artifacts.tracing_results_dir / PROVENANCE_FILE)
        if recorded is not None:
            model = {k: recorded[k] for k in MODEL_IDENTITY if k in recorded}
    if model is None:
        model = model_key_or_name(cfg)
    return {**model, **task_identity(cfg), **trace_settings(cfg)}


def stage_key(cfg: Any, stage: str, ctx: Any = None) -> dict[str, Any]:
    """The provenance key of ``stage``'s outputs for an :class:`AppConfig`: its inputs' keys (down to
    the trace's: :func:`traced_key`, recorded in ``ctx``'s run directory if given), the model/task/dtype
    where it reads the model itself, and its own settings."""
    if stage == "trace":
        return traced_key(cfg, ctx)
    spec = STAGE_KEYS[stage]
    key: dict[str, Any] = {}
    for upstream in stage_inputs(cfg, stage):
        key.update(stage_key(cfg, upstream, ctx))
    if spec.model:
        key.update({**model_key(cfg), **task_identity(cfg), "device.dtype": cfg.device.dtype})
    key.update(stage_settings(cfg, stage))
    return key


#: the folder of the run directory holding the stages' records (the published folders stay as published)
RECORDS_DIR = "provenance"


def stage_record(ctx: Any, stage: str) -> Path:
    """Where ``stage``'s key is recorded: ``{run_dir}/provenance/{stage}.json`` (``prune_nmin3``,
    ``discover-eap``: one per outputs folder); the trace's beside the tracing results."""
    if stage == "trace":
        return ctx.artifacts.tracing_results_dir / PROVENANCE_FILE
    spec = STAGE_KEYS[stage]
    name = spec.record(ctx) if spec.record is not None else stage
    return ctx.run_dir / RECORDS_DIR / f"{name}.json"


def stage_outputs(ctx: Any, stage: str) -> list[Path]:
    """``stage``'s output files present in the job's run directory (records and temporary files aside)."""
    spec = STAGE_KEYS[stage]
    folder = spec.folder(ctx)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(spec.pattern) if p.is_file() and not p.name.startswith("."))


def require_finished(recorded: Mapping[str, Any], what: str, path: Path, redo: str, run_dir: Path) -> None:
    """Refuse outputs whose record is still marked in progress (the run writing them was killed)."""
    if recorded.get(IN_PROGRESS):
        raise StaleArtifactError(
            f"{what} are incomplete (the run that writes them did not finish, see {path}). Complete "
            f"them with {redo} and the same settings (run directory: {run_dir})"
        )


def require_stage_inputs_match(cfg: Any, ctx: Any, stage: str) -> None:
    """Refuse inputs on disk whose recorded key differs from the one this job's config gives them.

    Inputs without a record (published artifacts copied in, or made by an older version) are accepted.
    """
    for upstream in stage_inputs(cfg, stage):
        path = stage_record(ctx, upstream)
        if upstream == "trace":
            require_trace_inputs_match(cfg, path.parent, stage, include_model=False)
            continue
        recorded = read_key_file(path)
        if recorded is None:
            continue
        require_finished(recorded, f"{stage}: the {upstream} outputs in {STAGE_KEYS[upstream].folder(ctx)}",
                         path, f"stage={upstream}", ctx.run_dir)  # fmt: skip
        expected = stage_key(cfg, upstream, ctx)
        diff = recorded_differences(recorded, expected)
        if diff:
            raise stale_input_error(
                f"{stage}: the {upstream} outputs in {STAGE_KEYS[upstream].folder(ctx)} (recorded in {path})",
                "with other settings",
                diff,
                f"stage={upstream} overwrite=true",
                ctx.run_dir,
            )


def guard_stage_outputs(cfg: Any, ctx: Any, stage: str) -> dict[str, Any]:
    """Before ``stage`` writes: check its inputs' keys, then its existing outputs' key, and record its own.

    Existing outputs made with another key are refused (:class:`StaleArtifactError`: the differing
    settings, ``overwrite=true`` or a new ``paths.run_dir``); with ``overwrite=true`` they are deleted,
    so no output of the old settings survives beside the new ones. Outputs without a record are
    replaced (the stage recomputes every output; nothing of them is reused). Returns the key.
    """
    require_stage_inputs_match(cfg, ctx, stage)
    key = stage_key(cfg, stage, ctx)
    path = stage_record(ctx, stage)
    folder = STAGE_KEYS[stage].folder(ctx)
    outputs = stage_outputs(ctx, stage)
    recorded = read_key_file(path)
    if outputs and recorded is not None:
        diff = differences(recorded, key)
        if diff and not getattr(cfg, "overwrite", False):
            raise StaleArtifactError(
                stale_message(f"{stage} outputs", folder, diff, "overwrite", ctx.run_dir)
            )
        if diff:
            log.warning(
                "%s: overwrite=true: deleting %d outputs in %s made with other settings (%s)",
                stage,
                len(outputs),
                folder,
                "; ".join(diff),
            )
            for p in outputs:
                p.unlink()
    elif outputs:
        log.info(
            "%s: %d outputs in %s have no provenance record; they are recomputed",
            stage,
            len(outputs),
            folder,
        )
    # recorded as in progress until the stage returns (complete_stage_records): a run killed in
    # between leaves outputs that no later stage takes for finished ones
    write_key_file(path, {**key, IN_PROGRESS: True})
    pending = getattr(ctx, "pending_records", None)
    if pending is not None:
        pending[path] = key
    return key


def complete_stage_records(ctx: Any) -> None:
    """Mark the records written by :func:`guard_stage_outputs` in this job as finished (called by the
    runner after a stage returned without error)."""
    pending = getattr(ctx, "pending_records", None) or {}
    for path, key in list(pending.items()):
        write_key_file(path, key)
        del pending[path]


def discard_stage_records(ctx: Any) -> None:
    """Remove the in-progress records of a stage that ended without writing anything (a skipped
    ``compare``), so that none is left behind as if a run had been interrupted."""
    pending = getattr(ctx, "pending_records", None) or {}
    for path in list(pending):
        path.unlink(missing_ok=True)
        del pending[path]


def stage_outputs_current(cfg: Any, ctx: Any, stage: str) -> bool:
    """Whether ``stage``'s recorded key (if any) is the one this config gives (the pipeline's check)."""
    if stage != "trace" and stage not in STAGE_KEYS:
        return True
    recorded = read_key_file(stage_record(ctx, stage))
    if recorded is None:
        return True
    if recorded.get(IN_PROGRESS):
        return False
    if stage == "trace":  # the weights where they can be found (else the rest of the key)
        expected = {**model_key_or_name(cfg), **task_identity(cfg), **trace_settings(cfg)}
        expected.pop("model.name", None)
    else:
        expected = stage_key(cfg, stage, ctx)
    return not recorded_differences(recorded, expected)


def require_same_model_and_task(cfg: Any, ctx: Any, stage: str, record: Path, redo: str) -> None:
    """Refuse an input made for another model, task or prompt settings than this job's, where the
    input's own method settings may legitimately differ (``compare_methods`` reads the edge scores of
    several methods, each with its own ``method.*``). Inputs without a record are accepted."""
    recorded = read_key_file(record)
    if recorded is None:
        return
    require_finished(recorded, f"{stage}: the outputs recorded in {record}", record, redo, ctx.run_dir)
    expected = {**model_key_or_name(cfg), **task_identity(cfg), "device.dtype": cfg.device.dtype}
    expected.pop("model.name", None)  # weights not found here: compare the rest
    diff = recorded_differences(recorded, expected)
    if diff:
        raise stale_input_error(
            f"{stage}: the outputs recorded in {record}",
            "for another model or other prompts",
            diff,
            f"`{redo} overwrite=true`",
            ctx.run_dir,
        )
