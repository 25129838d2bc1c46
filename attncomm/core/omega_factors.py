"""The augmented Omega matrices of ACC as thin factors, their thin SVDs and rotary offsets (section 1).

For head ``(l, h)`` the attention logit (unscaled) is ``a(d, s) = q_d R(d - s) k_s^T`` with
``q = x W_Q + b_Q`` and ``k = x W_K + b_K`` and ``R(delta)`` the rotary rotation (identity for
non-rotary models). Written as bilinear forms in the normalized inputs::

    Omega_d(delta) = W_Q R(delta) [W_K ; b_K]^T      D x (D+1)   (dest side)
    Omega_s(delta) = [W_Q ; b_Q] R(delta) W_K^T      (D+1) x D   (source side)

so every Omega is ``A R B^T`` with thin factors ``A, B`` of ``d_head`` columns. Models without attention
biases (``has_attn_bias=False``) use the plain ``W_Q R W_K^T`` for both sides (no augmentation).

Conventions (row vectors, as TransformerLens): the rotary embedding at position ``p`` maps a row vector
``x`` to ``x M_p``, with ``M_p`` built from the model's own cos/sin tables, GPT-NeoX pairing
``(i, i + rotary_dim/2)`` unless ``adjacent_pairs`` (pairs ``(2i, 2i+1)``), and only the first
``rotary_dim`` dimensions rotating. Then ``q_rot(d) . k_rot(s) = q M_d M_s^T k^T = q M_{d-s} k^T``, so
``R(delta) = M_delta``.

The SVD is computed without ever forming a ``D x D`` matrix: ``A = Q_a R_a``, ``B = Q_b R_b`` (reduced
QR), then ``R_a R(delta) R_b^T = U' S V'^T`` (a ``d_head x d_head`` SVD), so ``U = Q_a U'`` and
``V = Q_b V'``. :class:`OmegaCache` keeps the QR factors per (layer, side) for all heads and computes the
small SVD of any offset on demand (no fixed offset range). The "compact" coordinates ``U', V'`` are
what :mod:`attncomm.core.decompose` and :mod:`attncomm.core.contributions` use.

GQA: the head weights passed here are already expanded to query heads (head ``h`` reads kv group
``h // (H / n_kv_heads)``); :func:`expand_kv` does that expansion for grouped tensors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "OmegaCache",
    "OmegaSVD",
    "OmegaSide",
    "QRFactors",
    "apply_rotary",
    "default_rotary_tables",
    "dense_omega",
    "expand_kv",
    "omega_factors",
    "qr_factors",
    "rotary_matrix",
    "thin_svd",
]

#: "d" = dest side (Omega_d), "s" = source side (Omega_s)
OmegaSide = str


def expand_kv(w: Float[Tensor, "kv_head ..."], n_heads: int) -> Float[Tensor, "head_index ..."]:
    """Expand grouped key/value weights to one per query head (``h`` reads group ``h // (H / n_kv)``)."""
    n_kv = w.shape[0]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    return torch.repeat_interleave(w, n_heads // n_kv, dim=0)


def omega_factors(
    W_Q: Float[Tensor, "... d_model d_head"],
    W_K: Float[Tensor, "... d_model d_head"],
    b_Q: Float[Tensor, "... d_head"] | None,
    b_K: Float[Tensor, "... d_head"] | None,
    side: OmegaSide,
) -> tuple[Float[Tensor, "... d_a d_head"], Float[Tensor, "... d_b d_head"]]:
    """Thin factors ``(A, B)`` with ``Omega_side = A R B^T``; biases ``None`` give the plain Omega."""
    if side not in ("d", "s"):
        raise ValueError(f"side must be 'd' or 's', got {side!r}")
    if b_Q is None or b_K is None:
        return W_Q, W_K
    if side == "d":
        return W_Q, torch.cat([W_K, b_K.unsqueeze(-2)], dim=-2)
    return torch.cat([W_Q, b_Q.unsqueeze(-2)], dim=-2), W_K


def _rotate_half(x: Tensor, rotary_dim: int, adjacent: bool) -> Tensor:
    """The ``rotate_half`` / ``rotate_every_two`` partner of the rotated slice of ``x``."""
    xr = x[..., :rotary_dim]
    if adjacent:
        out = torch.empty_like(xr)
        out[..., ::2] = -xr[..., 1::2]
        out[..., 1::2] = xr[..., ::2]
        return out
    half = rotary_dim // 2
    return torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)


def apply_rotary(
    x: Float[Tensor, "... d_head"],
    cos: Float[Tensor, "... rotary_dim"],
    sin: Float[Tensor, "... rotary_dim"],
    *,
    adjacent: bool = False,
    inverse: bool = False,
) -> Float[Tensor, "... d_head"]:
    """Rotate row vectors ``x`` by the rotary map of ``cos``/``sin`` (``x M``, or ``x M^T`` if ``inverse``).

    ``cos``/``sin`` broadcast against ``x[..., :rotary_dim]``; dims past ``rotary_dim`` pass unchanged.
    """
    rotary_dim = cos.shape[-1]
    sin = -sin if inverse else sin
    rot = x[..., :rotary_dim] * cos + _rotate_half(x, rotary_dim, adjacent) * sin
    if rotary_dim == x.shape[-1]:
        return rot
    return torch.cat([rot, x[..., rotary_dim:].expand(*rot.shape[:-1], -1)], dim=-1)


def default_rotary_tables(
    n_pos: int, rotary_dim: int, base: float, *, adjacent: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, "pos rotary_dim"], Float[Tensor, "pos rotary_dim"]]:
    """Standard rotary cos/sin tables (TransformerLens layout), used when the model gives no tables."""
    freq = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] / freq[None, :]
    if adjacent:
        angles = einops.repeat(angles, "pos f -> pos (f two)", two=2)
    else:
        angles = torch.cat([angles, angles], dim=-1)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def rotary_matrix(
    cos: Float[Tensor, "... rotary_dim"],
    sin: Float[Tensor, "... rotary_dim"],
    d_head: int,
    *,
    adjacent: bool = False,
) -> Float[Tensor, "... d_head d_head"]:
    """The matrix ``M`` with ``x M`` = the rotary map of row vector ``x`` (``R(delta)`` at ``delta``)."""
    eye = torch.eye(d_head, dtype=cos.dtype, device=cos.device)
    batch = cos.shape[:-1]
    eye = eye.expand(*batch, d_head, d_head)
    return apply_rotary(eye, cos[..., None, :], sin[..., None, :], adjacent=adjacent)


