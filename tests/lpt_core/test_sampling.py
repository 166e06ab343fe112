"""Class-aware and instance samplers: balance, coverage per cycle, determinism and exact resume."""
from __future__ import annotations

import io
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpt_core.sampling import (
    ClassAwareSampler,
    InstanceSampler,
    branch_weight,
    branches_for,
    build_sampler,
    steps_per_epoch,
)

SETTINGS = settings(max_examples=25, deadline=None)

# labels of a small long-tailed dataset (classes may be absent), images per class, batch size, seed
labels_st = st.lists(st.integers(0, 6), min_size=1, max_size=40).map(lambda xs: torch.tensor(xs))
ipc_st = st.integers(1, 5)
batch_st = st.integers(1, 17)
seed_st = st.integers(0, 2**31 - 1)


def _stream(sampler: ClassAwareSampler | InstanceSampler, batch_size: int, batches: int) -> torch.Tensor:
    out = [sampler.next_batch(batch_size) for _ in range(batches)]
    assert all(b.shape == (batch_size,) and b.dtype == torch.int64 for b in out)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _is_permutation(block: torch.Tensor, items: torch.Tensor) -> bool:
    return torch.equal(block.sort().values, items.sort().values)


@SETTINGS
@given(labels=labels_st, ipc=ipc_st, batch_size=batch_st, seed=seed_st)
def test_class_aware_stream_structure(labels: torch.Tensor, ipc: int, batch_size: int, seed: int) -> None:
    classes = labels.unique()
    num_chunks = 6 * len(classes) + 3  # a few full class cycles plus a partial one
    sampler = ClassAwareSampler(labels, ipc, seed)
    stream = _stream(sampler, batch_size, -(-num_chunks * ipc // batch_size))
    stream = stream[: len(stream) // ipc * ipc]
    # batches may split a chunk, but the concatenated stream is whole chunks of one class each
    chunk_labels = labels[stream].view(-1, ipc)
    assert (chunk_labels == chunk_labels[:, :1]).all()
    drawn = chunk_labels[:, 0]
    # the class cycle: every block of K consecutive chunks visits each present class once
    for start in range(0, len(drawn) - len(classes) + 1, len(classes)):
        assert _is_permutation(drawn[start:start + len(classes)], classes)
    per_class = torch.stack([(drawn == c).sum() for c in classes])
    assert per_class.max() - per_class.min() <= 1
    # the image cycle of each class: every n_c consecutive draws of class c are its n_c images
    for c in classes:
        images = torch.nonzero(labels == c).flatten()
        from_c = stream[labels[stream] == c]
        for start in range(0, len(from_c) - len(images) + 1, len(images)):
            assert _is_permutation(from_c[start:start + len(images)], images)


@SETTINGS
@given(num_samples=st.integers(1, 50), batch_size=batch_st, seed=seed_st)
def test_instance_covers_each_index_once_per_permutation(num_samples: int, batch_size: int, seed: int) -> None:
    sampler = InstanceSampler(num_samples, seed)
    stream = _stream(sampler, batch_size, 3 * num_samples // batch_size + 2)
    for start in range(0, len(stream) - num_samples + 1, num_samples):
        assert _is_permutation(stream[start:start + num_samples], torch.arange(num_samples))


@SETTINGS
@given(labels=labels_st, ipc=ipc_st, batch_size=batch_st, seed=seed_st, before=st.integers(0, 12))
def test_class_aware_state_roundtrip_continues_identically(labels: torch.Tensor, ipc: int, batch_size: int,
                                                            seed: int, before: int) -> None:
    sampler = ClassAwareSampler(labels, ipc, seed)
    _stream(sampler, batch_size, before)
    state = _roundtrip(sampler.state_dict())
    expected = _stream(sampler, batch_size, 8)
    resumed = ClassAwareSampler(labels, ipc, seed + 1)
    resumed.load_state_dict(state)
    assert torch.equal(_stream(resumed, batch_size, 8), expected)


@SETTINGS
@given(num_samples=st.integers(1, 50), batch_size=batch_st, seed=seed_st, before=st.integers(0, 12))
def test_instance_state_roundtrip_continues_identically(num_samples: int, batch_size: int, seed: int,
                                                        before: int) -> None:
    sampler = InstanceSampler(num_samples, seed)
    _stream(sampler, batch_size, before)
    state = _roundtrip(sampler.state_dict())
    expected = _stream(sampler, batch_size, 8)
    resumed = InstanceSampler(num_samples, seed + 1)
    resumed.load_state_dict(state)
    assert torch.equal(_stream(resumed, batch_size, 8), expected)


def test_state_is_a_snapshot_not_a_view() -> None:
    sampler = ClassAwareSampler(torch.arange(10) % 3, 2, 0)
    sampler.next_batch(5)
    state = sampler.state_dict()
    frozen = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    _stream(sampler, 7, 10)
    for key, value in frozen.items():
        assert torch.equal(state[key], value) if isinstance(value, torch.Tensor) else state[key] == value


def test_same_seed_same_sequence_other_seed_differs() -> None:
    labels = torch.arange(200) % 9
    streams = [_stream(ClassAwareSampler(labels, 4, seed), 32, 5) for seed in (7, 7, 8)]
    assert torch.equal(streams[0], streams[1]) and not torch.equal(streams[0], streams[2])
    streams = [_stream(InstanceSampler(200, seed), 32, 5) for seed in (7, 7, 8)]
    assert torch.equal(streams[0], streams[1]) and not torch.equal(streams[0], streams[2])


def test_class_aware_with_classes_smaller_than_a_chunk() -> None:
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2])  # class 0 has one image, chunks ask for four
    stream = _stream(ClassAwareSampler(labels, 4, 0), 12, 3)
    chunks = stream.view(-1, 4)
    assert all(torch.equal(labels[c], labels[c[:1]].expand(4)) for c in chunks)
    assert (stream[labels[stream] == 0] == 0).all()


def test_large_dataset_is_fast() -> None:
    labels = torch.randint(0, 8142, (500_000,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    sampler = ClassAwareSampler(labels, 4, 0)
    batch = _stream(sampler, 256, 20)
    instance = _stream(InstanceSampler(500_000, 0), 256, 20)
    assert time.perf_counter() - start < 5.0
    assert (labels[batch].view(-1, 4) == labels[batch].view(-1, 4)[:, :1]).all()
    assert instance.unique().numel() == instance.numel()


def test_load_state_refuses_other_settings() -> None:
    labels = torch.arange(12) % 4
    state = ClassAwareSampler(labels, 2, 0).state_dict()
    with pytest.raises(ValueError, match="images_per_class=2, this sampler has 3"):
        ClassAwareSampler(labels, 3, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=12, this sampler has 13"):
        ClassAwareSampler(torch.arange(13) % 4, 2, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=5, this sampler has 6"):
        InstanceSampler(6, 0).load_state_dict(InstanceSampler(5, 0).state_dict())


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="images_per_class=0"):
        ClassAwareSampler(torch.zeros(3, dtype=torch.int64), 0, 0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ClassAwareSampler(torch.zeros(0, dtype=torch.int64), 4, 0)
    with pytest.raises(ValueError, match="num_samples=0"):
        InstanceSampler(0, 0)
    for sampler in (ClassAwareSampler(torch.zeros(3, dtype=torch.int64), 1, 0), InstanceSampler(3, 0)):
        with pytest.raises(ValueError, match="batch_size=0"):
            sampler.next_batch(0)


def test_build_sampler() -> None:
    labels = torch.arange(10) % 2
    assert isinstance(build_sampler("cb", labels, images_per_class=4, seed=0), ClassAwareSampler)
    assert isinstance(build_sampler("ib", labels, images_per_class=4, seed=0), InstanceSampler)
    with pytest.raises(ValueError, match=r"branch='xx'.*\['cb', 'ib'\]"):
        build_sampler("xx", labels, images_per_class=4, seed=0)  # type: ignore[arg-type]


# --- epoch plan ------------------------------------------------------------------------------------------------

def test_steps_per_epoch() -> None:
    assert steps_per_epoch(62_500, 256) == 245
    assert steps_per_epoch(10, 4) == 3
    assert steps_per_epoch(8, 4) == 3  # floor(N / B) + 1 even when B divides N, as in the authors' code
    assert steps_per_epoch(3, 256) == 1
    assert steps_per_epoch(62_500, 256, override=7) == 7


def test_branches_for() -> None:
    assert branches_for("dual") == ("cb", "ib")
    assert branches_for("class_balanced") == ("cb",)
    assert branches_for("instance") == ("ib",)
    with pytest.raises(ValueError, match=r"sampling='balanced'.*\['dual', 'class_balanced', 'instance'\]"):
        branches_for("balanced")


def test_branch_weight() -> None:
    assert [branch_weight("ib", "dual", e, 4, 0.5) for e in range(4)] == [0.5, 0.375, 0.25, 0.125]
    assert [branch_weight("cb", "dual", e, 4, 0.5) for e in range(4)] == [1.0] * 4
    assert branch_weight("cb", "class_balanced", 3, 4, 0.5) == 1.0
    assert branch_weight("ib", "instance", 3, 4, 0.5) == 1.0
    with pytest.raises(ValueError, match=r"branch='cb' is not drawn under sampling='instance'.*\['ib'\]"):
        branch_weight("cb", "instance", 0, 4, 0.5)
    with pytest.raises(ValueError, match="unknown sampling"):
        branch_weight("cb", "mixed", 0, 4, 0.5)
