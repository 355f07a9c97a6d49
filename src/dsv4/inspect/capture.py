"""Hooks that turn forward passes into per-layer statistics without keeping the activations.

    from dsv4.inspect import capture
    with capture(model, what=["blocks", "gates"]) as cap:
        for ids in prompts:
            cap.run(ids, label="factual", mode="chat")
    cap.records                       # one dict per run: floats, short lists and small CPU tensors

What each target records, per layer of every run:
  blocks      token magnitudes ‖h_t‖ over the flattened [hc, D] streams, the BOS sink ratio and dominant dims,
              CKA between the hc copies, effective rank / participation ratio with and without BOS, secondary
              sinks; plus the layer×layer CKA matrix of the run (from one n×n Gram matrix per layer)
  gates       the experts each token was routed to                                  -> experts [L, s, k]
  attention   attention mass on window / compressed / sink slots per head (the attention `recorder` hook)
  indexer     how far back the CSA indexer's top-k reaches, how much adjacent queries' picks overlap, and how
              much of a dense pass's attention on compressed entries its picks hold (pick recall)
  mhc         pre / post / comb maps of both sublayers: distance of comb from identity, Sinkhorn error, spectra
  logit_lens  each layer's streams read out through the final hyper-head, norm and head: top-1 agreement with
              the final prediction, next-token loss

Memory: a hook reduces a block's output [s, hc, D] at once; what survives a layer is O(s + D) numbers plus one
normalised Gram matrix over at most `gram_tokens` positions (for the cross-layer CKA), so depth costs
O(L · gram_tokens²), never O(L · s · hc · D).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

from ..model import Transformer
from ..model.mhc import hc_maps
from . import metrics as M

ALL = ("blocks", "gates", "attention", "indexer", "mhc", "logit_lens")


class CaptureError(ValueError):
    """Bad capture request (unknown target, batch > 1, empty prompt)."""


def _targets(what: str | Iterable[str]) -> set[str]:
    what = {what} if isinstance(what, str) else set(what)
    if "all" in what:
        return set(ALL)
    unknown = what - set(ALL)
    if unknown:
        raise CaptureError(f"unknown capture target(s) {sorted(unknown)}; choose from {list(ALL)} or 'all'")
    return what


class Capture:
    """Attach with `with Capture(model, ...) as cap:` (or `capture(...)`), then `cap.run(ids)` per prompt.

    top_dims: dominant BOS dims kept per layer. gram_tokens: at most this many evenly spaced positions (BOS always
    among them) enter the Gram-based metrics (CKA, effective rank). sink_z: robust z-score above which a non-BOS
    token counts as a secondary sink. lens_chunk: tokens per logit-lens matmul. progress: a tqdm bar per run,
    one tick per layer."""

    def __init__(self, model: Transformer, what: str | Iterable[str] = ALL, *, top_dims: int = 8,
                 gram_tokens: int = 1024, sink_z: float = 6.0, lens_chunk: int = 128, progress: bool = False):
        self.model, self.what = model, _targets(what)
        self.top_dims, self.gram_tokens, self.sink_z, self.lens_chunk = top_dims, gram_tokens, sink_z, lens_chunk
        self.progress = progress
        self.records: list[dict] = []
        self._handles: list = []
        self._wrapped: list = []
        self._cur: dict | None = None
        self._bar = None

    # ------------------------------------------------------------------------------------------ attach / detach
    def __enter__(self) -> "Capture":
        for i, blk in enumerate(self.model.layers):
            if self.what & {"blocks", "logit_lens"} or self.progress:
                self._handles.append(blk.register_forward_hook(self._block_hook(i)))
            if "gates" in self.what:
                self._handles.append(blk.ffn.gate.register_forward_hook(self._gate_hook(i)))
            if self.what & {"attention", "indexer"}:
                blk.attn.recorder = self._recorder(i)
            if "mhc" in self.what and blk.residual != "plain":
                blk._sublayer = self._mhc_wrapper(i, blk, blk._sublayer)     # instance attribute shadows the method
                self._wrapped.append(blk)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for blk in self.model.layers:
            blk.attn.recorder = None
        for blk in self._wrapped:
            del blk._sublayer
        self._wrapped.clear()

    def _layer(self, i: int) -> dict:
        return self._cur["layers"][i]

    # ------------------------------------------------------------------------------------------ block outputs
    def _block_hook(self, i: int):
        def hook(module, args, out):
            if self._cur is None:
                return
            if "blocks" in self.what:
                self._block_stats(i, out[0].detach())
            if "logit_lens" in self.what:
                self._lens(i, out.detach())
            if self._bar is not None:
                self._bar.update(1)
        return hook

    def _block_stats(self, i: int, h: torch.Tensor) -> None:
        """h [s, n, D] -> magnitudes, sink, hc-copy CKA, rank; stores this layer's normalised Grams."""
        L, cur = self._layer(i), self._cur
        s, n, _ = h.shape
        hf = h.float()
        norms = hf.flatten(1).norm(dim=-1)                                       # [s] magnitude of the full state
        cur["norms"][i] = norms.cpu()
        L["bos_norm"] = float(norms[0])
        L["bos_copy_norms"] = hf[0].norm(dim=-1).tolist()                          # [n]
        L["last_norm"] = float(norms[-1])
        L["nonbos_norm"] = float(norms[1:].mean()) if s > 1 else float("nan")
        L["nonbos_median"] = float(norms[1:].median()) if s > 1 else float("nan")
        L["sink_ratio"] = M.sink_ratio(norms, 0)
        share = M.energy_share(hf[0].mean(0))                                     # [D] BOS energy per dim
        cur["bos_energy"][i] = share.float().cpu()
        L["bos_dims"], L["bos_dims_share"] = M.dominant_dims(hf[0].mean(0), self.top_dims)
        ids = cur["ids"]
        L["secondary_sinks"] = [(p, z, int(ids[p])) for p, z in M.secondary_sinks(norms.cpu(), self.sink_z)]

        sel = M.subsample_positions(s, self.gram_tokens).to(h.device)
        x = h[sel].double().transpose(0, 1)                                        # [n, m, D]
        grams = x @ x.transpose(1, 2)                                              # [n, m, m] one per copy (on device)
        full = grams.sum(0)                                                        # Gram of the concatenated copies
        if x.shape[0] * x.shape[2] < full.shape[0]:                               # few features: SVD is cheaper
            flat = x.transpose(0, 1).flatten(1)                                    # [m, n·D]
            sv, sv_nb = M.singular_values(flat), M.singular_values(flat[1:])
        else:
            sv, sv_nb = M.singular_values_from_gram(full), M.singular_values_from_gram(full[1:, 1:])
        sv, sv_nb = sv.cpu(), sv_nb.cpu()
        L["erank"], L["pr"] = M.effective_rank(sv), M.participation_ratio(sv)
        L["erank_nobos"], L["pr_nobos"] = M.effective_rank(sv_nb), M.participation_ratio(sv_nb)
        m = full.shape[0]
        for tag, sub in (("", slice(None)), ("_nobos", slice(1, None))):
            ok = m - (1 if tag else 0) >= 2
            cka = M.cka_matrix([g[sub, sub] for g in grams]) if ok and n > 1 else torch.full((n, n), float("nan"))
            off = cka[~torch.eye(n, dtype=torch.bool)]
            L["hc_cka" + tag] = cka.tolist()
            L["hc_cka" + tag + "_mean"] = float(off.mean()) if off.numel() else float("nan")
            L["hc_cka" + tag + "_min"] = float(off.min()) if off.numel() else float("nan")
            cur["grams" + tag][i] = self._unit_centered(full[sub, sub]) if ok else None
        if n > 1 and m - 1 >= 4:
            deb = M.cka_matrix([g[1:, 1:] for g in grams], debiased=True)
            L["hc_cka_nobos_debiased_mean"] = float(deb[~torch.eye(n, dtype=torch.bool)].mean())

    @staticmethod
    def _unit_centered(k: torch.Tensor) -> torch.Tensor | None:
        kc = M.center_gram(k)
        nrm = kc.norm()
        return (kc / nrm).float().flatten().cpu() if nrm > 0 else None

    def _lens(self, i: int, out: torch.Tensor) -> None:
        """Logit lens: this layer's streams through the final hc_head, norm and head, `lens_chunk` tokens at a time."""
        m, ids = self.model, self._cur["ids_dev"]
        s = out.shape[1]
        top1, nll = [], []
        for c0 in range(0, s, self.lens_chunk):
            c1 = min(s, c0 + self.lens_chunk)
            lg = m._logits(out[:, c0:c1], m, m.norm)[0]                           # [c, V] fp32
            st = M.lens_stats(lg, ids[c0 + 1:c1 + 1])
            top1.append(st["top1"].cpu())
            nll.append(st["nll"].double().cpu())
        L = self._layer(i)
        L["_lens_top1"] = torch.cat(top1)
        nll = torch.cat(nll)
        L["lens_nll"] = float(nll.mean()) if nll.numel() else float("nan")

    # ------------------------------------------------------------------------------------------ mHC maps
    def _mhc_wrapper(self, i: int, blk, orig):
        def wrapped(h, sub, fn):
            if self._cur is not None:
                self._mhc_stats(i, blk, h.detach(), sub)
            return orig(h, sub, fn)
        return wrapped

    def _mhc_stats(self, i: int, blk, h: torch.Tensor, sub: str) -> None:
        with torch.no_grad():
            pre, post, comb = hc_maps(h, getattr(blk, f"hc_{sub}_fn"), getattr(blk, f"hc_{sub}_base"),
                                      getattr(blk, f"hc_{sub}_scale"), blk.iters, blk.hc_eps, blk.norm_eps,
                                      "mhc" if blk.residual == "mhc" else "hc")
        pre, post, comb = pre[0].double().cpu(), post[0].double().cpu(), comb[0].double().cpu()   # [s,n] [s,n] [s,n,n]
        dist = M.distance_from_identity(comb)                                       # [s]
        spec = M.mixing_spectrum(comb)
        self._layer(i).setdefault("mhc", {})[sub] = {
            "comb_identity_distance": float(dist.mean()),
            "comb_ds_error": float(M.doubly_stochastic_error(comb).max()),
            "comb_singular_values": spec["singular_values"].mean(0).tolist(),
            "comb_lambda2": float(spec["eigen_moduli"][:, 1].mean()) if comb.shape[-1] > 1 else float("nan"),
            "comb_mean": comb.mean(0).tolist(),
            "pre_mean": pre.mean(0).tolist(), "pre_std": pre.std(0, unbiased=False).tolist(),
            "post_mean": post.mean(0).tolist(), "post_std": post.std(0, unbiased=False).tolist(),
            "bos": {"pre": pre[0].tolist(), "post": post[0].tolist(), "comb_identity_distance": float(dist[0])},
        }

    # ------------------------------------------------------------------------------------------ gates
    def _gate_hook(self, i: int):
        def hook(module, args, out):
            if self._cur is None:
                return
            _, idx = out                                                           # [T, k]
            self._cur["experts"][i] = idx.detach().to(torch.int16 if module.weight.shape[0] < 32768 else torch.int32).cpu()
        return hook

    # ------------------------------------------------------------------------------------------ attention
    def _recorder(self, i: int):
        window = self.model.layers[i].attn.window

        def rec(event, **t):
            if self._cur is None:
                return
            L = self._layer(i)
            if event == "attention" and "attention" in self.what:
                acc = L.setdefault("_attn", {"window": 0.0, "compressed": 0.0, "sink": 0.0, "queries": 0})
                for k in ("window", "compressed", "sink"):
                    acc[k] = acc[k] + t[k][0].double().sum(0).cpu()                 # [h] summed over queries
                acc["queries"] += t["sink"].shape[1]
            elif event == "indexer" and "indexer" in self.what:
                sel, pos = t["selected"][0], t["positions"]
                st = M.indexer_reach(sel, pos, t["ratio"], window)
                st["adjacent_jaccard"] = M.adjacent_overlap(sel)
                L["indexer"] = st
            elif event == "indexer_recall" and "indexer" in self.what:
                r = t["recall"]()[0]                                               # [C] per query of the chunk
                seen = ~torch.isnan(r)
                acc = L.setdefault("_recall", [0.0, 0])
                acc[0] += float(r[seen].double().sum())
                acc[1] += int(seen.sum())
        return rec

    # ------------------------------------------------------------------------------------------ driving
    @torch.no_grad()
    def run(self, ids, label: str = "", mode: str = "") -> dict:
        """Forward one prompt (a list of ids or a [1, s] / [s] tensor) and append its statistics to `records`."""
        dev = next(self.model.parameters()).device
        cur = self.start(ids, label, mode, dev)
        n_layers = len(self.model.layers)
        was_training = self.model.training
        self.model.eval()
        if self.progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=n_layers, desc=f"{label}/{mode}" if mode else label or "prompt", unit="layer",
                             leave=True)
        try:
            with self.recording(cur):
                logits = self.model(cur["ids_dev"][None])
        finally:
            self.model.train(was_training)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return self.finish(cur, logits)

    # the pieces of `run`, for drivers that step through the layers themselves (dsv4.inspect.layerwise): any
    # number of runs may be open at once; the hooks write into the one inside `recording`
    def start(self, ids, label: str = "", mode: str = "", device=None) -> dict:
        """Check one prompt's ids and open its (empty) record; `ids_dev` holds the ids on `device`."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise CaptureError(f"capture runs one prompt at a time, got a batch of {ids.shape[0]}")
        ids = ids.reshape(-1)
        if ids.numel() == 0:
            raise CaptureError(f"prompt {label!r} is empty")
        n_layers = len(self.model.layers)
        return {"label": label, "mode": mode, "ids": ids.tolist(), "ids_dev": ids.to(device or "cpu"),
                "n_tokens": ids.numel(), "layers": [{} for _ in range(n_layers)],
                "norms": [None] * n_layers, "bos_energy": [None] * n_layers, "experts": [None] * n_layers,
                "grams": [None] * n_layers, "grams_nobos": [None] * n_layers}

    @contextmanager
    def recording(self, cur: dict):
        """Hooks firing inside this block record into `cur` (outside any, they record nothing)."""
        prev, self._cur = self._cur, cur
        try:
            yield cur
        finally:
            self._cur = prev

    def finish(self, cur: dict, logits: torch.Tensor) -> dict:
        """Close a run given the model's final logits [1, s, V] (or [s, V]); appends and returns its record."""
        logits = logits[0] if logits.dim() == 3 else logits
        rec = self._finish(cur, logits.argmax(-1).cpu())
        self.records.append(rec)
        return rec

    def _finish(self, cur: dict, final_top1: torch.Tensor) -> dict:
        cur.pop("ids_dev")
        cur["final_top1"] = final_top1
        for tag in ("", "_nobos"):
            g = cur.pop("grams" + tag)
            cur["layer_cka" + tag] = _cka_from_units(g) if any(x is not None for x in g) else None
        for key in ("norms", "bos_energy", "experts"):
            cur[key] = torch.stack(cur[key]) if all(x is not None for x in cur[key]) else None
        for L in cur["layers"]:
            if "_lens_top1" in L:
                L["lens_top1_agreement"] = float((L.pop("_lens_top1") == final_top1).double().mean())
            if "_recall" in L:
                total, n = L.pop("_recall")
                if "indexer" in L:
                    L["indexer"]["pick_recall"] = total / n if n else float("nan")
            if "_attn" in L:
                acc = L.pop("_attn")
                q = max(1, acc["queries"])
                L["attn_mass"] = {k: (acc[k] / q).tolist() for k in ("window", "compressed", "sink")}
                L["attn_mass"]["queries"] = acc["queries"]
        return cur


def _cka_from_units(units: list) -> torch.Tensor:
    """[L, L] CKA from flattened unit-norm centred Grams (None -> NaN row/column)."""
    n = len(units)
    out = torch.full((n, n), float("nan"), dtype=torch.float64)
    ok = [i for i, u in enumerate(units) if u is not None]
    if ok:
        u = torch.stack([units[i] for i in ok]).double()
        c = u @ u.t()
        idx = torch.tensor(ok)
        out[idx[:, None], idx[None, :]] = c
    return out


@contextmanager
def capture(model: Transformer, what: str | Iterable[str] = ALL, **options):
    """Context manager: hooks attached inside, removed on exit (also on error). Options as for `Capture`."""
    cap = Capture(model, what, **options)
    with cap:
        yield cap
