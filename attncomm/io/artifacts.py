"""Run directories, published artifact file names, atomic writes and manifests.

The layout is a contract (DESIGN.md): file names are the paper's, so results diff against the
published ones. Every write goes to a temporary name in the same directory and is renamed into place,
so a killed job never leaves a half-written file that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attncomm.errors import MissingArtifactError
from attncomm.io.crashpoints import before_commit

#: method parameters whose non-default values give a run directory its own ``_{hash8}`` suffix
METHOD_DEFAULTS: dict[str, Any] = {
    "trace.with_tokens": False,
    "trace.skip_incorrect": True,
    "trace.seed_fraction": 1.0,
    "trace.upstream_fraction": 0.7,
    "trace.max_firings": None,
    "device.dtype": "float32",
    "task.prompt_type": "mixed",
}


def format_threshold(th: float) -> str:
    """Threshold as it appears in published file names: ``0.0``, ``0.01``, ``0.2``, ``0.35``."""
    return str(round(float(th), 10))


def _current_umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    # mkstemp creates 0600; the final file gets what the user's umask gives any new file
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        before_commit()
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically; returns the final path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def write_table(df: Any, path: str | os.PathLike[str]) -> Path:
    """Write a pandas DataFrame atomically as parquet (``.parquet``) or CSV (anything else)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            tmp.write_text(df.to_csv(index=False), encoding="utf-8")
    return path


def method_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """The method parameters in ``flat`` (dotted keys) that differ from the published defaults."""
    return {k: flat[k] for k, v in METHOD_DEFAULTS.items() if k in flat and flat[k] != v}


def run_dir_for(
    root: str | os.PathLike[str], model: str, task: str, n: int, seed: int, overrides: dict[str, Any]
) -> Path:
    """``{root}/{model}/{task}/n{N}_seed{seed}``, plus ``_{hash8}`` when method parameters differ."""
    name = f"n{n}_seed{seed}"
    if overrides:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
        name += f"_{digest[:8]}"
    return Path(root) / model / task / name


#: glob of every standard run directory below an artifact root (the three levels of :func:`run_dir_for`)
RUN_DIR_GLOB = "*/*/*"