@dataclass
class QRFactors:
    """Reduced QR of one (layer, side)'s thin factors, all heads: ``A = Q_a R_a``, ``B = Q_b R_b``."""

    Q_a: Float[Tensor, "head_index d_a d_head"]
    R_a: Float[Tensor, "head_index d_head d_head"]
    Q_b: Float[Tensor, "head_index d_b d_head"]
    R_b: Float[Tensor, "head_index d_head d_head"]


@dataclass
class OmegaSVD:
    """Thin SVD ``Omega = U diag(S) V^T`` in compact form: ``U = Q_a U_c``, ``V = Q_b V_c`` (batched)."""

    U_c: Float[Tensor, "... d_head d_head"]
    S: Float[Tensor, "... d_head"]
    V_c: Float[Tensor, "... d_head d_head"]


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the enclosed CPU factorisations on one thread, then restore the thread count.

    Two reasons. The batched QR's result depends on torch's intra-op thread count (its blocking changes
    with it), so the Omega factors, and every trace, would depend on the machine's core count and
    settings; on one thread they do not. And on a machine whose cores are busy with other work, a
    multi-threaded batched QR or small SVD waits for its threads: measured 30-45x slower with 2 threads
    than with 1 on the shared development VM. The factorisations are done once per layer and side, so
    one thread costs little.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def qr_factors(A: Float[Tensor, "... d_a d_head"], B: Float[Tensor, "... d_b d_head"]) -> QRFactors:
    """Reduced QR of both thin factors (batched), the first step of the thin SVD of ``A R B^T``
    (on one CPU thread: :func:`one_cpu_thread`)."""
    with one_cpu_thread():
        Q_a, R_a = torch.linalg.qr(A, mode="reduced")
        Q_b, R_b = torch.linalg.qr(B, mode="reduced")
    return QRFactors(Q_a=Q_a, R_a=R_a, Q_b=Q_b, R_b=R_b)


