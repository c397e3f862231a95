"""A dataloader whose order is global: sample g is a function of (seed, g), never of the DP rank.

Why: torchtitan's text dataloader splits the documents by DP rank and packs each rank's share
on its own, so the samples a run trains on depend on the DP degree, and its checkpointed state
is per rank ("dataloader resharding is not supported yet"). After a node is lost the run has to
continue on fewer ranks without changing the data it sees. Here:

- one global stream: the documents in epoch order (epoch 0 in file order, epoch e > 0 shuffled
  with ``seed + e``, as torchtitan reshuffles on re-loop), each tokenized with BOS/EOS and packed
  back to back into samples of ``seq_len`` tokens; sample g is tokens [g·L, (g+1)·L) of it;
- a step's global batch is a run of consecutive samples, taken one *microstep* at a time:
  microstep m of a step covers ``dp · local_batch`` samples and DP rank r takes its slice
  ``[r·lb, (r+1)·lb)`` of it. DP 2 × 1 microstep and DP 1 × 2 microsteps (gradient accumulation)
  therefore train each step on the same samples;
- the position is a `DataPosition` (sample index, epoch, document, token offset): the same on
  every rank at a step boundary, so it rides in the trainer's own checkpointed state (one copy,
  not one per rank) and a restart at any DP degree continues from the same sample;
- every batch carries its samples' ids (global index and a digest of the tokens), which the
  trainer logs per step: the evidence that a resharded run saw the same data.

Failure model / cost: every rank tokenizes every document of the stream (it must pack the
samples before its slice to know where its slice starts), so tokenization costs DP times more
CPU than torchtitan's split; a pre-tokenized, random-access source would remove that. Only
map-style (random access) datasets are supported; a streaming one is refused with a clear error.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.hf_datasets.text_datasets import DATASETS


@dataclass(slots=True)
class DataPosition:
    """Where the global stream stands: the next sample's index and its first token."""

    sample: int = 0
    epoch: int = 0
    doc: int = 0  # index into the epoch's document order
    offset: int = 0  # token offset of the next input token within that document

    def to_state(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DataPosition":
        return cls(**{k: int(state[k]) for k in ("sample", "epoch", "doc", "offset")})


def sample_digest(tokens: torch.Tensor) -> str:
    """A short content id of one sample's input tokens (same tokens → same id on any rank)."""
    return hashlib.blake2b(tokens.to(torch.int64).numpy().tobytes(), digest_size=8).hexdigest()


class GlobalStream:
    """The packed global token stream over a map-style dataset, walked from a `DataPosition`."""

    def __init__(self, docs, text_of, tokenizer: BaseTokenizer, seq_len: int, seed: int) -> None:
        if not hasattr(docs, "__getitem__") or not hasattr(docs, "__len__"):
            raise ValueError("the global data order needs a map-style dataset (random access by index); "
                             f"got {type(docs).__name__}, a streaming dataset")
        if len(docs) == 0:
            raise ValueError("the dataset has no documents")
        self.docs, self.text_of, self.tokenizer = docs, text_of, tokenizer
        self.seq_len, self.seed = seq_len, seed
        self.pos = DataPosition()
        self._order: tuple[int, torch.Tensor | None] = (-1, None)
        self._cached: tuple[tuple[int, int], list[int]] = ((-1, -1), [])

    def _doc_index(self, epoch: int, i: int) -> int:
        if epoch == 0:
            return i
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.docs), generator=gen))
        return int(self._order[1][i])

    def _tokens(self, epoch: int, i: int) -> list[int]:
        if self._cached[0] != (epoch, i):
            text = self.text_of(self.docs[self._doc_index(epoch, i)])
            self._cached = ((epoch, i), self.tokenizer.encode(text, add_bos=True, add_eos=True))
        return self._cached[1]

    def next_sample(self, build: bool):
        """Advance past one sample; return (inputs, labels, positions) lists when ``build``."""
        p, need = self.pos, self.seq_len
        inputs: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        empty_docs = 0
        while need > 0:
            toks = self._tokens(p.epoch, p.doc)
            n = len(toks) - 1  # inputs are toks[:-1], labels toks[1:] (never across documents)
            take = min(max(0, n - p.offset), need)
            if build and take:
                inputs += toks[p.offset:p.offset + take]
                labels += toks[p.offset + 1:p.offset + 1 + take]
                positions += range(take)  # torchtitan's rule: each piece's positions start at 0
            empty_docs = empty_docs + 1 if take == 0 else 0
            if empty_docs > len(self.docs):
                raise ValueError("the dataset's documents tokenize to nothing")
            p.offset += take
            need -= take
            if p.offset >= n:
                p.doc, p.offset = p.doc + 1, 0
                if p.doc >= len(self.docs):
                    p.epoch, p.doc = p.epoch + 1, 0
        p.sample += 1
        return (inputs, labels, positions) if build else None


class GlobalOrderDataLoader(BaseDataLoader):
    """torchtitan dataloader (built by upstream's ``config.dataloader.build``) over `GlobalStream`.

    Yields ``({"input", "positions"}, labels)`` like torchtitan's text loader; ``last_ids`` holds
    the (global index, digest) of each row of the batch just yielded. Its own checkpoint state is
    empty: the position is the trainer's (`SupervisedTrainer.state_dict`), the same on every rank."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dataset: str = "c4_test"
        """A map-style dataset of torchtitan's registry (``torchtitan.hf_datasets.text_datasets.DATASETS``)."""
        seed: int = 42
        """Epoch e > 0 visits the documents in the order ``randperm(seed + e)``; epoch 0 in file order."""

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer,
                 seq_len: int, local_batch_size: int, **kwargs: Any) -> None:
        if config.dataset not in DATASETS:
            raise ValueError(f"dataset {config.dataset!r} is not in torchtitan's registry ({', '.join(DATASETS)})")
        if not 0 <= dp_rank < dp_world_size or local_batch_size < 1:
            raise ValueError(f"bad data split: dp_rank {dp_rank}, dp_world_size {dp_world_size}, "
                             f"local_batch_size {local_batch_size}")
        spec = DATASETS[config.dataset]
        docs = spec.loader(config.dataset_path or spec.path)
        self.stream = GlobalStream(docs, spec.sample_processor, tokenizer, seq_len, config.seed)
        self.dp_rank, self.dp_world_size, self.local_batch_size = dp_rank, dp_world_size, local_batch_size
        self.last_ids: list[tuple[int, str]] = []

    @property
    def position(self) -> DataPosition:
        return DataPosition(**self.stream.pos.to_state())

    def seek(self, pos: DataPosition) -> None:
        self.stream.pos = DataPosition(**pos.to_state())

    @property
    def microstep_samples(self) -> int:
        """Global samples one microstep consumes (all DP ranks together)."""
        return self.dp_world_size * self.local_batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        lb, mine = self.local_batch_size, range(self.dp_rank * self.local_batch_size,
                                                (self.dp_rank + 1) * self.local_batch_size)
        while True:
            rows, ids = [], []
            for j in range(self.microstep_samples):  # walk the whole microstep: the position stays global
                g = self.stream.pos.sample
                built = self.stream.next_sample(build=j in mine)
                if built is not None:
                    rows.append(built)
                    ids.append(g)
            inputs = torch.tensor([r[0] for r in rows], dtype=torch.long)
            labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
            positions = torch.tensor([r[2] for r in rows], dtype=torch.long)
            self.last_ids = [(g, sample_digest(inputs[k])) for k, g in enumerate(ids)]
            assert len(rows) == lb
            yield {"input": inputs, "positions": positions}, labels

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
