"""Prefill then token-by-token decoding over the compressed KV cache; greedy or nucleus sampling; MTP
self-speculative decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..compiling import compile_fn
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


class StaticDecoder:
    """Decoding at fixed shapes for `batch` sequences of up to `capacity` tokens. The caches are allocated once;
    after a prefill (the ordinary chunked path) they are rewritten into the static layout, and every decode
    step is `Transformer.decode_step` on device-held token ids and position. On CUDA (`graph`) that step is
    captured once as a CUDA graph (first use: two warm-up runs, then the capture) and replayed for every later
    step, so a token costs one graph launch instead of thousands of kernel launches; elsewhere it runs eagerly.
    `generate_stream` keeps the last decoder on the model and reuses it while batch, capacity, settings and
    weights are unchanged (`release_static_decoder` frees it). `compile_step` (class-wide, off by default):
    also run the step through torch.compile before capturing it (fuses its small kernels; the first call then
    takes the compile time)."""
    compile_step = False

    def __init__(self, model: Transformer, batch: int, capacity: int, graph: bool):
        p = next(model.parameters())
        self.model, self.batch, self.capacity, self.graph_wanted = model, batch, capacity, graph and p.is_cuda
        self.caches = model.new_caches(batch, capacity, mtp=False)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros((), dtype=torch.long, device=p.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.busy = False
        # the experts stacked once for the grouped GEMMs (a graph replays whatever the capture did: stacking
        # inside it would copy every expert weight on every token)
        self.stacked = [blk.ffn.stack_experts(p.dtype) for blk in model.layers] if self.graph_wanted else None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, L] at positions 0…L−1 -> logits of the last position [batch, vocab]."""
        for c in self.caches:
            c.reset()
        logits = prefill(self.model, ids, self.caches)
        for blk, c in zip(self.model.layers, self.caches):
            blk.attn.to_static(c, ids.shape[1])
        return logits

    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids [batch, 1] at position pos -> logits [batch, vocab] (on CUDA a buffer the next step overwrites)."""
        self.ids.copy_(ids)
        self.pos.fill_(pos)
        if not self.graph_wanted:
            return self.model.decode_step(self.ids, self.pos, self.caches)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        moes = [blk.ffn for blk in self.model.layers]
        for moe, st in zip(moes, self.stacked):
            moe.stacked = st
        step = self.model.decode_step
        if self.compile_step:
            step = compile_fn(step, dynamic=False)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):            # warm-up: a step rewrites what it wrote, so repeating is safe
                for _ in range(2):
                    step(self.ids, self.pos, self.caches)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = step(self.ids, self.pos, self.caches)
            self.graph = graph
        finally:
            for moe in moes:
                moe.stacked = None


def _graph_safe(model: Transformer) -> bool:
    """Whether a decode step runs without host syncs on this model: on CUDA, every MoE on the grouped path."""
    p = next(model.parameters())
    probe = torch.empty(0, dtype=p.dtype, device=p.device)
    return p.is_cuda and all(blk.ffn._grouped(probe) for blk in model.layers)


def _decoder_key(model: Transformer, batch: int, capacity: int, graph: bool) -> tuple:
    from ..model.attention import Attention
    from ..model.moe import MoE
    params = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
    return (batch, capacity, graph, StaticDecoder.compile_step, model.numerics, model.head_fp32, MoE.impl,
            Attention.csa_mask_factor, params)


def static_decoder(model: Transformer, batch: int, total: int, cuda_graph: bool | None) -> StaticDecoder | None:
    """The decoder generate_stream uses for `batch` sequences of `total` tokens, or None for the reference
    path. cuda_graph None: a graphed static decoder where that is safe (CUDA, grouped experts), else None;
    True: the static decoder (graphed where safe, eager otherwise, e.g. on CPU); False: None."""
    safe = _graph_safe(model)
    if cuda_graph is False or (cuda_graph is None and not safe):
        return None
    capacity = -(-total // 512) * 512          # rounded up, so nearby lengths share one decoder (and graph)
    key = _decoder_key(model, batch, capacity, safe)
    dec = model.__dict__.get("_static_decoder")
    if dec is not None and dec.key == key and not dec.busy:
        return dec
    if dec is not None and not dec.busy:
        release_static_decoder(model)
    new = StaticDecoder(model, batch, capacity, safe)
    new.key = key
    if dec is None or not dec.busy:           # a decoder in use by another live stream stays; this one is private
        model.__dict__["_static_decoder"] = new
    return new


def release_static_decoder(model: Transformer) -> None:
    """Free the caches (and CUDA graph) generate_stream keeps on the model for reuse."""
    model.__dict__.pop("_static_decoder", None)


class _Readback:
    """Token ids from the device to the host without draining the stream: on CUDA a non-blocking copy into
    pinned memory and an event recorded right after it, so work queued later (the next decode step) keeps
    running while the host waits for just these ids. Elsewhere a plain read."""

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.empty(batch, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.ids: torch.Tensor | None = None

    def start(self, ids: torch.Tensor) -> None:
        if self.cuda:
            self.host.copy_(ids, non_blocking=True)
            self.event.record()
        else:
            self.ids = ids

    def wait(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
            return self.host.tolist()
        return self.ids.tolist()


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] | None = None,
                    seed: int | None = None, cuda_graph: bool | None = None) -> Iterator[list[int | None]]:
    """Yields, per decoding step, one new token per sequence (None for a sequence that has stopped or is
    still consuming its own longer prompt). Sequences of different lengths share positions: the shortest
    prompt is prefilled, then longer prompts are fed token by token (as DeepSeek's generate.py does).
    cuda_graph: None (default) decodes through a CUDA graph of the whole step where possible (CUDA, experts on
    the grouped path) and through the reference path otherwise; True forces the static-shape step (eager off
    CUDA); False forces the reference path. All give the same tokens up to summation order."""
    total = _check_prompts(model, prompts, max_new_tokens)
    dev = next(model.parameters()).device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    tokens = torch.full((B, total), -1, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(list(p), device=dev)
    in_prompt = tokens >= 0
    stop = set(int(s) for s in (stop_ids or []))
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    start = min(lens)
    dec = static_decoder(model, B, total, cuda_graph) if total > start else None
    if dec is not None:
        dec.busy = True
        logits = dec.prefill(tokens[:, :start])
    else:
        caches = model.new_caches(B, total, mtp=False)
        logits = prefill(model, tokens[:, :start], caches)
    readback = _Readback(B, dev)
    try:
        done = [False] * B
        produced = [0] * B
        for cur in range(start, total):
            nxt = sample(logits, temperature, top_p, gen)
            nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            tokens[:, cur] = nxt
            readback.start(nxt)
            if dec is not None and cur + 1 < total:
                # queue the next step before waiting for this token: the GPU does not idle on the host
                logits = dec.step(tokens[:, cur:cur + 1], cur)
            vals = readback.wait()                               # the step's one read-back
            out: list[int | None] = []
            for i in range(B):
                if cur < lens[i] or done[i] or produced[i] >= max_new_tokens:
                    out.append(None)
                    continue
                produced[i] += 1
                out.append(vals[i])
                if vals[i] in stop:
                    done[i] = True
            if any(o is not None for o in out):
                yield out
            if all(done[i] or produced[i] >= max_new_tokens for i in range(B)) and cur >= max(lens) - 1:
                return
            if dec is None:
                logits = model(tokens[:, cur:cur + 1], cur, caches)[:, -1]
    finally:
        if dec is not None:
            dec.busy = False


def prefill(model: Transformer, ids: torch.Tensor, caches, chunk: int = 8192) -> torch.Tensor:
    """Fill the caches with ids [b, L] in pieces of `chunk` tokens (same cache as one pass, bounded activation
    memory at any prompt length) -> logits of the last position [b, vocab]."""
    logits = None
    for c0 in range(0, ids.shape[1], chunk):
        logits = model(ids[:, c0:c0 + chunk], c0, caches, last_only=True)[:, -1]
    return logits


def generate(model: Transformer, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: Sequence[int] | None = None, seed: int | None = None, cuda_graph: bool | None = None):
    """New token ids for one prompt (list[int] -> list[int]) or a batch (list[list[int]] -> list[list[int]]).
    A stop id, when produced, is included and ends that sequence. cuda_graph: see `generate_stream`."""
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, temperature, top_p, stop_ids, seed, cuda_graph):
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