def _small_svd(
    R_a: Float[Tensor, "... d_head d_head"],
    R_b: Float[Tensor, "... d_head d_head"],
    rot: Float[Tensor, "... d_head d_head"] | None,
) -> OmegaSVD:
    """SVD of the ``d_head x d_head`` core ``R_a R R_b^T``."""
    core = R_a if rot is None else R_a @ rot
    core = core @ R_b.transpose(-1, -2)
    with one_cpu_thread():
        U_c, S, Vh = torch.linalg.svd(core, full_matrices=False)
    return OmegaSVD(U_c=U_c, S=S, V_c=Vh.transpose(-1, -2))


def thin_svd(
    A: Float[Tensor, "... d_a d_head"],
    B: Float[Tensor, "... d_b d_head"],
    rot: Float[Tensor, "... d_head d_head"] | None = None,
) -> tuple[Float[Tensor, "... d_a d_head"], Float[Tensor, "... d_head"], Float[Tensor, "... d_b d_head"]]:
    """Top-``d_head`` SVD ``(U, S, V)`` of ``A rot B^T`` via QR of each factor and a ``d_head``-sized SVD."""
    qr = qr_factors(A, B)
    small = _small_svd(qr.R_a, qr.R_b, rot)
    return qr.Q_a @ small.U_c, small.S, qr.Q_b @ small.V_c


def dense_omega(
    A: Float[Tensor, "... d_a d_head"],
    B: Float[Tensor, "... d_b d_head"],
    rot: Float[Tensor, "... d_head d_head"] | None = None,
) -> Float[Tensor, "... d_a d_b"]:
    """The dense ``A rot B^T`` (for tests and small models only)."""
    core = A if rot is None else A @ rot
    return core @ B.transpose(-1, -2)


RotaryTables = Callable[[int], tuple[Tensor, Tensor]]


