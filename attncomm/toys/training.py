"""Training of the shipped model organisms (``toy-induction``, ``toy-ioi``): pure code, no Hydra.

Both toys are :class:`transformers.GPT2LMHeadModel` checkpoints saved as ordinary local HF directories
(``model.safetensors`` + ``config.json`` + a ``PreTrainedTokenizerFast`` saved with ``save_pretrained``),
so :func:`attncomm.models.adapter.load_model` boots them through the TransformerLens bridge like any GPT-2.

* ``toy-induction``: 2 layers x 2 heads (d_model 64, d_head 32), attention-only, a word-level vocabulary
  of 299 tokens ``" t000"`` .. ``" t298"`` plus ``<|endoftext|>`` (BOS/EOS/PAD). Trained on repeated
  random token sequences of random length (8..24) after a random-length random prefix (0..15 tokens),
  so that the distance back to a token's previous occurrence varies from example to example, position
  alone cannot solve the task, and the model learns the textbook previous-token head (layer 0) ->
  induction head (layer 1) circuit (K-composition); the ``induction`` task's prompts (``seq_len`` 8, no
  prefix) are one point of that distribution. Loss: next-token cross-entropy on the second copy only
  (its tokens are the only predictable ones). The previous-token and induction scores of
  :func:`induction_head_scores` are logged with every evaluation: both jump together at the "phase
  change" (~500 steps with the shipped hyperparameters).
* ``toy-ioi``: 3 layers x 4 heads, attention-only, a byte-level BPE trained (with ``tokenizers``) on
  every IOI template filled with every name, place and object of :mod:`attncomm.tasks.ioi`, with as
  many merges as it takes for every word of the corpus to become a single token with its leading
  space, like GPT-2 (``" Mary"``, ``" gave"``, ``","``). Trained on the ``ioi`` task's own prompts
  from all 30 templates (15 BABA + 15 ABBA); loss: next-token cross-entropy on every token plus the
  cross-entropy of the final IO token.

Attention-only: the GPT-2 MLPs are kept (the HF class needs them) with a width of 4, their weights
and biases set to zero and frozen (``requires_grad=False``), so every MLP writes exactly zero
(``GELU(0) = 0``) before and after TransformerLens's weight processing. Half the batches are built
with a BOS token and half without, so the toys work with either ``model.prepend_bos``.

Training is deterministic on CPU for a given seed: batches come from seeded generators, dropout is
off, and :func:`train_toy` fixes torch's seed and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from attncomm.tasks import get_task
from attncomm.tasks.base import Task, TaskPrompts, bos_id, pad_batch, pad_id
from attncomm.tasks.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    fill_template,
)

logger = logging.getLogger(__name__)

#: the one special token of both toys: BOS, EOS, PAD and UNK, as in GPT-2
SPECIAL = "<|endoftext|>"
#: MLP width of the attention-only toys (weights zero and frozen; the HF class needs an MLP)
ATTN_ONLY_D_MLP = 4
#: seed of the held-out prompts used to report accuracy during and after training
EVAL_SEED = 10_000


@dataclass(frozen=True)
class ToySpec:
    """Architecture, vocabulary and task of one shipped toy model."""

    name: str
    task: str
    n_layer: int
    n_head: int
    d_model: int
    n_ctx: int
    vocab: str  # "induction" (word-level) | "ioi" (byte-level BPE)
    attn_only: bool = True
    #: constructor options of the task (``get_task(task, **task_options)``)
    task_options: dict[str, Any] = field(default_factory=dict)
    #: held-out accuracy the trained model must reach
    target_accuracy: float = 0.95
    #: induction vocabulary size, BOS/PAD included
    vocab_size: int = 300
    #: induction training distribution: random sequence lengths and prefix lengths (inclusive)
    seq_len_range: tuple[int, int] = (4, 16)
    prefix_range: tuple[int, int] = (0, 8)
    #: std of the initial position embeddings (GPT-2's default is 0.02); larger values make positions
    #: distinguishable from the start, which lets a previous-token head form early
    pos_init_std: float = 0.02


TOY_SPECS: dict[str, ToySpec] = {
    "toy-induction": ToySpec(
        name="toy-induction",
        task="induction",
        n_layer=2,
        n_head=2,
        d_model=64,
        n_ctx=64,  # BOS + prefix (<= 15) + 2 copies (<= 24 each)
        vocab="induction",
        task_options={"seq_len": 8},
        seq_len_range=(8, 24),
        prefix_range=(0, 15),
    ),
    "toy-ioi": ToySpec(
        name="toy-ioi",
        task="ioi",
        n_layer=3,
        n_head=4,
        d_model=64,
        n_ctx=64,
        vocab="ioi",
    ),
}


def get_spec(name: str) -> ToySpec:
    """The toy called ``name``; an unknown name lists the valid ones."""
    if name not in TOY_SPECS:
        raise ValueError(f"unknown toy model {name!r}; valid toys: {', '.join(sorted(TOY_SPECS))}")
    return TOY_SPECS[name]


# ---- tokenizers ---------------------------------------------------------------------------------


def _wrap_tokenizer(backend: Any) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers`` object, GPT-2's special-token layout."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )
    tok.model_max_length = 1024
    tok.padding_side = "right"
    return tok


def build_induction_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<|endoftext|>`` = 0, then words ``t000`` .. that decode with a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = [f"t{i:03d}" for i in range(vocab_size - 1)]
    vocab = {SPECIAL: 0} | {w: i + 1 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return _wrap_tokenizer(backend)


def ioi_corpus() -> list[str]:
    """Every IOI template (BABA and ABBA) filled so that each name, place and object occurs in it."""
    templates = list(BABA_TEMPLATES) + list(ABBA_TEMPLATES)
    corpus = []
    for i, template in enumerate(templates):
        for j, name in enumerate(NAMES):
            other = NAMES[(j + 7) % len(NAMES)]
            place, obj = PLACES[j % len(PLACES)], OBJECTS[(i + j) % len(OBJECTS)]
            corpus.append(fill_template(template, name, other, place, obj))
    return corpus


def build_ioi_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE on :func:`ioi_corpus`, merged until every word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: merging stops when every word is a single token
        min_frequency=1,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(ioi_corpus(), trainer)
    return _wrap_tokenizer(backend)


def build_tokenizer(spec: ToySpec) -> PreTrainedTokenizerFast:
    """The tokenizer of ``spec``."""
    if spec.vocab == "induction":
        return build_induction_tokenizer(spec.vocab_size)
    if spec.vocab == "ioi":
        return build_ioi_tokenizer()
    raise ValueError(f"toy {spec.name!r}: unknown vocabulary kind {spec.vocab!r} (induction | ioi)")


# ---- model --------------------------------------------------------------------------------------


def build_model(spec: ToySpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> transformers.GPT2LMHeadModel:
    """A freshly initialised GPT-2 of ``spec``'s shape (MLPs zeroed and frozen when attention-only)."""
    torch.manual_seed(seed)
    special = int(tokenizer.convert_tokens_to_ids(SPECIAL))
    cfg = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_ctx,
        n_embd=spec.d_model,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_inner=ATTN_ONLY_D_MLP if spec.attn_only else 4 * spec.d_model,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
        tie_word_embeddings=True,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    if spec.pos_init_std != cfg.initializer_range:
        with torch.no_grad():
            model.transformer.wpe.weight.normal_(0.0, spec.pos_init_std)
    if spec.attn_only:
        for block in model.transformer.h:
            for param in block.mlp.parameters():
                with torch.no_grad():
                    param.zero_()
                param.requires_grad_(False)
    return model


