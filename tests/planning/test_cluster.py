import pytest

from distlab.communication.cost_model import Fit
from distlab.planning.cluster import Cluster, Device, ModelSpec


def test_cluster_of_copies_equals_cluster_of_the_list():
    d = Device(80e9, 300e12)
    assert Cluster((4, d)).devices == Cluster([d] * 4).devices == (d,) * 4


@pytest.mark.parametrize("bad", [dict(memory_bytes=0, flops=1.0), dict(memory_bytes=1.0, flops=-1),
                                 dict(memory_bytes=True, flops=1.0)])
def test_device_refuses_non_positive_numbers(bad):
    with pytest.raises(ValueError, match="Device"):
        Device(**bad)


def test_cluster_refuses_bad_links_and_devices():
    d = Device(1e9, 1e9)
    with pytest.raises(ValueError, match="intra"):
        Cluster((2, d), intra=(1e-6,))
    with pytest.raises(ValueError, match="devices"):
        Cluster([])
    with pytest.raises(ValueError, match="devices_per_node"):
        Cluster((2, d), devices_per_node=0)


def test_link_is_intra_inside_a_node_and_inter_across():
    c = Cluster((16, Device(1e9, 1e9)), devices_per_node=8, intra=(1e-6, 1e-11),
                inter=(1e-5, 1e-10))
    assert c.link(8, 1) == (1e-6, 1e-11)
    assert c.link(2, 8) == (1e-5, 1e-10)          # dp over tp=8: the ranks are on 2 nodes


def test_this_machine_crowds_latency_and_compute_when_ranks_outnumber_cores():
    c = Cluster.this_machine(4, flops=1e9, alpha=1e-4, beta=1e-9, gamma=2e-4, cores=2,
                             memory_bytes=1e9)
    assert c.link(4, 1) == pytest.approx((1e-4 + 2e-4 * 1.0, 1e-9))   # p/c - 1 = 1
    assert c.rank_flops(0) == pytest.approx(0.5e9)
    roomy = Cluster.this_machine(2, flops=1e9, alpha=1e-4, beta=1e-9, gamma=2e-4, cores=2)
    assert roomy.link(2, 1) == (1e-4, 1e-9) and roomy.rank_flops(1) == 1e9


def test_model_spec_counts_parameters_by_the_12_L_h2_rule():
    spec = ModelSpec(num_layers=24, hidden=2048, num_heads=16, seq_len=1024, vocab=50257,
                     global_batch=8)
    assert spec.num_params == 12 * 24 * 2048 ** 2 + 50257 * 2048


def test_model_spec_refuses_heads_that_do_not_divide_hidden():
    with pytest.raises(ValueError, match="num_heads"):
        ModelSpec(2, 30, 4, 16, 65, 8)


def test_this_machine_crowds_the_bytes_by_delta_and_a_given_gamma_replaces_the_fits():
    fit = Fit("gloo", 1e-4, 1e-9, 0.05, 0.1, 6, gamma=2e-4, cores=2, delta=3e-9)
    c = Cluster.this_machine(6, flops=1e9, fit=fit, gamma=5e-4, cores=2, memory_bytes=1e9)
    assert c.link(6, 1) == pytest.approx((1e-4 + 5e-4 * 2.0, 1e-9 + 3e-9 * 2.0))  # p/c - 1 = 2
    assert Cluster.this_machine(6, flops=1e9, fit=fit, cores=2).gamma == 2e-4


def test_a_ranks_fixed_overhead_grows_as_its_share_of_a_core_shrinks():
    c = Cluster.this_machine(4, flops=1e9, alpha=0.0, beta=0.0, cores=2, overhead=1e-3)
    assert c.rank_overhead(3) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="overhead"):
        Device(1e9, 1e9, overhead=-1.0)
