"""distlab.decentralized.topology: the graphs, their mixing matrices, and one gossip round."""
import pytest
import torch

import distlab
from distlab.decentralized import topology
from distlab.decentralized.topology import exponential, gossip_average, ring, torus

pytestmark = pytest.mark.timeout(120)

GRAPHS = [ring(1), ring(2), ring(3), ring(8), torus(2, 2), torus(2, 3), torus(3, 3),
          torus(3, 4), exponential(1), exponential(5), exponential(8), exponential(16)]


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda t: f"{t.name}-{t.world_size}")
def test_mixing_matrices_are_symmetric_and_doubly_stochastic(graph):
    W = graph.mixing_matrix()
    assert W.dtype == torch.float64 and W.shape == (graph.world_size,) * 2
    torch.testing.assert_close(W, W.T, rtol=0, atol=0)
    ones = torch.ones(graph.world_size, dtype=torch.float64)
    torch.testing.assert_close(W.sum(0), ones)
    torch.testing.assert_close(W.sum(1), ones)
    assert (W >= 0).all()
    # Zero exactly off the graph: a rank mixes only with its neighbours.
    for i in range(graph.world_size):
        assert set(W[i].nonzero().flatten().tolist()) <= {i, *graph.neighbours(i)}


def test_neighbours_of_each_graph():
    assert ring(5).neighbours(0) == (1, 4)
    assert ring(2).neighbours(0) == (1,) and ring(1).neighbours(0) == ()
    assert torus(3, 3).neighbours(4) == (1, 3, 5, 7)
    assert torus(2, 3).neighbours(0) == (1, 2, 3)     # one neighbour along the side of 2
    assert torus(1, 5).edges == ring(5).edges
    assert exponential(8).neighbours(0) == (1, 2, 4, 6, 7)
    assert exponential(4).degree == 3                  # every other rank: complete at n = 4


def test_uniform_weights_on_regular_graphs():
    W = torus(3, 3).mixing_matrix()
    assert W[4, 1] == 1 / 5 and W[4, 4].item() == pytest.approx(1 / 5)


def test_larger_graphs_mix_faster_on_the_torus_and_exponential_graph():
    for n, rows in ((9, 3), (16, 4)):
        gaps = {t.name: t.spectral_gap() for t in (ring(n), torus(rows, n // rows),
                                                  exponential(n))}
        assert gaps["ring"] < gaps[f"torus {rows}x{n // rows}"] < gaps["exponential"]
    assert ring(1).spectral_gap() == 1.0
    # The ring's gap: 1 - (1 + 2 cos(2 pi / n)) / 3.
    assert ring(8).spectral_gap() == pytest.approx(1 - (1 + 2 * torch.cos(
        torch.tensor(2 * torch.pi / 8, dtype=torch.float64)).item()) / 3)


def test_bad_arguments_name_the_value():
    for call, name in ((lambda: ring(0), "n"), (lambda: torus(0, 3), "rows"),
                       (lambda: torus(3, True), "cols"), (lambda: exponential(-1), "n"),
                       (lambda: topology.build("star", 4), "name"),
                       (lambda: ring(3).neighbours(3), "rank")):
        with pytest.raises(ValueError, match=rf"^{name}=.*allowed"):
            call()


def test_build_picks_the_most_nearly_square_torus():
    assert topology.build("torus", 12).name == "torus 3x4"
    assert topology.build("torus", 4).name == "torus 2x2"
    assert topology.build("torus", 3).name == "torus 1x3"


def _gossip_worker(graph_name, dtype):
    import torch.distributed as dist
    rank, p = dist.get_rank(), dist.get_world_size()
    graph = topology.build(graph_name, p)
    x = (torch.arange(5, dtype=dtype) + 1) * (rank + 1) ** 2
    out = gossip_average(x, graph, rank)
    assert out is x
    return x


@pytest.mark.parametrize("world_size,graph_name,dtype", [
    (1, "ring", torch.float32), (2, "ring", torch.float64), (3, "ring", torch.float32),
    (4, "torus", torch.float64), (4, "exponential", torch.float32)])
def test_gossip_round_equals_the_mixing_matrix_times_the_stacked_tensors(world_size,
                                                                        graph_name, dtype):
    got = torch.stack(distlab.launch(_gossip_worker, world_size, graph_name, dtype,
                                     timeout=60))
    X = torch.stack([(torch.arange(5, dtype=dtype) + 1) * (r + 1) ** 2
                     for r in range(world_size)])                       # (n, 5)
    W = topology.build(graph_name, world_size).mixing_matrix().to(dtype)
    torch.testing.assert_close(got, W @ X)


def _gossip_in_subgroup_worker():
    import torch.distributed as dist
    from distlab import comm
    odd = dist.new_group([1, 3])
    even = dist.new_group([0, 2])
    group = odd if dist.get_rank() % 2 else even
    x = torch.full((3,), float(dist.get_rank()))
    comm.ledger().reset()
    gossip_average(x, ring(2), dist.get_rank(group), group=group)
    return x, comm.ledger().totals()["bytes_sent"]


def test_gossip_in_a_subgroup_talks_to_the_subgroups_ranks():
    results = distlab.launch(_gossip_in_subgroup_worker, 4, timeout=60)
    for rank, (x, sent) in enumerate(results):
        torch.testing.assert_close(x, torch.full((3,), 1.0 if rank % 2 == 0 else 2.0))
        assert sent == 3 * 4                           # one neighbour, 3 float32
