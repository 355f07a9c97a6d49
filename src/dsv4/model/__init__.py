"""The DeepSeek-V4 architecture, one file per part of the paper."""
from .attention import Attention, AttnCache, CacheOverflowError, Indexer
from .compressor import Compressor, CompressorState
from .mhc import hc_collapse, hc_expand, hc_head, hc_maps, sinkhorn
from .moe import MoE, Gate, Expert
from .transformer import Block, MTPBlock, Transformer, balanced_hash_table, init_weights

__all__ = ["Attention", "AttnCache", "CacheOverflowError", "Indexer", "Compressor", "CompressorState", "hc_collapse",
           "hc_expand", "hc_head", "hc_maps", "sinkhorn", "MoE", "Gate", "Expert", "Block", "MTPBlock", "Transformer",
           "balanced_hash_table", "init_weights"]