@dataclass
class OmegaCache:
    """In-memory Omega SVDs keyed by ``(layer, head, delta, side)``, computed on demand.

    Built from the model's (GQA-expanded) weights ``W_Q, W_K [layer head_index d_model d_head]`` and
    biases (``None`` for bias-free models). For rotary models ``rotary_tables(n_pos)`` returns the model's
    ``(cos, sin)`` tables ``[n_pos rotary_dim]``; any offset is computed when first asked for (the table
    is regrown past its length), never limited to a fixed range. Non-rotary models have one SVD per
    (layer, head, side) and ignore ``delta``.
    """

    W_Q: Float[Tensor, "layer head_index d_model d_head"]
    W_K: Float[Tensor, "layer head_index d_model d_head"]
    b_Q: Float[Tensor, "layer head_index d_head"] | None
    b_K: Float[Tensor, "layer head_index d_head"] | None
    rotary: bool = False
    rotary_tables: RotaryTables | None = None
    rotary_dim: int = 0
    rotary_base: float = 10000.0
    adjacent_pairs: bool = False
    dtype: torch.dtype = torch.float32
    _qr: dict[tuple[int, str], QRFactors] = field(default_factory=dict, repr=False)
    _svd: dict[tuple[int, str, int], OmegaSVD] = field(default_factory=dict, repr=False)
    _cos: Tensor | None = field(default=None, repr=False)
    _sin: Tensor | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[-1]

    @property
    def augmented(self) -> bool:
        return self.b_Q is not None and self.b_K is not None

    def factors(self, layer: int, side: OmegaSide) -> tuple[Tensor, Tensor]:
        """The thin factors ``(A, B)`` of layer ``layer`` (all heads) in the cache's dtype."""
        b_Q = None if self.b_Q is None else self.b_Q[layer].to(self.dtype)
        b_K = None if self.b_K is None else self.b_K[layer].to(self.dtype)
        return omega_factors(self.W_Q[layer].to(self.dtype), self.W_K[layer].to(self.dtype), b_Q, b_K, side)

    def qr(self, layer: int, side: OmegaSide) -> QRFactors:
        """QR factors of layer ``layer``, side ``side`` for all heads (computed once)."""
        key = (layer, self.side_key(side))
        if key not in self._qr:
            A, B = self.factors(layer, side)
            self._qr[key] = qr_factors(A, B)
        return self._qr[key]

    def tables(self, n_pos: int) -> tuple[Tensor, Tensor]:
        """Rotary ``(cos, sin)`` tables covering positions ``0..n_pos-1`` (grown on demand)."""
        if self._cos is None or self._cos.shape[0] < n_pos:
            grow = max(n_pos, 2 * (0 if self._cos is None else self._cos.shape[0]), 32)
            if self.rotary_tables is not None:
                cos, sin = self.rotary_tables(grow)
            else:
                cos, sin = default_rotary_tables(
                    grow, self.rotary_dim, self.rotary_base, adjacent=self.adjacent_pairs, dtype=self.dtype
                )
            self._cos, self._sin = cos.to(self.dtype), sin.to(self.dtype)
        assert self._sin is not None
        return self._cos[:n_pos], self._sin[:n_pos]

    def rotation(self, delta: int) -> Float[Tensor, "d_head d_head"] | None:
        """``R(delta)`` from the model's tables (``None`` for non-rotary models)."""
        if not self.rotary:
            return None
        if delta < 0:
            raise ValueError(f"rotary offset must be >= 0 (dest >= source), got {delta}")
        cos, sin = self.tables(delta + 1)
        return rotary_matrix(cos[delta], sin[delta], self.d_head, adjacent=self.adjacent_pairs)

    def layer_svd(self, layer: int, side: OmegaSide, delta: int = 0) -> OmegaSVD:
        """Compact SVD of every head of ``layer`` at offset ``delta`` (batched over heads)."""
        key = (layer, self.side_key(side), delta if self.rotary else 0)
        if key not in self._svd:
            qr = self.qr(layer, side)
            self._svd[key] = _small_svd(qr.R_a, qr.R_b, self.rotation(key[2]))
        return self._svd[key]

    def get(self, layer: int, head: int, delta: int, side: OmegaSide) -> tuple[Tensor, Tensor, Tensor]:
        """Full ``(U [d_a d_head], S [d_head], V [d_b d_head])`` of head ``(layer, head)`` at ``delta``."""
        qr = self.qr(layer, side)
        svd = self.layer_svd(layer, side, delta)
        return qr.Q_a[head] @ svd.U_c[head], svd.S[head], qr.Q_b[head] @ svd.V_c[head]

    def compact(self, layer: int, heads: Tensor, deltas: Tensor, side: OmegaSide) -> OmegaSVD:
        """Compact SVDs stacked per firing (one (head, delta) pair per entry) for batched decomposition.

        The result is on ``heads``' device (the cache itself may live on the CPU).
        """
        device = heads.device
        if not self.rotary:
            svd = self.layer_svd(layer, side, 0)
            h = heads.to(svd.U_c.device)
            return OmegaSVD(U_c=svd.U_c[h].to(device), S=svd.S[h].to(device), V_c=svd.V_c[h].to(device))
        U, S, V = [], [], []
        uniq = torch.unique(deltas).cpu()
        for delta in uniq.tolist():
            svd = self.layer_svd(layer, side, int(delta))
            U.append(svd.U_c)
            S.append(svd.S)
            V.append(svd.V_c)
        U_all, S_all, V_all = torch.stack(U), torch.stack(S), torch.stack(V)
        slot = torch.searchsorted(uniq.to(U_all.device), deltas.to(U_all.device))
        h = heads.to(U_all.device)
        return OmegaSVD(
            U_c=U_all[slot, h].to(device), S=S_all[slot, h].to(device), V_c=V_all[slot, h].to(device)
        )

    def precompute(self, deltas: list[int] | None = None) -> None:
        """Compute the SVD of every head, both sides (and the given offsets for rotary models)."""
        sides = ("d", "s") if self.augmented else ("d",)
        for layer in range(self.n_layers):
            for side in sides:
                for delta in deltas if (self.rotary and deltas) else [0]:
                    self.layer_svd(layer, side, delta)

    def side_key(self, side: OmegaSide) -> OmegaSide:
        """The side actually stored: bias-free models share one Omega for both sides."""
        return side if self.augmented else "d"
