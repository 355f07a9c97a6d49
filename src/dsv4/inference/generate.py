"""Prefill then token-by-token decoding over the compressed KV cache; greedy or nucleus sampling; MTP
self-speculative decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..model import Transformer


class GenerationError(ValueError):
    """Bad prompt or settings for generation (the message says which)."""


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> token ids [b]. temperature 0 = greedy; otherwise softmax(logits/T) restricted to the
    smallest set of tokens with probability ≥ top_p, sampled with the exponential (Gumbel) trick."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p          # keep tokens until the mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    noise = torch.empty_like(probs).exponential_(1, generator=gen)
    return (probs / noise).argmax(-1)


def _check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: give at least one token per sequence (e.g. the BOS token)")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    V = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < V]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {V})")
    total = max(len(p) for p in prompts) + max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise GenerationError(f"prompt + max_new_tokens = {total} tokens exceeds the model limit "
                              f"max_position_embeddings = {model.cfg.max_position_embeddings}")
    return total


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] | None = None,
                    seed: int | None = None) -> Iterator[list[int | None]]:
    """Yields, per decoding step, one new token per sequence (None for a sequence that has stopped or is
    still consuming its own longer prompt). Sequences of different lengths share positions: the shortest
    prompt is prefilled, then longer prompts are fed token by token (as DeepSeek's generate.py does)."""
    total = _check_prompts(model, prompts, max_new_tokens)
    dev = next(model.parameters()).device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    tokens = torch.full((B, total), -1, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(list(p), device=dev)
    in_prompt = tokens >= 0
    stop = torch.as_tensor(list(stop_ids or []), device=dev, dtype=torch.long)
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    caches = model.new_caches(B, total, mtp=False)
    start = min(lens)
    logits = prefill(model, tokens[:, :start], caches)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    produced = [0] * B
    for cur in range(start, total):
        nxt = sample(logits, temperature, top_p, gen)
        nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
        tokens[:, cur] = nxt
        out: list[int | None] = []
        for i in range(B):
            if in_prompt[i, cur] or done[i] or produced[i] >= max_new_tokens:
                out.append(None)
                continue
            produced[i] += 1
            out.append(int(nxt[i]))
            if stop.numel() and bool((stop == nxt[i]).any()):
                done[i] = True
        if any(o is not None for o in out):
            yield out
        if all(done[i] or produced[i] >= max_new_tokens for i in range(B)) and cur >= max(lens) - 1:
            return
        logits = model(tokens[:, cur:cur + 1], cur, caches)[:, -1]


def prefill(model: Transformer, ids: torch.Tensor, caches, chunk: int = 8192) -> torch.Tensor:
    """Fill the caches with ids [b, L] in pieces of `chunk` tokens (same cache as one pass, bounded activation
    memory at any prompt length) -> logits of the last position [b, vocab]."""
    logits = None
    for c0 in range(0, ids.shape[1], chunk):
        logits = model(ids[:, c0:c0 + chunk], c0, caches, last_only=True)[:, -1]
    return logits


def generate(model: Transformer, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: Sequence[int] | None = None, seed: int | None = None):
    """New token ids for one prompt (list[int] -> list[int]) or a batch (list[list[int]] -> list[list[int]]).
    A stop id, when produced, is included and ends that sequence."""
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, temperature, top_p, stop_ids, seed):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs[0] if single else outs


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def generate_speculative(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                         stop_ids: Sequence[int] | None = None) -> tuple[list[int], SpecStats]:
    """Greedy decoding with MTP self-speculation (batch 1): the MTP block drafts token t+2 from the main
    model's streams at t and token t+1; the main model verifies draft and bonus token in one 2-token step.
    On rejection the main cache rolls back one position. The output equals plain greedy decoding."""
    if not len(model.mtp):
        raise GenerationError("this model has no MTP block (num_nextn_predict_layers = 0)")
    total = _check_prompts(model, [prompt_ids], max_new_tokens) + 2
    dev = next(model.parameters()).device
    stop = set(int(s) for s in (stop_ids or []))
    caches = model.new_caches(1, total, mtp=True)
    main_c, mtp_c = caches[:-len(model.mtp)], caches[-len(model.mtp)]
    ids = torch.as_tensor([list(prompt_ids)], device=dev)
    P = ids.shape[1]
    logits, h = model(ids, 0, main_c, return_hidden=True)
    out: list[int] = [int(logits[0, -1].argmax())]            # the token at position cur = P
    stats = SpecStats()
    if P > 1:                                                 # MTP consumes (h_i, token_{i+1}) at position i
        model.mtp_forward(h[:, :-1], ids[:, 1:], 0, mtp_c)
    # pending MTP input: streams at positions mtp_pos… and the tokens that follow them
    mtp_h, mtp_y, mtp_pos, cur = h[:, -1:], [out[-1]], P - 1, P
    while len(out) < max_new_tokens and out[-1] not in stop:
        draft = int(model.mtp_forward(mtp_h, torch.tensor([mtp_y], device=dev), mtp_pos, mtp_c)[0, -1].argmax())
        snaps = [c.snapshot() for c in main_c]
        lg, hh = model(torch.tensor([[out[-1], draft]], device=dev), cur, main_c, return_hidden=True)
        stats.drafted += 1
        first = int(lg[0, 0].argmax())
        if first == draft:                                  # accepted: two tokens for one main-model step
            stats.accepted += 1
            out.append(draft)
            if len(out) >= max_new_tokens or draft in stop:
                break
            out.append(int(lg[0, 1].argmax()))
            mtp_h, mtp_y, mtp_pos, cur = hh, [draft, out[-1]], cur, cur + 2
        else:                                               # rejected: roll the main cache back one position
            for c, s in zip(main_c, snaps):
                c.restore(s)
            _, hh = model(torch.tensor([[out[-1]]], device=dev), cur, main_c, return_hidden=True)
            out.append(first)
            mtp_h, mtp_y, mtp_pos, cur = hh, [first], cur, cur + 1
    return out[:max_new_tokens], stats