# ---- batches ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Token rows (right padded), next-token targets and the positions that carry loss."""

    tokens: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]  # targets[:, p] = the token to predict at position p
    mask: Float[Tensor, "batch pos"]  # loss weight per position (0 on padding and unpredictable tokens)


def induction_batch(
    spec: ToySpec, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator, size: int, with_bos: bool
) -> Batch:
    """Random prefix + random sequence + the same sequence again; loss on the second copy."""
    task = get_task(spec.task, **spec.task_options)
    assert hasattr(task, "candidates")
    pool = task.candidates(tokenizer)
    rows: list[list[int]] = []
    masks: list[list[float]] = []
    for _ in range(size):
        length = int(rng.integers(spec.seq_len_range[0], spec.seq_len_range[1] + 1))
        prefix = [int(t) for t in rng.choice(pool, int(rng.integers(*spec.prefix_range, endpoint=True)))]
        seq = [int(t) for t in rng.choice(pool, length, replace=False)]
        head = ([bos_id(tokenizer)] if with_bos else []) + prefix
        row = head + seq + seq
        start2 = len(head) + length  # first position of the second copy
        mask = [0.0] * len(row)
        for p in range(start2, start2 + length - 1):  # predicts seq[1:] from the second copy
            mask[p] = 1.0
        rows.append(row)
        masks.append(mask)
    return _batch_from_rows(rows, masks, pad_id(tokenizer))


