"""Model shapes, as plain data, shared by the trainer presets and the torch-free preflight.

The LLM-jp-3 family (NII) from the lab's report, plus the tiny CPU models used by tests and
the demo. `training.presets` turns these into torchtitan llama3 configs; `supervisor.preflight`
uses them for memory estimates and divisibility checks without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

LLMJP_VOCAB = 99_487


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    nominal_params: float  # what the name promises (e.g. 1.8e9); 0 for test models
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def param_count(self) -> int:
        """Parameters of a llama-style decoder (SwiGLU FFN, GQA, RMSNorm, untied head)."""
        kv_dim = self.kv_heads * self.head_dim
        attn = self.hidden * (self.hidden + 2 * kv_dim) + self.hidden * self.hidden
        ffn = 3 * self.hidden * self.ffn
        norms = 2 * self.hidden
        per_layer = attn + ffn + norms
        embed = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * per_layer + embed + head + self.hidden


def _llmjp(name: str, nominal: float, layers: int, hidden: int, ffn: int, heads: int, kv: int) -> ModelShape:
    return ModelShape(f"llmjp3-{name}", layers, hidden, ffn, heads, kv, LLMJP_VOCAB, nominal)


LLMJP3 = {
    s.name: s
    for s in (
        _llmjp("150m", 150e6, 12, 512, 2048, 8, 8),
        _llmjp("440m", 440e6, 16, 1024, 3584, 16, 16),
        _llmjp("980m", 980e6, 20, 1536, 5376, 16, 16),
        _llmjp("1.8b", 1.8e9, 24, 2048, 7168, 16, 16),
        _llmjp("3.7b", 3.7e9, 28, 3072, 8192, 24, 24),
        _llmjp("7.2b", 7.2e9, 32, 4096, 11008, 32, 32),
        _llmjp("13b", 13e9, 40, 5120, 13824, 40, 40),
        _llmjp("172b", 172e9, 96, 12288, 38464, 96, 16),
    )
}

# Tiny CPU models: vocab matches the byte-level tokenizer built by training.assets.
TINY_VOCAB = 512
TINY = {
    s.name: s
    for s in (
        ModelShape("tiny", layers=2, hidden=64, ffn=256, heads=4, kv_heads=4, vocab=TINY_VOCAB, nominal_params=0),
        ModelShape("small", layers=4, hidden=128, ffn=512, heads=8, kv_heads=4, vocab=TINY_VOCAB, nominal_params=0),
        # 6 layers (torchtitan debug-model depth) at the tiny width, so 2 shared CPU cores can afford it
        ModelShape("deep6", layers=6, hidden=64, ffn=256, heads=4, kv_heads=4, vocab=TINY_VOCAB, nominal_params=0),
    )
}

ALL_SHAPES: dict[str, ModelShape] = {**TINY, **LLMJP3}


@dataclass(frozen=True)
class PresetTraining:
    """A preset's training defaults (what `training.presets` builds; what preflight lints)."""

    model: str
    lr: float
    warmup_steps: int
    local_batch: int
    seq_len: int
    steps: int
    checkpoint_interval: int
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1


def _llmjp_training(name: str, lr: float) -> PresetTraining:
    return PresetTraining(name, lr=lr, warmup_steps=2000, local_batch=1, seq_len=4096, steps=100_000,
                          checkpoint_interval=500)


# Peak LRs: the lab used 3e-4 (8B) and 2e-4 (32B); smaller models take larger ones.
PRESET_TRAINING: dict[str, PresetTraining] = {
    "tiny": PresetTraining("tiny", lr=8e-4, warmup_steps=10, local_batch=4, seq_len=256, steps=100,
                           checkpoint_interval=10),
    "small": PresetTraining("small", lr=8e-4, warmup_steps=20, local_batch=4, seq_len=256, steps=200,
                            checkpoint_interval=20),
    "deep6": PresetTraining("deep6", lr=8e-4, warmup_steps=10, local_batch=4, seq_len=256, steps=200,
                             checkpoint_interval=20),
    **{t.model: t for t in (
        _llmjp_training("llmjp3-150m", 6e-4), _llmjp_training("llmjp3-440m", 5e-4),
        _llmjp_training("llmjp3-980m", 4e-4), _llmjp_training("llmjp3-1.8b", 3e-4),
        _llmjp_training("llmjp3-3.7b", 3e-4), _llmjp_training("llmjp3-7.2b", 3e-4),
        _llmjp_training("llmjp3-13b", 2.5e-4), _llmjp_training("llmjp3-172b", 1.5e-4),
    )},
}