@dataclass(frozen=True)
class RunArtifacts:
    """Every artifact path of one model/task/setting run directory (published names)."""

    run_dir: Path
    model: str
    task: str
    n: int
    seed: int
    #: suffix of the pruning outputs' folders when ``prune.n_min`` is not the published value
    #: (``_nmin{n}``), so an n_min sweep never overwrites the published-setting circuits
    prune_variant: str = ""
    #: artifact kind -> the stage producing it (from the stage registry), named in missing-input errors
    producers: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def stem(self) -> str:
        """``{model}_{task}``: the start of every per-run file name that does not carry ``n{N}``."""
        return f"{self.model}_{self.task}"

    @property
    def prefix(self) -> str:
        return f"{self.stem}_n{self.n}"

    @property
    def omega_dir(self) -> Path:
        return self.run_dir / "omega"

    @property
    def traced_graphs_dir(self) -> Path:
        return self.run_dir / "traced_graphs"

    def traced_graph(self, prompt: int) -> Path:
        return self.traced_graphs_dir / f"{self.prefix}_{prompt}_{self.seed}.graphml"

    @property
    def tracing_results_dir(self) -> Path:
        return self.run_dir / "tracing_results"

    def _tracing_results_name(self, suffix: str) -> str:
        return f"{self.prefix}_{self.seed}{suffix}.h5"

    def tracing_results(self, shard: int | None = None) -> Path:
        suffix = "" if shard is None else f"_shard{shard}"
        return self.tracing_results_dir / self._tracing_results_name(suffix)

    def tracing_result_shards(self) -> list[Path]:
        """The shard files of :meth:`tracing_results` that exist, sorted by name."""
        return sorted(self.tracing_results_dir.glob(self._tracing_results_name("_shard*")))

    @property
    def combined_graphs_dir(self) -> Path:
        return self.run_dir / "combined_graphs"

    def combined_graph(self, th: float) -> Path:
        return self.combined_graphs_dir / f"{self.prefix}_combined_{format_threshold(th)}.graphml"

    def interventions_graph(self, th: float = 0.01) -> Path:
        return self.run_dir / (
            f"interventions_graph_{self.prefix}_{self.seed}_combined_{format_threshold(th)}.graphml"
        )

    @property
    def pruned_graphs_dir(self) -> Path:
        return self.run_dir / f"pruned_graphs{self.prune_variant}"

    def pruned_graph(self, th: float) -> Path:
        return self.pruned_graphs_dir / f"{self.prefix}_{format_threshold(th)}.graphml"

    @property
    def comparison_dir(self) -> Path:
        return self.run_dir / f"circuit_comparison{self.prune_variant}"

    def comparison_csv(self, th: float) -> Path:
        return self.comparison_dir / f"{self.stem}_{format_threshold(th)}.csv"

    @property
    def intervention_data(self) -> Path:
        return self.run_dir / "intervention_data" / f"{self.stem}.parquet"

    def stage_dir(self, name: str) -> Path:
        """Directory for a stage's own outputs (``control_signals/``, ``sparsity/``, ``export/``)."""
        return self.run_dir / name

    @property
    def figures_dir(self) -> Path:
        return self.run_dir / "figures"

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    def location(self, kind: str) -> list[Path]:
        """Where artifacts of ``kind`` live: the published folders and files, else ``{run_dir}/{kind}``."""
        fixed = {
            "omega": [self.omega_dir],
            "traced_graphs": [self.traced_graphs_dir],
            "tracing_results": [self.tracing_results_dir],
            "combined_graphs": [self.combined_graphs_dir],
            "interventions_graph": sorted(self.run_dir.glob(f"interventions_graph_{self.prefix}_*.graphml")),
            "pruned_graphs": [self.pruned_graphs_dir],
            "circuit_comparison": [self.comparison_dir],
            "intervention_data": [self.intervention_data],
        }
        return fixed.get(kind, [self.stage_dir(kind)])

    def has(self, kind: str) -> bool:
        """Whether an artifact of ``kind`` is present (a file, or a non-empty folder)."""
        return any(p.is_file() or (p.is_dir() and any(p.iterdir())) for p in self.location(kind))

    def require(self, path: Path, kind: str, hint: str = "") -> Path:
        """Return ``path`` if it exists (a non-empty directory counts), else raise a helpful error.

        ``kind`` is an artifact kind of :attr:`producers`; ``hint`` is the overrides a user would pass again.
        """
        ok = path.is_file() or (path.is_dir() and any(path.iterdir()))
        if ok:
            return path
        producer = self.producers.get(kind, kind)
        command = f"python run.py stage={producer} model=<model> task={self.task} task.n_prompts={self.n}"
        if hint:
            command += f" {hint}"
        raise MissingArtifactError(str(path), producer, command)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    from importlib import metadata

    names = ["attncomm", "torch", "transformer_lens", "transformers", "hydra-core", "numpy"]
    found: dict[str, str] = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def update_manifest(
    artifacts: RunArtifacts,
    stage: str,
    files: list[Path],
    config: dict[str, Any],
    extra: Any = None,
    prompt_file: dict[str, Any] | None = None,
) -> None:
    """Journal in the run directory's manifest which stage produced ``files``, with config, versions,
    git sha and time (see :mod:`attncomm.io.manifest`: one entry per job, never overwritten) and, for
    prompt-file tasks, ``prompt_file``: the rows read, dropped and why."""
    from attncomm.io.manifest import append_entry, job_id

    entry = {
        "stage": stage,
        "job": job_id(stage, config),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "versions": _versions(),
        "config": config,
        "files": sorted(str(Path(f).relative_to(artifacts.run_dir)) for f in files),
    }
    if extra is not None:
        entry["extra"] = dataclasses.asdict(extra) if dataclasses.is_dataclass(extra) else extra
    if prompt_file is not None:
        entry["prompt_file"] = prompt_file
    append_entry(artifacts.run_dir, json.loads(json.dumps(entry, default=str)))
