"""Presets build real torchtitan llama3 models (on the meta device: no memory is allocated)."""

import pytest
import torch

from supervisor.model_table import LLMJP3
from training import presets


@pytest.mark.parametrize("name", sorted(LLMJP3))
def test_llmjp3_preset_parameter_count_matches_its_name(name):
    config = presets.get_preset(name)
    shape = LLMJP3[name]
    with torch.device("meta"):
        model = config.model_spec.model.build()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - shape.nominal_params) / shape.nominal_params <= 0.15, (name, n)
    assert n == shape.param_count()  # the torch-free estimate preflight uses is exact
    opt = config.optimizer.param_groups[0].optimizer_kwargs
    assert (opt["betas"], opt["eps"], opt["weight_decay"]) == ((0.9, 0.95), 1e-8, 0.1)


def test_table_shapes_match_the_seed_table():
    got = {k: (s.layers, s.hidden, s.ffn, s.heads, s.kv_heads) for k, s in LLMJP3.items()}
    assert got == {
        "llmjp3-150m": (12, 512, 2048, 8, 8), "llmjp3-440m": (16, 1024, 3584, 16, 16),
        "llmjp3-980m": (20, 1536, 5376, 16, 16), "llmjp3-1.8b": (24, 2048, 7168, 16, 16),
        "llmjp3-3.7b": (28, 3072, 8192, 24, 24), "llmjp3-7.2b": (32, 4096, 11008, 32, 32),
        "llmjp3-13b": (40, 5120, 13824, 40, 40), "llmjp3-172b": (96, 12288, 38464, 96, 16),
    }
    assert {s.vocab for s in LLMJP3.values()} == {99_487}


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*tiny"):
        presets.get_preset("gpt5")
