"""Trainer presets: the tiny CPU models and the LLM-jp-3 family as torchtitan llama3 configs.

A torchtitan "config registry" module: every public function returns a
``SupervisedTrainer.Config`` (``--module training.presets --config NAME``). Shapes come from
``supervisor.model_table`` so the torch-free preflight sees the same numbers. Presets are
device-agnostic; ``training.cpu.adapt_config`` makes them CPU-ready at launch.

Optimizer defaults follow the lab (LLM-jp): AdamW β1 0.9, β2 0.95, ε 1e-8, weight decay 0.1,
and a WSD (warmup-stable-decay) schedule whose decay can be started at any step.
"""

from __future__ import annotations

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers, _output_linear_init, parallelize_llama
from torchtitan.models.llama3 import _EMBEDDING_INIT, _NORM_INIT
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.model_spec import ModelSpec

from supervisor.model_table import ALL_SHAPES, PRESET_TRAINING, ModelShape
from training.data import GlobalOrderDataLoader
from training.trainer import SupervisedTrainer


def model_config(shape: ModelShape, attn_backend: str = "flex") -> Llama3Model.Config:
    return Llama3Model.Config(
        dim=shape.hidden,
        vocab_size=shape.vocab,
        tok_embeddings=Embedding.Config(
            num_embeddings=shape.vocab, embedding_dim=shape.hidden, param_init=_EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=shape.hidden, param_init=_NORM_INIT),
        lm_head=Linear.Config(
            in_features=shape.hidden, out_features=shape.vocab, param_init=_output_linear_init(shape.hidden)
        ),
        layers=_build_llama3_layers(
            fuse_qkv=True,
            n_layers=shape.layers,
            dim=shape.hidden,
            n_heads=shape.heads,
            n_kv_heads=shape.kv_heads,
            hidden_dim=shape.ffn,
            rope=ComplexRoPE.Config(dim=shape.head_dim, max_seq_len=131072, theta=500000, scaling="none"),
            attn_backend=attn_backend,
        ),
    )


def model_spec(shape: ModelShape) -> ModelSpec:
    return ModelSpec(
        name="llama3",
        flavor=shape.name,
        model=model_config(shape),
        parallelize_fn=parallelize_llama,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=Llama3StateDictAdapter,
    )


def _base(name: str) -> SupervisedTrainer.Config:
    shape, t = ALL_SHAPES[name], PRESET_TRAINING[name]
    return SupervisedTrainer.Config(
        model_spec=model_spec(shape),
        loss=CrossEntropyLoss.Config(),
        optimizer=default_adamw(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=t.warmup_steps, decay_ratio=0.2, decay_type="linear", min_lr_factor=0.1,
        ),
        training=TrainingConfig(local_batch_size=t.local_batch, seq_len=t.seq_len, steps=t.steps),
        dataloader=GlobalOrderDataLoader.Config(dataset="c4_test"),  # DP-independent order: reshardable
        metrics=MetricsProcessor.Config(log_freq=1),
        parallelism=ParallelismConfig(),
        checkpoint=CheckpointManager.Config(
            enable=True, interval=t.checkpoint_interval, keep_latest_k=0, last_save_model_only=False,
        ),
    )


def _preset(name: str):
    def preset() -> SupervisedTrainer.Config:
        return _base(name)

    preset.__name__ = name.replace("-", "_").replace(".", "_")
    preset.__doc__ = f"{name}: {ALL_SHAPES[name].layers} layers, hidden {ALL_SHAPES[name].hidden}, peak LR {PRESET_TRAINING[name].lr:g}."
    return preset


tiny = _preset("tiny")  # 2 layers, dim 64 (~150K params): 100 CPU steps in well under a minute
small = _preset("small")
deep6 = _preset("deep6")  # 6 layers, dim 64: the detection benchmark's deeper model
llmjp3_150m = _preset("llmjp3-150m")
llmjp3_440m = _preset("llmjp3-440m")
llmjp3_980m = _preset("llmjp3-980m")
llmjp3_1_8b = _preset("llmjp3-1.8b")
llmjp3_3_7b = _preset("llmjp3-3.7b")
llmjp3_7_2b = _preset("llmjp3-7.2b")
llmjp3_13b = _preset("llmjp3-13b")
llmjp3_172b = _preset("llmjp3-172b")

PRESETS = {name: globals()[name.replace("-", "_").replace(".", "_")] for name in ALL_SHAPES}


def get_preset(name: str) -> SupervisedTrainer.Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
