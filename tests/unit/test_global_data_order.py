"""training/data.py: the global data order, on the real tokenizer and corpus (no training).

What would break a reshard: a DP-dependent order, a position that does not resume exactly, a
packing that drops or repeats tokens, an epoch order that is not a function of the seed.
"""

from __future__ import annotations

import pytest
import torch

from training import assets
from training.data import DataPosition, GlobalOrderDataLoader, GlobalStream

SEQ = 64


@pytest.fixture(scope="module")
def tok():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(tokenizer_path=str(assets.ensure_assets().tokenizer_dir))


def loader(tok, dp: int, rank: int, lb: int = 2) -> GlobalOrderDataLoader:
    cfg = GlobalOrderDataLoader.Config(dataset="c4_test", dataset_path=str(assets.ensure_assets().corpus_dir))
    return GlobalOrderDataLoader(cfg, dp_world_size=dp, dp_rank=rank, tokenizer=tok, seq_len=SEQ,
                                 local_batch_size=lb)


def steps_of(dl: GlobalOrderDataLoader, microsteps: int, per_step: int) -> list[list[tuple[int, str]]]:
    it, out = iter(dl), []
    for k in range(microsteps):
        next(it)
        if k % per_step == 0:
            out.append([])
        out[-1] += dl.last_ids
    return out


def test_each_step_trains_on_the_same_samples_at_dp_2_and_at_dp_1_with_accumulation(tok):
    dp2 = [steps_of(loader(tok, 2, r), 6, 1) for r in (0, 1)]
    dp1 = steps_of(loader(tok, 1, 0), 12, 2)  # 2 microsteps per step keep the global batch of 4
    merged = [sorted(dp2[0][s] + dp2[1][s]) for s in range(6)]
    assert merged == [sorted(ids) for ids in dp1]
    assert [g for ids in merged for g, _ in ids] == list(range(24))
    # the two ranks never share a sample
    assert not {g for ids in dp2[0] for g, _ in ids} & {g for ids in dp2[1] for g, _ in ids}


def test_a_loader_seeked_to_a_saved_position_continues_exactly(tok):
    a = loader(tok, 2, 1)
    it = iter(a)
    for _ in range(5):
        next(it)
    saved = DataPosition.from_state(a.position.to_state())
    assert saved.sample == 20
    x_cont, y_cont = next(it)
    b = loader(tok, 1, 0, lb=4)  # another DP degree, another local batch: same global stream
    b.seek(saved)
    x_b, y_b = next(iter(b))
    assert torch.equal(x_b["input"][2:], x_cont["input"]) and torch.equal(y_b[2:], y_cont)
    assert [g for g, _ in b.last_ids] == [20, 21, 22, 23]


def test_packing_is_the_documents_back_to_back_without_loss_or_repeat(tok):
    docs = [{"text": t} for t in ["a rank restarts", "the loss", "the supervisor watches every step quickly"] * 3]
    s = GlobalStream(docs, lambda d: d["text"], tok, seq_len=5, seed=7)
    want_in, want_lab = [], []
    for d in docs:
        t = tok.encode(d["text"], add_bos=True, add_eos=True)
        want_in += t[:-1]
        want_lab += t[1:]
    got_in, got_lab = [], []
    while s.pos.epoch == 0:
        inputs, labels, positions = s.next_sample(build=True)
        assert len(inputs) == len(labels) == len(positions) == 5 and positions[0] == 0
        got_in += inputs
        got_lab += labels
    n = len(want_in)
    assert got_in[:n] == want_in and got_lab[:n] == want_lab


def test_epoch_order_is_a_function_of_the_seed(tok):
    docs = [{"text": f"document number {i} says the loss"} for i in range(20)]

    def epoch1(seed: int) -> list[int]:
        s = GlobalStream(docs, lambda d: d["text"], tok, seq_len=4, seed=seed)
        return [s._doc_index(1, i) for i in range(len(docs))]

    assert epoch1(3) == epoch1(3) != epoch1(4)
    assert sorted(epoch1(3)) == list(range(20))
    assert GlobalStream(docs, lambda d: d["text"], tok, 4, 3)._doc_index(0, 5) == 5  # epoch 0: file order


def test_a_streaming_dataset_is_refused_with_a_clear_error(tok):
    with pytest.raises(ValueError, match="map-style dataset"):
        GlobalStream(iter([{"text": "x"}]), lambda d: d["text"], tok, 4, 0)
    with pytest.raises(ValueError, match="no documents"):
        GlobalStream([], lambda d: d["text"], tok, 4, 0)


def test_a_bad_split_is_refused(tok):
    with pytest.raises(ValueError, match="bad data split"):
        loader(tok, 2, 2)