def ioi_batch(
    spec: ToySpec, tokenizer: PreTrainedTokenizerBase, seed: int, size: int, with_bos: bool
) -> Batch:
    """IOI prompts of all 30 templates; loss on every next token plus once more on the IO answer."""
    task = get_task(spec.task, **spec.task_options)
    prompts = task.make_prompts(
        tokenizer, size, seed=seed, prepend_bos=with_bos, templates=list(BABA_TEMPLATES + ABBA_TEMPLATES)
    )
    rows, masks = [], []
    for i in range(len(prompts)):
        n = int(prompts.lengths[i])
        rows.append(prompts.tokens[i, :n].tolist())
        mask = [1.0] * (n - 1) + [0.0]
        mask[int(prompts.end[i])] += 1.0
        masks.append(mask)
    return _batch_from_rows(rows, masks, pad_id(tokenizer))


def _batch_from_rows(rows: list[list[int]], masks: list[list[float]], pad: int) -> Batch:
    tokens, _ = pad_batch(rows, pad)
    targets = torch.full_like(tokens, pad)
    targets[:, :-1] = tokens[:, 1:]
    weight = torch.zeros(tokens.shape, dtype=torch.float32)
    for i, mask in enumerate(masks):
        weight[i, : len(mask)] = torch.tensor(mask)
    weight[:, -1] = 0.0
    return Batch(tokens, targets, weight)


# ---- evaluation ---------------------------------------------------------------------------------


def heldout_prompts(
    spec: ToySpec, tokenizer: PreTrainedTokenizerBase, n: int, seed: int, prepend_bos: bool
) -> tuple[Task, TaskPrompts]:
    """The toy's task and ``n`` of its prompts (the task's default distribution) from ``seed``."""
    task = get_task(spec.task, **spec.task_options)
    return task, task.make_prompts(tokenizer, n, seed=seed, prepend_bos=prepend_bos)


@torch.no_grad()
def evaluate_hf(
    model: transformers.PreTrainedModel,
    spec: ToySpec,
    tokenizer: PreTrainedTokenizerBase,
    n: int = 500,
    seed: int = EVAL_SEED,
    prepend_bos: bool = False,
) -> dict[str, float]:
    """Accuracy (``task.is_correct``) and mean task metric of the HF model on held-out prompts."""
    task, prompts = heldout_prompts(spec, tokenizer, n, seed, prepend_bos)
    was_training = model.training
    model.eval()
    logits = model(prompts.tokens, attention_mask=torch.ones_like(prompts.tokens)).logits
    logits = logits.to(torch.float64)
    model.train(was_training)
    return {
        "accuracy": float(task.is_correct(logits, prompts).float().mean()),
        "mean_metric": float(task.metric(logits, prompts).mean()),
    }


