"""Local, deterministic training assets: a byte-level BPE tokenizer and a small text corpus.

No network: the corpus is generated from a seeded grammar (so the loss curve is learnable and
identical on every machine) and the tokenizer is trained on it with the `tokenizers` package.
Built once into a cache folder keyed by ASSETS_VERSION, rebuilt if any file is missing.
torchtitan reads them as dataset ``c4_test`` with ``dataloader.dataset_path=<corpus>`` and
``hf_assets_path=<tokenizer>``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

ASSETS_VERSION = "v1"
VOCAB_SIZE = 512  # must equal supervisor.model_table.TINY_VOCAB
N_DOCS = 4000
SEED = 1234

_SUBJECTS = ["the supervisor", "a rank", "the optimizer", "an engineer", "the cluster", "a node",
             "the checkpoint", "the scheduler", "a gradient", "the dataloader", "the model", "a spike"]
_VERBS = ["watches", "restarts", "saves", "loads", "skips", "scales", "reports", "drains",
          "measures", "records", "restores", "pages"]
_OBJECTS = ["the loss", "every step", "the learning rate", "a bad batch", "the last good state",
            "the journal", "a hung process", "the metrics", "one thousand tokens", "the layout",
            "the quarantine folder", "a new generation"]
_TAILS = ["before dawn", "without waiting", "at the step boundary", "on every rank", "in order",
          "with care", "again", "quickly", "after the spike", "for the run"]


def _document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(_TAILS)}"
        n = rng.randint(1, 99)
        if rng.random() < 0.3:
            s += f" {n} times, then {n + 1} times"
        sentences.append(s[0].upper() + s[1:] + ".")
    return " ".join(sentences)


def corpus_documents(n_docs: int = N_DOCS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]


@dataclass(frozen=True)
class Assets:
    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    def files(self) -> list[Path]:
        return [self.tokenizer_dir / "tokenizer.json", self.tokenizer_dir / "tokenizer_config.json",
                self.corpus_dir / "data.jsonl"]

    def complete(self) -> bool:
        return all(p.is_file() and p.stat().st_size > 0 for p in self.files())


def default_root() -> Path:
    base = os.environ.get("TITAN_ASSETS_DIR")
    if base:
        return Path(base) / ASSETS_VERSION
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "titan-supervisor" / "assets" / ASSETS_VERSION


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _build_tokenizer(docs: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} exceeds {VOCAB_SIZE}")
    _write_atomic(out / "tokenizer.json", tok.to_str())
    _write_atomic(out / "tokenizer_config.json", json.dumps({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "add_bos_token": True,
        "add_eos_token": True,
        "model_max_length": 1 << 20,
    }))


def ensure_assets(root: Path | None = None) -> Assets:
    """Return the assets, building whatever is missing. Safe to call from every rank:
    files are written atomically and the content is deterministic."""
    assets = Assets(Path(root) if root else default_root())
    if assets.complete():
        return assets
    docs = corpus_documents()
    _write_atomic(assets.corpus_dir / "data.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    _build_tokenizer(docs, assets.tokenizer_dir)
    return assets


if __name__ == "__main__":
    a = ensure_assets()
    print(a.root)
