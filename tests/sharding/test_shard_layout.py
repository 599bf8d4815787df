"""The shard layout ZeRO and FSDP share: rows, shards, padding, and where the rows live."""
import pytest
import torch

from distlab.sharding.layout import FlatLayout, ShardLayout


def test_rows_round_trip_with_sizes_not_divisible_by_the_world_size():
    layout = ShardLayout([(3, 5), (2,), (1,)], world_size=4)
    tensors = [torch.randn(3, 5), torch.randn(2), torch.randn(1)]
    rows = layout.pack_rows(tensors)
    assert rows.shape == (4, 4 + 1 + 1)
    for a, b in zip(layout.unpack_rows(rows), tensors):
        torch.testing.assert_close(a, b)
    into = [torch.zeros_like(t) for t in tensors]
    layout.unpack_rows_into(rows, into)
    for a, b in zip(into, tensors):
        torch.testing.assert_close(a, b)
    shards = [layout.shard(i, t, 3) for i, t in enumerate(tensors)]
    assert [s.numel() for s in shards] == [3, 0, 0]      # 15 = 4+4+4+3; tiny ones: empty


def test_packed_rows_live_on_the_shards_device():
    # "meta" stands for a GPU here: a row made on the CPU could not be handed to NCCL.
    layout = ShardLayout([(3, 5), (2,)], world_size=2)
    shards = [torch.empty(8, device="meta"), torch.empty(1, device="meta")]
    assert layout.pack_row(shards).device.type == "meta"
    assert layout.rows(0, torch.empty(3, 5, device="meta")).device.type == "meta"


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True])
def test_world_size_is_validated(world_size):
    with pytest.raises(ValueError, match=rf"world_size={world_size!r} .* an int >= 1"):
        ShardLayout([(3,)], world_size)


def test_a_row_packed_into_the_gather_output_zeroes_only_its_padding():
    layout = ShardLayout([(3, 5), (2,), (1,)], world_size=4)
    tensors = [torch.randn(3, 5), torch.randn(2), torch.randn(1)]
    rows = torch.full((4, layout.row_len), 7.0)                      # (N, row_len)
    out = layout.pack_row([layout.shard(i, t, 1) for i, t in enumerate(tensors)], out=rows[1])
    assert out.data_ptr() == rows[1].data_ptr()
    torch.testing.assert_close(rows, torch.cat([torch.full((4, layout.row_len), 7.0)[:1],
                                                layout.pack_rows(tensors)[1:2],
                                                torch.full((2, layout.row_len), 7.0)]))


def test_unpacking_rows_into_tensors_can_leave_one_rank_row_untouched():
    layout = ShardLayout([(3, 5), (2,), (1,)], world_size=4)
    tensors = [torch.randn(3, 5), torch.randn(2), torch.randn(1)]
    rows = layout.pack_rows(tensors)
    for skip in range(4):
        into = [torch.full_like(t, 7.0) for t in tensors]
        layout.unpack_rows_into(rows, into, skip=skip)
        for i, (a, b) in enumerate(zip(into, tensors)):
            want = b.clone()
            layout.shard(i, want, skip).fill_(7.0)                    # row ``skip``: kept
            torch.testing.assert_close(a, want)


def test_the_flat_layout_gives_each_rank_one_slice_of_the_tensors_end_to_end():
    layout = FlatLayout([(3, 5), (2,), (1,)], world_size=4)       # 18 elements: S = 5
    tensors = [torch.randn(3, 5), torch.randn(2), torch.randn(1)]
    flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.zeros(2)])   # (20,)
    assert layout.row_len == 5
    buffer = layout.buffer(tensors)
    torch.testing.assert_close(buffer, flat, rtol=0, atol=0)
    for rank in range(4):
        shards = [layout.shard(i, t, rank) for i, t in enumerate(tensors)]
        row = layout.pack_row(shards)
        torch.testing.assert_close(row, flat.view(4, 5)[rank], rtol=0, atol=0)
        for i, s in enumerate(shards):       # each shard sits at its row offset
            o = layout.row_offset(i, rank)
            torch.testing.assert_close(row[o:o + s.numel()], s.reshape(-1), rtol=0, atol=0)
    assert [layout.shard(i, t, 3).numel() for i, t in enumerate(tensors)] == [0, 2, 1]
    assert [layout.shard(i, t, 2).numel() for i, t in enumerate(tensors)] == [5, 0, 0]
    for a, b in zip(layout.unpack_rows(layout.pack_rows(tensors)), tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    views = layout.views(buffer)                  # the tensors can live in the buffer
    buffer.view(4, 5)[1].fill_(9.0)
    assert views[0].reshape(-1)[5:10].eq(9.0).all() and views[0].reshape(-1)[:5].ne(9.0).all()


@pytest.mark.parametrize("world_size", [0, 1.5])
def test_flat_layout_world_size_is_validated(world_size):
    with pytest.raises(ValueError, match=rf"FlatLayout world_size={world_size!r}"):
        FlatLayout([(3,)], world_size)
