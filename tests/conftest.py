import pytest
import torch

from dsv4.config import preset
from dsv4.model import Transformer, init_weights


def random_tiny(seed: int = 1, preset_name: str = "tiny", **overrides) -> Transformer:
    """The tiny preset with every parameter random (biases, sinks, ape, hc bases too) so no path is trivially
    zero; hash tables random as well."""
    cfg = preset(preset_name).replace(**overrides) if overrides else preset(preset_name)
    torch.manual_seed(seed)
    m = init_weights(Transformer(cfg), std=0.1, seed=seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("_base", "attn_sink", "ape", "bias")):
                p.normal_(0, 0.3)
        for n, b in m.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)]).int())
    return m.eval()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run thousands of small kernels per step; on a busy 2-core machine two OpenMP threads wait on
    each other at every one of them (measured: 30 s instead of 0.4 s per step). One thread avoids that."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    return random_tiny()
