"""Full QK and OV circuits of chosen heads through the embedding and unembedding, as TransformerLens
``FactoredMatrix`` objects (never materialised at vocab x vocab), and composition scores.

Token inputs: a token ``t`` that is not in context is represented by its own embedding row
``W_E[t]`` (times the model's embedding scale, e.g. Gemma's sqrt(d_model)), with no position
embedding and no earlier layers, passed through the head's input norm as the model applies it:
centred (LayerNorm; not for RMSNorm) and divided by *its own* scale ``sqrt(mean(x^2) + eps)``. The
norm gains are folded into ``W_Q/W_K/W_V`` by the adapter's weight processing.

* QK circuit of head (l, h): ``FactoredMatrix(X W_Q + b_Q, (X W_K + b_K)^T) / attn_scale``
  ``[query token, key token]``; top-k keys of a query token read one row (a ``d_vocab`` vector).
* OV circuit: ``FactoredMatrix(X W_V + b_V, W_O W_U)`` ``[source token, output token]``; top-k output
  tokens of a source token read one row. The final norm's positive scale does not change a row's
  ranking and is left out.
* OV copying score (Elhage et al.): eigenvalues of the OV circuit through ``FactoredMatrix.eigenvalues``
  (computed on the ``d_head x d_head`` product ``BA``): ``sum(lambda) / sum(|lambda|)`` (real part) and
  the fraction of eigenvalues with a positive real part.
* Positional QK pattern (learned absolute positions only): the same with ``X`` the normalised rows of
  ``W_pos``, causally masked and softmaxed per query position.
* Q/K/V composition between every head of layer l and every head of layer l+1: TransformerLens's
  ``composition_scores`` of the earlier head's ``OV = W_V W_O`` with the later head's ``W_Q W_K^T``
  (Q), its transpose (K) or its ``OV`` (V).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from attncomm.analyses.common import check_heads

if TYPE_CHECKING:
    from transformer_lens import FactoredMatrix

    from attncomm.models.adapter import ModelAdapter


def normalised_rows(
    x: Float[Tensor, "n d_model"], layer_norm: bool, eps: float
) -> Float[Tensor, "n d_model"]:
    """Each row through the (gain-folded) input norm with its own scale."""
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def token_inputs(model: ModelAdapter) -> Float[Tensor, "d_vocab d_model"]:
    """Every token's input to a head when the token is not in context (see the module docstring)."""
    w = model.weights
    eps = float(getattr(model.bridge.cfg, "eps", 1e-5))
    return normalised_rows(w.W_E * model.arch.embed_scale, model.arch.normalization == "LN", eps)


def qk_circuit(model: ModelAdapter, layer: int, head: int, X: Tensor | None = None) -> FactoredMatrix:
    """The full QK circuit ``[query token, key token]`` of a head (or of the rows ``X``)."""
    from transformer_lens import FactoredMatrix

    w = model.weights
    X = token_inputs(model) if X is None else X
    q = X @ w.W_Q[layer, head] + w.b_Q[layer, head]
    k = X @ w.W_K[layer, head] + w.b_K[layer, head]
    return FactoredMatrix(q / model.arch.attn_scale, k.T)


def ov_circuit(model: ModelAdapter, layer: int, head: int) -> FactoredMatrix:
    """The full OV circuit ``[source token, output token]`` of a head."""
    from transformer_lens import FactoredMatrix

    w = model.weights
    X = token_inputs(model)
    return FactoredMatrix(X @ w.W_V[layer, head] + w.b_V[layer, head], w.W_O[layer, head] @ w.W_U)


