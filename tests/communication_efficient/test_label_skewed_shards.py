"""Label-skewed (non-IID) shards: exactly the asked number of labels per shard, no empty
shard, no example twice, and a clear refusal when the data cannot be split so."""
import pytest
import torch

from distlab.problems.data import digits, label_skewed_shards

Y = digits(seed=0).y


def labels_per_shard(shards):
    return [len(torch.unique(Y[s])) for s in shards]


@pytest.mark.parametrize("num_shards, classes", [(2, 2), (4, 2), (20, 2), (50, 2), (7, 3),
                                                 (100, 3), (10, 10), (3, 1)])
def test_every_shard_holds_exactly_the_asked_number_of_labels(num_shards, classes):
    shards = label_skewed_shards(Y, num_shards, classes, seed=1)
    assert len(shards) == num_shards
    assert labels_per_shard(shards) == [classes] * num_shards


@pytest.mark.parametrize("num_shards, classes", [(5, 2), (50, 2), (30, 3)])
def test_shards_are_disjoint_non_empty_and_cover_every_held_label(num_shards, classes):
    shards = label_skewed_shards(Y, num_shards, classes, seed=0)
    assert min(len(s) for s in shards) >= 1
    everything = torch.cat(shards)
    assert len(torch.unique(everything)) == len(everything), "an example in two shards"
    # num_shards * classes >= 10 here: every label is held, so every example is used
    assert sorted(everything.tolist()) == list(range(len(Y)))


def test_the_split_depends_on_the_seed_and_only_on_it():
    a, b = label_skewed_shards(Y, 8, 2, seed=0), label_skewed_shards(Y, 8, 2, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = label_skewed_shards(Y, 8, 2, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_more_labels_per_shard_than_the_data_has_is_refused():
    with pytest.raises(ValueError, match="classes_per_rank=11 is out of range; allowed 1..10"):
        label_skewed_shards(Y, 4, 11)


def test_more_shards_than_a_label_has_examples_is_refused():
    with pytest.raises(ValueError, match="world_size=1000 is out of range .*allowed at most"):
        label_skewed_shards(Y, 1000, 2)


@pytest.mark.parametrize("name, value", [("world_size", 0), ("classes_per_rank", True)])
def test_bad_counts_are_refused(name, value):
    kwargs = {"world_size": 4, "classes_per_rank": 2, name: value}
    with pytest.raises(ValueError, match=f"{name}={value!r} is out of range"):
        label_skewed_shards(Y, **kwargs)
