"""Hooks that turn a forward pass into per-layer statistics without keeping the activations.

    with capture(model) as cap:
        for ids in prompts:
            cap.run(ids, label="factual")
    records = cap.records          # one dict per prompt, small tensors / floats only

Per block output h [1, s, hc, D] the hook computes at once: token norms, the BOS vector's dominant
dimensions, CKA between the hc copies and with the previous layer, effective rank with and without BOS,
secondary sinks, a logit-lens top-1; gate hooks keep expert ids; the reference attention path reports the
attention mass on window / compressed / sink slots and the indexer's picks. Only the previous layer's
state is held between hooks, so memory is O(s·hc·D), independent of depth.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..model import Transformer
from ..model.mhc import hc_head, hc_maps
from . import metrics as M

ALL = ("blocks", "gates", "attention", "indexer", "mhc", "logit_lens")


class Capture:
    def __init__(self, model: Transformer, what=ALL, top_dims: int = 8):
        unknown = set(what) - set(ALL)
        if unknown:
            raise ValueError(f"unknown capture target(s) {sorted(unknown)}; choose from {list(ALL)}")
        self.model, self.what, self.top_dims = model, set(what), top_dims
        self.handles: list = []
        self.records: list[dict] = []
        self._cur: dict | None = None
        self._prev: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ hooks
    def __enter__(self) -> "Capture":
        for i, blk in enumerate(self.model.layers):
            if "blocks" in self.what or "logit_lens" in self.what:
                self.handles.append(blk.register_forward_hook(self._block_hook(i)))
            if "mhc" in self.what and self.model.cfg.residual != "plain":
                self.handles.append(blk.register_forward_pre_hook(self._mhc_hook(i)))
            if "gates" in self.what:
                self.handles.append(blk.ffn.gate.register_forward_hook(self._gate_hook(i)))
            if "attention" in self.what or "indexer" in self.what:
                blk.attn.recorder = self._attn_recorder(i)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for blk in self.model.layers:
            blk.attn.recorder = None

    def _layer(self, i: int) -> dict:
        return self._cur["layers"].setdefault(i, {})

    def _block_hook(self, i: int):
        def hook(module, args, out):
            if self._cur is None:
                return
            h = out[0].detach().float()                               # [s, n, D]
            L = self._layer(i)
            if "blocks" in self.what:
                s, n, D = h.shape
                norms = h.flatten(1).norm(dim=-1)                        # [s]
                mean = h.mean(1)                                         # [s, D] the copies' average
                L["norms"] = norms
                L["copy_norms"] = h.norm(dim=-1)                         # [s, n]
                L["sink_ratio"] = float(M.sink_ratio(norms, 0)) if s > 1 else float("nan")
                L["bos_norm"] = float(norms[0])
                L["nonbos_norm"] = float(norms[1:].mean()) if s > 1 else float("nan")
                dims, share = M.dominant_dims(mean, 0, self.top_dims)
                L["bos_dims"], L["bos_dims_share"] = [int(d) for d in dims], float(share)
                if s > 2:
                    pairs = [float(M.linear_cka(h[:, a], h[:, b])) for a in range(n) for b in range(a + 1, n)]
                    L["hc_cka_mean"], L["hc_cka_min"] = sum(pairs) / len(pairs) if pairs else 1.0, min(pairs or [1.0])
                    L["hc_cka_nobos_mean"] = (sum(float(M.linear_cka(h[1:, a], h[1:, b])) for a in range(n)
                                                  for b in range(a + 1, n)) / len(pairs)) if pairs else 1.0
                    flat = h.flatten(1)
                    if self._prev is not None:
                        L["adjacent_cka"] = float(M.linear_cka(self._prev, flat))
                    self._prev = flat
                    L["erank"] = float(M.effective_rank(mean))
                    L["erank_nobos"] = float(M.effective_rank(mean[1:]))
                    L["secondary_sinks"] = [int(p) for p in M.secondary_sinks(norms)]
            if "logit_lens" in self.what:
                m = self.model
                x = out if m.cfg.residual == "plain" else out
                with torch.no_grad():
                    lg = m._logits(x, m, m.norm)[0]                      # [s, V]
                L["lens_top1"] = lg.argmax(-1)
        return hook

    def _mhc_hook(self, i: int):
        def hook(module, args):
            if self._cur is None:
                return
            h = args[0].detach()
            with torch.no_grad():
                pre, post, comb = hc_maps(h, module.hc_attn_fn, module.hc_attn_base, module.hc_attn_scale,
                                          module.iters, module.hc_eps, module.norm_eps, "mhc")
            c = comb[0].mean(0)                                          # [n, n] averaged over tokens
            L = self._layer(i)
            L["comb_mean"] = c.tolist()
            L["comb_identity_distance"] = float(M.distance_from_identity(c))
            L["comb_ds_error"] = float(M.doubly_stochastic_error(comb[0]).max() if torch.is_tensor(
                M.doubly_stochastic_error(comb[0])) else M.doubly_stochastic_error(comb[0]))
            L["pre_mean"], L["post_mean"] = pre[0].mean(0).tolist(), post[0].mean(0).tolist()
        return hook

    def _gate_hook(self, i: int):
        def hook(module, args, out):
            if self._cur is None:
                return
            w, idx = out
            L = self._layer(i)
            L["experts"] = idx.detach().cpu()                            # [s, k]
            L["expert_weights"] = w.detach().float().cpu()
        return hook

    def _attn_recorder(self, i: int):
        def rec(event, **t):
            if self._cur is None:
                return
            L = self._layer(i)
            if event == "attention" and "attention" in self.what:
                acc = L.setdefault("attn_mass", {"window": [], "compressed": [], "sink": []})
                for k in acc:
                    acc[k].append(t[k][0].detach().float().cpu())          # [C, h]
            elif event == "indexer" and "indexer" in self.what:
                sel, pos, m = t["selected"][0].detach().cpu(), t["positions"].cpu(), t["ratio"]
                valid = sel >= 0
                back = (pos[:, None] - sel * m).float()                     # tokens between query and entry start
                L["indexer_reach_mean"] = float(back[valid].mean()) if valid.any() else float("nan")
                L["indexer_reach_max"] = float(back[valid].max()) if valid.any() else float("nan")
                ov = [M.jaccard(set(sel[q][valid[q]].tolist()), set(sel[q + 1][valid[q + 1]].tolist()))
                      for q in range(len(sel) - 1) if valid[q].any() and valid[q + 1].any()]
                L["indexer_adjacent_jaccard"] = sum(ov) / len(ov) if ov else float("nan")
        return rec

    # ------------------------------------------------------------------------------------------ driving
    @torch.no_grad()
    def run(self, ids, label: str = "", mode: str = "chat") -> dict:
        """Forward one prompt (list of ids or [1, s] tensor) and keep its statistics."""
        ids = torch.as_tensor(ids).reshape(1, -1).to(next(self.model.parameters()).device)
        self._cur = {"label": label, "mode": mode, "ids": ids[0].cpu(), "layers": {}}
        self._prev = None
        try:
            logits = self.model(ids)
        finally:
            cur, self._cur = self._cur, None
        final_top1 = logits[0].argmax(-1).cpu()
        cur["final_top1"] = final_top1
        cur["last_token_norm"] = None
        for i, L in cur["layers"].items():
            if "lens_top1" in L:
                L["lens_agreement"] = float((L.pop("lens_top1").cpu() == final_top1).float().mean())
            if "attn_mass" in L:
                L["attn_mass"] = {k: torch.cat(v).mean(0).tolist() for k, v in L["attn_mass"].items()}
            if "norms" in L:
                L["norms"] = L["norms"].cpu()
                cur["last_token_norm"] = float(L["norms"][-1])
        self.records.append(cur)
        return cur


@contextmanager
def capture(model: Transformer, what=ALL):
    cap = Capture(model, what)
    with cap:
        yield cap
