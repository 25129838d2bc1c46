"""Reference circuits of the shipped toy models, computed by the framework through the model adapter.

* ``toy-induction``: the previous-token head is the head with the highest mean attention from each
  position ``p >= 1`` to ``p - 1``; the induction head is the head with the highest mean attention
  from each position ``B{i}`` of the second copy to ``A{i+1}``, the token after the previous
  occurrence of the current token. Both scores must exceed :data:`MIN_ATTENTION`, and the
  previous-token head must sit in an earlier layer than the induction head. The expected ACC edge is
  previous-token head -> induction head on the induction head's source (key) side (type ``"s"``).
* ``toy-ioi``: a head belongs to the circuit when mean-ablating it lowers the mean logit difference
  ``logit(IO) - logit(S)`` by more than :data:`IOI_ABLATION_SHARE` (10%) of its clean value.
  Mean-ablation replaces the head's ``hook_z`` (its attention-weighted values, ``[batch pos head
  d_head]``) at every position by that head's mean ``hook_z`` over all real (non-padding) positions
  of all reference prompts.

The reference prompts use seeds that differ from every training and held-out evaluation seed.
``python -m attncomm.toys.reference toy-ioi [--path DIR] [--out FILE]`` recomputes a toy's reference
circuit (by default from, and into, the shipped directory ``attncomm/toys/<name>/``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.analyses.common import prompt_metrics
from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.runtime.config import ModelConfig, package_path
from attncomm.tasks import get_task
from attncomm.tasks.base import Task, TaskPrompts

logger = logging.getLogger(__name__)

#: file name of the reference circuit inside a toy's directory
REFERENCE_FILE = "reference_circuit.json"
#: the shipped toy models
TOY_NAMES: tuple[str, ...] = ("toy-induction", "toy-ioi")
#: prompts and seed of the reference computations (seeds unused by training and evaluation)
REFERENCE_N_PROMPTS = 200
REFERENCE_SEED = 7
#: minimum mean attention score of the identified previous-token and induction heads
MIN_ATTENTION = 0.5
#: a head is in the IOI reference circuit when mean-ablating it lowers the logit difference by more
#: than this share of the clean mean logit difference
IOI_ABLATION_SHARE = 0.10
#: decimals kept for scores in the JSON file
DECIMALS = 6
#: task constructor options of each toy
TOY_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "toy-induction": ("induction", {"seq_len": 8}),
    "toy-ioi": ("ioi", {}),
}


def toy_dir(name: str) -> Path:
    """The shipped directory of toy ``name`` inside the package (``attncomm/toys/<name>``)."""
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy model {name!r}; shipped toys: {', '.join(TOY_NAMES)}")
    return Path(package_path(f"toys/{name}"))


def toy_model_config(name: str, path: str | Path | None = None) -> ModelConfig:
    """A :class:`ModelConfig` loading toy ``name`` from ``path`` (default: the shipped directory)."""
    return ModelConfig(
        name=name,
        short_name=name,
        family="gpt2",
        path=str(path if path is not None else toy_dir(name)),
        tokenizer=None,
        prepend_bos=False,
    )


def _rounded(values: Tensor) -> list[list[float]]:
    return [[round(float(v), DECIMALS) for v in row] for row in values]


def _batches(n: int, size: int, desc: str) -> Any:
    return tqdm(range(0, n, size), desc=desc, unit="batch", leave=False)


def task_accuracy(
    model: ModelAdapter, task: Task, prompts: TaskPrompts, batch_size: int = 100
) -> tuple[float, float]:
    """Accuracy (``task.is_correct``) and mean metric of ``model`` on ``prompts``."""
    metric, correct = prompt_metrics(model, task, prompts, batch_size, desc="evaluate")
    return float(correct.float().mean()), float(metric.mean())


# ---- toy-induction ------------------------------------------------------------------------------


def induction_scores(
    model: ModelAdapter, prompts: TaskPrompts, batch_size: int = 100
) -> tuple[Tensor, Tensor]:
    """Per head ``[layer, head]``: mean attention to ``p - 1`` (previous token) and ``B{i} -> A{i+1}``."""
    a = model.arch
    L = sum(1 for r in prompts.roles[0] if r.startswith("A"))
    prev_sum = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)
    ind_sum = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)
    n_prev = n_ind = 0
    names = [model.pattern(layer) for layer in range(a.n_layers)]
    for start in _batches(len(prompts), batch_size, "induction scores"):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        sub = prompts.subset(idx)
        _, cache = model.run_with_cache(sub.tokens, names)
        for i, roles in enumerate(sub.roles):
            length = int(sub.lengths[i])
            q_prev = torch.arange(1, length)
            q_ind = torch.tensor([roles[f"B{j}"] for j in range(L - 1)])
            k_ind = torch.tensor([roles[f"A{j + 1}"] for j in range(L - 1)])
            for layer, name in enumerate(names):
                pat = cache[name][i].to(torch.float64).cpu()  # [head query key]
                prev_sum[layer] += pat[:, q_prev, q_prev - 1].sum(-1)
                ind_sum[layer] += pat[:, q_ind, k_ind].sum(-1)
            n_prev += len(q_prev)
            n_ind += len(q_ind)
    return prev_sum / n_prev, ind_sum / n_ind


def _argmax_head(scores: Tensor) -> tuple[int, int]:
    flat = int(scores.argmax())
    return flat // scores.shape[1], flat % scores.shape[1]


def induction_reference(
    model: ModelAdapter, n: int = REFERENCE_N_PROMPTS, seed: int = REFERENCE_SEED
) -> dict:
    """The previous-token head and the induction head of ``model`` from their attention patterns."""
    task_name, options = TOY_TASKS["toy-induction"]
    task = get_task(task_name, **options)
    prompts = task.make_prompts(model.tokenizer, n, seed=seed, prepend_bos=model.cfg.prepend_bos)
    prev, ind = induction_scores(model, prompts)
    prev_head, ind_head = _argmax_head(prev), _argmax_head(ind)
    problems = []
    if float(prev[prev_head]) <= MIN_ATTENTION:
        problems.append(f"best previous-token score {float(prev[prev_head]):.3f} <= {MIN_ATTENTION}")
    if float(ind[ind_head]) <= MIN_ATTENTION:
        problems.append(f"best induction score {float(ind[ind_head]):.3f} <= {MIN_ATTENTION}")
    if prev_head[0] >= ind_head[0]:
        problems.append(
            f"previous-token head {prev_head} is not in an earlier layer than induction head {ind_head}"
        )
    if problems:
        raise ValueError(f"toy-induction has no clean induction circuit: {'; '.join(problems)}")
    accuracy, metric = task_accuracy(model, task, prompts)
    return {
        "model": model.cfg.name,
        "task": task_name,
        "task_options": options,
        "n_prompts": n,
        "seed": seed,
        "prepend_bos": model.cfg.prepend_bos,
        "accuracy": round(accuracy, DECIMALS),
        "mean_metric": round(metric, DECIMALS),
        "method": (
            "attention patterns: previous-token score = mean attention from p to p-1 (p >= 1); induction "
            "score = mean attention from B{i} to A{i+1}; the best head of each, both above min_attention"
        ),
        "min_attention": MIN_ATTENTION,
        "previous_token_head": list(prev_head),
        "induction_head": list(ind_head),
        "heads": [list(prev_head), list(ind_head)],
        "edges": [{"upstream": list(prev_head), "downstream": list(ind_head), "type": "s"}],
        "previous_token_scores": _rounded(prev),
        "induction_scores": _rounded(ind),
    }


# ---- toy-ioi ------------------------------------------------------------------------------------


def _z_means(model: ModelAdapter, prompts: TaskPrompts, batch_size: int) -> Tensor:
    """Mean ``hook_z`` per ``[layer, head, d_head]`` over all real positions of all prompts."""
    a = model.arch
    total = torch.zeros(a.n_layers, a.n_heads, a.d_head, dtype=torch.float64)
    count = 0
    names = [model.z(layer) for layer in range(a.n_layers)]
    for start in _batches(len(prompts), batch_size, "mean z"):
        sub = prompts.subset(list(range(start, min(len(prompts), start + batch_size))))
        _, cache = model.run_with_cache(sub.tokens, names)
        width = sub.tokens.shape[1]
        real = (torch.arange(width)[None] < sub.lengths[:, None]).to(torch.float64)  # [batch pos]
        for layer, name in enumerate(names):
            z = cache[name].to(torch.float64).cpu()  # [batch pos head d_head]
            total[layer] += torch.einsum("bphd,bp->hd", z, real)
        count += int(real.sum())
    return total / count


def ablation_effects(
    model: ModelAdapter, task: Task, prompts: TaskPrompts, batch_size: int = 100
) -> tuple[float, Tensor]:
    """Clean mean metric and, per head, the mean metric with that head mean-ablated (``hook_z``)."""
    a = model.arch
    means = _z_means(model, prompts, batch_size).to(model.dtype)
    _, clean = task_accuracy(model, task, prompts, batch_size)
    ablated = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)
    for layer in range(a.n_layers):
        for head in range(a.n_heads):

            def ablate(z: Tensor, hook: Any, layer: int = layer, head: int = head) -> Tensor:
                z = z.clone()
                z[:, :, head] = means[layer, head].to(z.device)
                return z

            values = []
            for start in range(0, len(prompts), batch_size):
                sub = prompts.subset(list(range(start, min(len(prompts), start + batch_size))))
                logits = model.run_with_hooks(sub.tokens, [(model.z(layer), ablate)])
                values.append(task.metric(logits.to(torch.float64).cpu(), sub))
            ablated[layer, head] = torch.cat(values).mean()
    return clean, ablated


def ioi_reference(
    model: ModelAdapter,
    n: int = REFERENCE_N_PROMPTS,
    seed: int = REFERENCE_SEED,
    share: float = IOI_ABLATION_SHARE,
) -> dict:
    """The heads of ``model`` whose mean-ablation lowers the IOI logit difference by more than ``share``."""
    task_name, options = TOY_TASKS["toy-ioi"]
    task = get_task(task_name, **options)
    prompts = task.make_prompts(model.tokenizer, n, seed=seed, prepend_bos=model.cfg.prepend_bos)
    accuracy, _ = task_accuracy(model, task, prompts)
    clean, ablated = ablation_effects(model, task, prompts)
    if clean <= 0:
        raise ValueError(f"toy-ioi: clean mean logit difference {clean:.3f} is not positive")
    drop = (clean - ablated) / clean
    heads = [[int(layer), int(head)] for layer, head in (drop > share).nonzero().tolist()]
    return {
        "model": model.cfg.name,
        "task": task_name,
        "task_options": options,
        "n_prompts": n,
        "seed": seed,
        "prepend_bos": model.cfg.prepend_bos,
        "prompt_type": "mixed",
        "accuracy": round(accuracy, DECIMALS),
        "clean_logit_diff": round(clean, DECIMALS),
        "method": (
            "mean-ablation of each head's hook_z (mean over all real positions of all prompts); a head "
            "is in the circuit when the mean logit difference drops by more than ablation_share of its "
            "clean value"
        ),
        "ablation_share": share,
        "heads": heads,
        "ablated_logit_diff": _rounded(ablated),
        "logit_diff_drop_share": _rounded(drop),
    }


# ---- entry points -------------------------------------------------------------------------------


def compute_reference(name: str, model: ModelAdapter) -> dict:
    """The reference circuit of toy ``name`` computed on the loaded ``model``."""
    if name == "toy-induction":
        return induction_reference(model)
    if name == "toy-ioi":
        return ioi_reference(model)
    raise ValueError(f"unknown toy model {name!r}; shipped toys: {', '.join(TOY_NAMES)}")


def load_reference(name: str, path: str | Path | None = None) -> dict:
    """The shipped reference circuit of toy ``name`` (or the JSON file at ``path``)."""
    file = Path(path) if path is not None else toy_dir(name) / REFERENCE_FILE
    return json.loads(file.read_text(encoding="utf-8"))


def write_reference(name: str, model_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Load toy ``name`` from ``model_dir`` (default: shipped), compute its circuit, write it as JSON."""
    model_dir = Path(model_dir) if model_dir is not None else toy_dir(name)
    model = load_model(toy_model_config(name, model_dir))
    reference = compute_reference(name, model)
    target = Path(out) if out is not None else model_dir / REFERENCE_FILE
    target.write_text(json.dumps(reference, indent=2) + "\n", encoding="utf-8")
    logger.info("%s reference circuit: heads %s -> %s", name, reference["heads"], target)
    return target


def main(argv: list[str] | None = None) -> None:
    """``python -m attncomm.toys.reference NAME [--path DIR] [--out FILE]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=TOY_NAMES)
    parser.add_argument("--path", default=None, help="model directory (default: the shipped toy)")
    parser.add_argument("--out", default=None, help="JSON file (default: <path>/reference_circuit.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    write_reference(args.name, args.path, args.out)


if __name__ == "__main__":
    main()