def row_top_k(fm: FactoredMatrix, row: int, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of one row of a factored matrix, without forming the matrix."""
    values = fm.A[row] @ fm.B
    top = torch.topk(values, min(k, values.shape[-1]))
    return top.values, top.indices


def copying_scores(fm: FactoredMatrix) -> tuple[float, float]:
    """``(sum(lambda)/sum(|lambda|), fraction of eigenvalues with positive real part)`` of a circuit."""
    eig = fm.eigenvalues
    total = float(eig.abs().sum())
    score = float(eig.sum().real) / total if total else float("nan")
    return score, float((eig.real > 0).float().mean())


def positional_pattern(model: ModelAdapter, layer: int, head: int, n_pos: int) -> Tensor | None:
    """``[query pos, key pos]`` attention of a head from position embeddings alone (None for rotary)."""
    w = model.weights
    if w.W_pos is None:
        return None
    eps = float(getattr(model.bridge.cfg, "eps", 1e-5))
    P = normalised_rows(w.W_pos[:n_pos], model.arch.normalization == "LN", eps)
    scores = qk_circuit(model, layer, head, P).AB
    mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def composition_table(model: ModelAdapter) -> pd.DataFrame:
    """Q/K/V composition of every head with every head of the next layer (one row per pair and type)."""
    from transformer_lens import FactoredMatrix
    from transformer_lens.utilities.matrix import composition_scores

    w = model.weights
    OV = FactoredMatrix(w.W_V, w.W_O)  # [layer head d_model d_model]
    QK = FactoredMatrix(w.W_Q, w.W_K.transpose(-2, -1))
    rows = []
    for layer in range(model.arch.n_layers - 1):
        left = OV[layer]
        for kind, right in (("q", QK[layer + 1]), ("k", QK[layer + 1].T), ("v", OV[layer + 1])):
            scores = composition_scores(left, right)  # [head_left head_right]
            for h1 in range(scores.shape[0]):
                for h2 in range(scores.shape[1]):
                    rows.append(
                        {
                            "kind": kind,
                            "layer": layer,
                            "head": h1,
                            "layer_to": layer + 1,
                            "head_to": h2,
                            "value": float(scores[h1, h2]),
                        }
                    )
    return pd.DataFrame(rows)


def qk_ov_tables(
    model: ModelAdapter, heads: Sequence[Any], tokens: Sequence[int], top_k: int = 10, n_pos: int = 32
) -> dict[str, pd.DataFrame]:
    """Tables for the chosen heads: ``top_k`` (per head, circuit, input token: ranked output/key tokens),
    ``copying`` (OV copying scores), ``positional`` (the positional QK pattern, long form) and
    ``composition`` (every consecutive-layer head pair)."""
    pairs = check_heads("qk_ov.heads", heads, model.arch.n_layers, model.arch.n_heads)
    tok = model.tokenizer
    top_rows, copy_rows, pos_rows = [], [], []
    for layer, head in pairs:
        qk, ov = qk_circuit(model, layer, head), ov_circuit(model, layer, head)
        for circuit, fm in (("ov", ov), ("qk", qk)):
            for t in tokens:
                values, idx = row_top_k(fm, int(t), top_k)
                for rank, (v, j) in enumerate(zip(values.tolist(), idx.tolist(), strict=True), start=1):
                    top_rows.append(
                        {
                            "layer": layer,
                            "head": head,
                            "circuit": circuit,
                            "input_token": tok.decode([int(t)]),
                            "input_id": int(t),
                            "rank": rank,
                            "token": tok.decode([j]),
                            "token_id": j,
                            "value": v,
                        }
                    )
        score, positive = copying_scores(ov)
        copy_rows.append(
            {"layer": layer, "head": head, "copying_score": score, "positive_eigenvalue_fraction": positive}
        )
        pattern = positional_pattern(model, layer, head, min(n_pos, model.arch.n_ctx))
        if pattern is not None:
            for q in range(pattern.shape[0]):
                for k in range(q + 1):
                    pos_rows.append(
                        {"layer": layer, "head": head, "pos": q, "key_pos": k, "value": float(pattern[q, k])}
                    )
    return {
        "top_k": pd.DataFrame(top_rows),
        "copying": pd.DataFrame(copy_rows),
        "positional": pd.DataFrame(pos_rows, columns=["layer", "head", "pos", "key_pos", "value"]),
        "composition": composition_table(model),
    }