@torch.no_grad()
def induction_head_scores(
    model: transformers.PreTrainedModel,
    spec: ToySpec,
    tokenizer: PreTrainedTokenizerBase,
    n: int = 200,
    seed: int = EVAL_SEED,
    prepend_bos: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per head ``[layer, head]`` of the HF model on held-out ``induction`` prompts: the mean attention
    from each position ``p >= 1`` to ``p - 1`` (previous-token score) and from each ``B{i}`` to
    ``A{i+1}`` (induction score), as :func:`attncomm.toys.reference.induction_scores` computes them."""
    task, prompts = heldout_prompts(spec, tokenizer, n, seed, prepend_bos)
    L = sum(1 for r in prompts.roles[0] if r.startswith("A"))
    was_training, implementation = model.training, model.config._attn_implementation
    model.eval()
    model.set_attn_implementation("eager")  # the only implementation that returns attention patterns
    try:
        attentions = model(
            prompts.tokens, attention_mask=torch.ones_like(prompts.tokens), output_attentions=True
        ).attentions
    finally:
        model.set_attn_implementation(implementation)
        model.train(was_training)
    pattern = torch.stack(attentions, 1).to(torch.float64)  # [batch layer head query key]
    length = int(prompts.lengths[0])  # every prompt has the same length
    q = torch.arange(1, length)
    prev = pattern[:, :, :, q, q - 1].mean((0, -1))
    roles = prompts.roles[0]
    q_ind = torch.tensor([roles[f"B{j}"] for j in range(L - 1)])
    k_ind = torch.tensor([roles[f"A{j + 1}"] for j in range(L - 1)])
    ind = pattern[:, :, :, q_ind, k_ind].mean((0, -1))
    return prev, ind


# ---- training -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """A trained toy: the HF model, its tokenizer and the training record."""

    model: transformers.GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast
    training_config: dict[str, Any]
    metrics: dict[str, Any]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_toy(
    name: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    *,
    n_threads: int = 1,
    eval_every: int = 250,
    n_eval: int = 500,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train toy ``name`` deterministically on CPU; returns the model with its held-out accuracy."""
    spec = get_spec(name)
    torch.set_num_threads(n_threads)
    tokenizer = build_tokenizer(spec)
    model = build_model(spec, tokenizer, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = np.random.default_rng(seed)
    warmup = max(1, min(200, steps // 10))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=f"train {name}", unit="step", mininterval=2.0)
    loss_avg = float("nan")
    for step in bar:
        with_bos = step % 2 == 0
        if spec.vocab == "induction":
            batch = induction_batch(spec, tokenizer, rng, batch_size, with_bos)
        else:
            batch = ioi_batch(spec, tokenizer, 1_000_003 * (seed + 1) + step, batch_size, with_bos)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        logits = model(batch.tokens, attention_mask=torch.ones_like(batch.tokens)).logits
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), reduction="none"
        )
        loss = (ce * batch.mask.reshape(-1)).sum() / batch.mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        loss_avg = loss_value if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * loss_value
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            ev = evaluate_hf(model, spec, tokenizer, n=min(n_eval, 200), prepend_bos=False)
            record: dict[str, float] = {"step": step + 1, "loss": loss_avg, **ev}
            if spec.vocab == "induction":
                prev, ind = induction_head_scores(model, spec, tokenizer, n=min(n_eval, 200))
                record |= {"prev_token_score": float(prev[0].max()), "induction_score": float(ind[1:].max())}
            history.append(record)
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{ev['accuracy']:.3f}")
            logger.info(
                "%s step %d: loss %.4f held-out accuracy %.3f%s",
                name,
                step + 1,
                loss_avg,
                ev["accuracy"],
                "".join(f", {k} {v:.3f}" for k, v in record.items() if k.endswith("_score")),
            )
            if on_eval is not None:
                on_eval(step + 1, record)
    seconds = time.perf_counter() - start
    model.eval()
    final = {
        f"{key}_{'bos' if bos else 'nobos'}": value
        for bos in (False, True)
        for key, value in evaluate_hf(model, spec, tokenizer, n=n_eval, prepend_bos=bos).items()
    }
    metrics: dict[str, Any] = {
        "toy": name,
        "task": spec.task,
        "eval_seed": EVAL_SEED,
        "n_eval": n_eval,
        **final,
        "final_loss": loss_avg,
        "train_seconds": round(seconds, 1),
        "history": history,
    }
    if min(final["accuracy_nobos"], final["accuracy_bos"]) <= spec.target_accuracy:
        logger.warning(
            "%s: held-out accuracy %.3f / %.3f (without / with BOS) is not above the target %.2f",
            name,
            final["accuracy_nobos"],
            final["accuracy_bos"],
            spec.target_accuracy,
        )
    training_config = {
        "toy": name,
        "spec": asdict(spec),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), grad clip 1.0",
        "schedule": f"linear warmup {warmup} steps, cosine to 10% of lr",
        "n_threads": n_threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    return TrainResult(model, tokenizer, training_config, metrics)


def save_toy(result: TrainResult, directory: str | Path) -> list[Path]:
    """Write the model directory: safetensors, config, tokenizer, training_config.json, metrics.json."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out, safe_serialization=True)
    result.tokenizer.save_pretrained(out)
    (out / "training_config.json").write_text(
        json.dumps(result.training_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (out / "metrics.json").write_text(
        json.dumps(result.metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return sorted(p for p in out.iterdir() if p.is_file())
