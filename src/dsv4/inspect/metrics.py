"""Pure metric functions for model dissection: tensors in, numbers (or small tensors) out.

Every function states its formula and a reference. Nothing here touches a model, so each one is unit-tested on
synthetic inputs with known answers (tests/test_inspect.py). Conventions: token-major matrices X [n_tokens, dim];
Gram matrices K = X·Xᵀ [n, n]; computations that subtract large numbers run in float64.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


class MetricInputError(ValueError):
    """A metric got an input of the wrong shape or size (the message names the argument)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise MetricInputError(msg)


# ============================================================================================ similarity (CKA)
def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix K = X·Xᵀ in float64. x [n, d] -> [n, n]."""
    _need(x.dim() == 2, f"gram: x must be [n, d], got shape {tuple(x.shape)}")
    x = x.double()
    return x @ x.t()


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """H·K·H with H = I − 11ᵀ/n: the Gram matrix of the column-centred features (K [n, n] -> [n, n])."""
    k = k.double()
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def hsic(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> float:
    """Hilbert-Schmidt independence criterion of two Gram matrices over the same n samples.

    biased (Gretton et al., 2005):      HSIC_b = tr(K̄ L̄) / (n−1)²,  K̄ = HKH, L̄ = HLH.
    debiased (Song et al., 2012, eq. 5): with K̃, L̃ = K, L with zeroed diagonals,
        HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)),
    an unbiased estimator, so CKA built from it does not drift upwards when dim ≫ n (Nguyen et al., 2021)."""
    _need(k.shape == l.shape and k.dim() == 2 and k.shape[0] == k.shape[1],
          f"hsic: Gram matrices must be square and equal-sized, got {tuple(k.shape)} and {tuple(l.shape)}")
    n = k.shape[0]
    if not debiased:
        _need(n >= 2, f"hsic: need at least 2 samples, got {n}")
        return float((center_gram(k) * center_gram(l)).sum()) / (n - 1) ** 2
    _need(n >= 4, f"hsic(debiased=True): need at least 4 samples, got {n}")
    kt = k.double().clone().fill_diagonal_(0)
    lt = l.double().clone().fill_diagonal_(0)
    term1 = (kt * lt).sum()
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (kt.sum(0) * lt.sum(0)).sum()
    return float((term1 + term2 - term3) / (n * (n - 3)))


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA from Gram matrices (Kornblith et al., 2019): HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L)).
    1 when one representation is an orthogonal transform times a scale of the other; NaN when either is constant."""
    kl, kk, ll = hsic(k, l, debiased), hsic(k, k, debiased), hsic(l, l, debiased)
    if kk <= 0 or ll <= 0:
        return float("nan")
    return kl / math.sqrt(kk * ll)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same n tokens, x [n, d1], y [n, d2]
    (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited"):
        CKA = ‖Ȳᵀ X̄‖²_F / (‖X̄ᵀ X̄‖_F ‖Ȳᵀ Ȳ‖_F), X̄, Ȳ column-centred; computed through n×n Gram matrices."""
    _need(x.dim() == 2 and y.dim() == 2 and x.shape[0] == y.shape[0],
          f"linear_cka: x and y must be [n, d] with equal n, got {tuple(x.shape)} and {tuple(y.shape)}")
    return cka_from_grams(gram(x), gram(y), debiased)


def cka_matrix(grams: Sequence[torch.Tensor], debiased: bool = False) -> torch.Tensor:
    """Pairwise CKA of a list of Gram matrices (layers, or hc copies) -> symmetric [m, m] with ones on the diagonal
    (NaN rows for constant representations). Each Gram is reduced once (centred and normalised; or, debiased,
    its zero-diagonal sums), so the m² pairs cost one inner product each; same values as `cka_from_grams`."""
    m = len(grams)
    out = torch.full((m, m), float("nan"), dtype=torch.float64)
    if not debiased:
        unit = []
        for k in grams:
            kc = center_gram(k)
            nrm = kc.norm()
            unit.append(kc / nrm if nrm > 0 else None)
        for a in range(m):
            for b in range(a, m):
                if unit[a] is not None and unit[b] is not None:
                    out[a, b] = out[b, a] = float((unit[a] * unit[b]).sum())
        return out
    n = grams[0].shape[0]
    _need(n >= 4, f"cka_matrix(debiased=True): need at least 4 samples, got {n}")
    red = []
    for k in grams:
        kt = k.double().clone().fill_diagonal_(0)
        red.append((kt, kt.sum(), kt.sum(0)))

    def h(a, b):
        (ka, sa, ca), (kb, sb, cb) = red[a], red[b]
        return float(((ka * kb).sum() + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ca * cb).sum()) / (n * (n - 3)))

    self_h = [h(a, a) for a in range(m)]
    for a in range(m):
        for b in range(a, m):
            if self_h[a] > 0 and self_h[b] > 0:
                out[a, b] = out[b, a] = h(a, b) / math.sqrt(self_h[a] * self_h[b])
    return out


# ============================================================================================ rank / spectrum
def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of x [n, d], descending (float64)."""
    _need(x.dim() == 2, f"singular_values: x must be [n, d], got shape {tuple(x.shape)}")
    return torch.linalg.svdvals(x.double())


def singular_values_from_gram(k: torch.Tensor) -> torch.Tensor:
    """Singular values of X from its Gram matrix K = X·Xᵀ: σ_i = sqrt(λ_i(K)), descending. Lets one Gram per layer
    serve CKA and rank alike, without keeping X."""
    ev = torch.linalg.eigvalsh(k.double()).clamp_min(0)
    return ev.flip(0).sqrt()


def effective_rank(x_or_sv: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, 2007): exp(H(p)) with p_i = σ_i / Σ_j σ_j and H the Shannon entropy (nats).
    Pass a matrix [n, d] or a vector of singular values. 1 for a rank-1 matrix, r for r equal singular values."""
    sv = singular_values(x_or_sv) if x_or_sv.dim() == 2 else x_or_sv.double()
    sv = sv[sv > sv.max() * 1e-12] if sv.numel() and sv.max() > 0 else sv[:0]
    if sv.numel() == 0:
        return 0.0
    p = sv / sv.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(x_or_sv: torch.Tensor) -> float:
    """Participation ratio of the variance spectrum λ_i = σ_i²: (Σλ)² / Σλ² (Gao et al., 2017). Same anchors as the
    effective rank (rank-1 -> 1, r equal values -> r) but weights large directions more heavily."""
    sv = singular_values(x_or_sv) if x_or_sv.dim() == 2 else x_or_sv.double()
    lam = sv.square()
    den = lam.square().sum()
    return float(lam.sum() ** 2 / den) if den > 0 else 0.0


# ============================================================================================ sinks
def sink_ratio(norms: torch.Tensor, sink: int = 0) -> float:
    """Magnitude ratio of the sink token to the others: ‖h_sink‖ / mean_{t≠sink} ‖h_t‖ (the "massive activation"
    measure of Sun et al., 2024, on token norms). norms [n] -> float; NaN with a single token."""
    _need(norms.dim() == 1, f"sink_ratio: norms must be [n], got shape {tuple(norms.shape)}")
    n = norms.shape[0]
    if n < 2:
        return float("nan")
    others = torch.cat([norms[:sink], norms[sink + 1:]]).double()
    return float(norms[sink].double() / others.mean())


def dominant_dims(v: torch.Tensor, k: int = 8) -> tuple[list[int], list[float]]:
    """The k coordinates carrying most of a vector's energy: indices of the largest |v_d| and their shares
    v_d² / ‖v‖² (descending). A "sink register" shows as one or a few dims holding most of the BOS norm."""
    _need(v.dim() == 1, f"dominant_dims: v must be [d], got shape {tuple(v.shape)}")
    share = energy_share(v)
    top = share.topk(min(k, v.numel()))
    return [int(i) for i in top.indices], [float(s) for s in top.values]


def energy_share(v: torch.Tensor) -> torch.Tensor:
    """v_d² / ‖v‖² per coordinate (sums to 1; zeros for a zero vector). v [d] -> [d] float64."""
    e = v.double().square()
    tot = e.sum()
    return e / tot if tot > 0 else e


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """Robust z-score (Iglewicz & Hoaglin, 1993): (x − median) / (1.4826 · MAD), MAD = median |x − median|; the
    1.4826 makes it match the standard z for Gaussian data while a few outliers cannot inflate the scale.
    When MAD = 0 the mean absolute deviation (×1.2533) is used; all-equal input gives zeros."""
    x = x.double()
    med = x.median()
    dev = (x - med).abs()
    scale = 1.4826 * dev.median()
    if scale <= 0:
        scale = 1.2533 * dev.mean()
    if scale <= 0:
        return torch.zeros_like(x)
    return (x - med) / scale


def secondary_sinks(norms: torch.Tensor, threshold: float = 6.0, exclude: Iterable[int] = (0,)) -> list[tuple[int, float]]:
    """Tokens other than the primary sink whose magnitude is an outlier: robust_z(‖h_t‖) > threshold, z computed
    over the non-excluded tokens. -> [(position, z)] sorted by position. Needs at least 4 candidate tokens."""
    _need(norms.dim() == 1, f"secondary_sinks: norms must be [n], got shape {tuple(norms.shape)}")
    ex = {int(e) % max(1, norms.shape[0]) for e in exclude}
    keep = torch.tensor([i for i in range(norms.shape[0]) if i not in ex], dtype=torch.long)
    if keep.numel() < 4:
        return []
    z = robust_z(norms[keep])
    hit = z > threshold
    return [(int(p), float(s)) for p, s in zip(keep[hit].tolist(), z[hit].tolist())]


# ============================================================================================ experts / routing
def expert_load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Load statistics of one MoE layer from tokens-per-expert counts [E]:
        dead           = #{i : c_i = 0}
        cv             = std(c) / mean(c)            (population std; 0 for perfect balance)
        entropy        = −Σ p_i ln p_i / ln E,  p = c / Σc   (1 for perfect balance, 0 for one expert)
        max_violation  = max_i c_i / mean(c) − 1     (MaxVio of Wang et al., 2024, "Auxiliary-Loss-Free Load
                                                      Balancing Strategy for Mixture-of-Experts")"""
    _need(counts.dim() == 1 and counts.numel() > 0, f"expert_load_stats: counts must be [E], got {tuple(counts.shape)}")
    c = counts.double()
    e = c.numel()
    total, mean = float(c.sum()), float(c.mean())
    if total == 0:
        return {"dead": e, "cv": float("nan"), "entropy": float("nan"), "max_violation": float("nan"), "tokens": 0.0}
    p = c / total
    nz = p[p > 0]
    ent = float(-(nz * nz.log()).sum() / math.log(e)) if e > 1 else 1.0
    return {"dead": int((c == 0).sum()), "cv": float(c.std(unbiased=False) / mean), "entropy": ent,
            "max_violation": float(c.max() / mean - 1), "tokens": total}


def topk_concentration(counts: torch.Tensor, k: int = 10) -> float:
    """Share of all routing slots taken by the k most used experts: Σ top-k c_i / Σ c_i (NaN with no tokens)."""
    c = counts.double()
    tot = c.sum()
    return float(c.topk(min(k, c.numel())).values.sum() / tot) if tot > 0 else float("nan")


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A ∩ B| / |A ∪ B| of two sets (Jaccard, 1901); 1 for two empty sets."""
    a, b = set(a), set(b)
    u = a | b
    return len(a & b) / len(u) if u else 1.0


def rowwise_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Jaccard of the id sets in two matrices a [n, k1], b [n, k2] (top-k expert picks; −1 entries are
    ignored, repeated ids count once). -> [n] float64; 1 where both rows are empty."""
    _need(a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[0], f"rowwise_jaccard: need [n, k] inputs with "
          f"equal n, got {tuple(a.shape)} and {tuple(b.shape)}")

    def distinct(x):                                   # valid and not a repeat of an earlier entry in its row
        earlier = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril(-1)
        repeat = ((x[:, :, None] == x[:, None, :]) & earlier).any(-1)
        return (x >= 0) & ~repeat

    va, vb = distinct(a), distinct(b)
    inter = (((a[:, :, None] == b[:, None, :]) & vb[:, None, :]).any(-1) & va).sum(1).double()
    union = va.sum(1).double() + vb.sum(1).double() - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def routing_agreement(sets: Sequence[Iterable]) -> dict[str, float]:
    """How deterministic a routing decision is across prompts: mean pairwise Jaccard of the chosen expert sets
    and the fraction of pairs that are identical (both 1 when every prompt picks the same experts)."""
    sets = [frozenset(s) for s in sets]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    if not pairs:
        return {"mean_jaccard": float("nan"), "identical_fraction": float("nan"), "n": len(sets)}
    return {"mean_jaccard": sum(jaccard(a, b) for a, b in pairs) / len(pairs),
            "identical_fraction": sum(a == b for a, b in pairs) / len(pairs), "n": len(sets)}


# ============================================================================================ mHC maps
def distance_from_identity(c: torch.Tensor) -> torch.Tensor | float:
    """‖C − I‖_F of a square mixing matrix (batched over leading dims). 0 when the streams are passed through
    unmixed, √(n−1) for uniform averaging J/n, √(2n) for a permutation with no fixed stream."""
    _need(c.dim() >= 2 and c.shape[-1] == c.shape[-2], f"distance_from_identity: need [..., n, n], got {tuple(c.shape)}")
    eye = torch.eye(c.shape[-1], dtype=torch.float64, device=c.device)
    d = (c.double() - eye).square().sum((-2, -1)).sqrt()
    return float(d) if d.dim() == 0 else d


def doubly_stochastic_error(c: torch.Tensor) -> torch.Tensor | float:
    """max(max_i |Σ_j C_ij − 1|, max_j |Σ_i C_ij − 1|): how far a Sinkhorn output is from the Birkhoff polytope's
    equality constraints (Sinkhorn & Knopp, 1967). Batched over leading dims; 0 for a permutation matrix."""
    _need(c.dim() >= 2 and c.shape[-1] == c.shape[-2], f"doubly_stochastic_error: need [..., n, n], got {tuple(c.shape)}")
    c = c.double()
    err = torch.maximum((c.sum(-1) - 1).abs().amax(-1), (c.sum(-2) - 1).abs().amax(-1))
    return float(err) if err.dim() == 0 else err


def mixing_spectrum(c: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spectrum of mixing matrices C [..., n, n]: singular values (descending) and eigenvalue moduli (descending).
    For a doubly-stochastic C the top of both is 1; the second eigenvalue modulus |λ₂| says how fast repeated
    mixing makes the streams equal (1 − |λ₂| is the spectral gap: 0 for the identity, 1 for uniform averaging)."""
    c = c.double()
    sv = torch.linalg.svdvals(c)
    ev = torch.linalg.eigvals(c).abs().sort(-1, descending=True).values
    return {"singular_values": sv, "eigen_moduli": ev}


# ============================================================================================ attention / indexer
def attention_mass(window: torch.Tensor, compressed: torch.Tensor, sink: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean attention probability mass per head on the three slot kinds of a V4 softmax
    (sliding-window keys, compressed entries, the learned sink logit): inputs [..., heads] per query and head,
    -> means over all leading dims, [heads] each. The three sum to 1 per query and head."""
    return {k: v.reshape(-1, v.shape[-1]).double().mean(0) for k, v in
            (("window", window), ("compressed", compressed), ("sink", sink))}


def indexer_reach(selected: torch.Tensor, positions: torch.Tensor, ratio: int, window: int) -> dict[str, float]:
    """How far back the indexer's top-k picks reach. selected [L, k] entry ids (−1 = none), positions [L] query
    positions, entry j pools tokens [j·m, (j+1)·m). distance = t − j·m (tokens from the entry's first token to the
    query). -> mean / median / max distance, the fraction of picks lying wholly outside the sliding window
    (t − (j+1)·m + 1 ≥ W: information the window alone could not give) and the fraction of queries that pick
    entry 0 (the block holding BOS)."""
    _need(selected.dim() == 2 and positions.shape == selected.shape[:1],
          f"indexer_reach: selected [L, k] and positions [L] needed, got {tuple(selected.shape)}, {tuple(positions.shape)}")
    valid = selected >= 0
    if not bool(valid.any()):
        nan = float("nan")
        return {"mean": nan, "median": nan, "max": nan, "beyond_window": nan, "bos_block_rate": nan, "picks": 0}
    t = positions[:, None].double()
    dist = (t - selected.double() * ratio)[valid]
    beyond = ((t - (selected.double() + 1) * ratio + 1) >= window)[valid]
    has_any = valid.any(1)
    bos = ((selected == 0) & valid).any(1)[has_any]
    return {"mean": float(dist.mean()), "median": float(dist.median()), "max": float(dist.max()),
            "beyond_window": float(beyond.double().mean()), "bos_block_rate": float(bos.double().mean()),
            "picks": int(valid.sum())}


def adjacent_overlap(selected: torch.Tensor, chunk: int = 1024) -> float:
    """Mean Jaccard between the pick sets of consecutive queries (t, t+1), over pairs where both picked something.
    selected [L, k] entry ids (−1 = none). Built from boolean membership rows, `chunk` queries at a time so memory
    stays O(chunk · n_entries)."""
    _need(selected.dim() == 2, f"adjacent_overlap: selected must be [L, k], got {tuple(selected.shape)}")
    L = selected.shape[0]
    if L < 2 or selected.numel() == 0 or int(selected.max()) < 0:
        return float("nan")
    n = int(selected.max()) + 1
    tot, cnt = 0.0, 0
    for c0 in range(0, L - 1, chunk):
        rows = selected[c0:min(L, c0 + chunk + 1)]
        m = torch.zeros(rows.shape[0], n + 1, dtype=torch.bool, device=rows.device)
        m.scatter_(1, rows + 1, True)
        m = m[:, 1:]                                                     # drop the "none" column
        a, b = m[:-1], m[1:]
        inter, union = (a & b).sum(1), (a | b).sum(1)
        ok = a.any(1) & b.any(1)
        tot += float((inter[ok].double() / union[ok].double()).sum())
        cnt += int(ok.sum())
    return tot / cnt if cnt else float("nan")


# ============================================================================================ logit lens
def lens_stats(logits: torch.Tensor, next_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Logit lens (nostalgebraist, 2020) read-out of one layer: logits [n, V] from that layer's streams through the
    final hyper-head, norm and unembedding. -> top-1 ids [n] and, given the tokens that follow, next_ids [n'] with
    n' ≤ n, the next-token negative log-likelihood −log softmax(logits_t)[next_ids_t] for t < n' ([n'])."""
    out = {"top1": logits.argmax(-1)}
    if next_ids is not None:
        _need(next_ids.dim() == 1 and next_ids.shape[0] <= logits.shape[0],
              f"lens_stats: next_ids must be [n'] with n' <= {logits.shape[0]}, got {tuple(next_ids.shape)}")
        n = next_ids.shape[0]
        lp = logits[:n].float().log_softmax(-1)
        out["nll"] = -lp.gather(-1, next_ids[:, None].to(lp.device).long()).squeeze(-1)
    return out


# ============================================================================================ helpers
def subsample_positions(n: int, m: int, keep_first: bool = True) -> torch.Tensor:
    """At most m evenly spaced positions out of n (position 0 and n−1 always included when m ≥ 2), ascending."""
    _need(m >= 1, f"subsample_positions: m must be ≥ 1, got {m}")
    if n <= m:
        return torch.arange(n)
    idx = torch.linspace(0, n - 1, m).round().long().unique()
    if keep_first and idx[0] != 0:
        idx = torch.cat([torch.zeros(1, dtype=torch.long), idx])
    return idx


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: map them to None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
