"""The KV layout's arithmetic matches the torch buffer the engine allocates and the views attention uses."""

import torch

from tandem.engine.core.kv_layout import KVCacheLayout


def test_a_block_is_one_contiguous_span_and_rows_index_the_row_view():
    layout = KVCacheLayout(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    buffer = torch.arange(layout.total_bytes // layout.element_size, dtype=torch.float32).view(layout.shape)
    flat = buffer.view(-1)
    per_block = layout.bytes_per_block_all_layers // layout.element_size
    for block in range(layout.num_blocks):
        start = layout.block_offset(block) // layout.element_size
        # Everything block `block` holds, every layer, K and V, every head, is one span: one transfer descriptor.
        assert torch.equal(buffer[block].reshape(-1), flat[start : start + per_block])
    rows = buffer.view(-1, layout.block_size * layout.head_dim)
    assert rows.shape[0] == layout.num_blocks * layout.rows_per_block
    for block, layer, kind, head in [(0, 0, 0, 0), (4, 2, 1, 1), (2, 1, 0, 1), (3, 0, 1, 0)]:
        row = layout.row_index(block, layer, kind, head)
        assert torch.equal(rows[row].view(layout.block_size, layout.head_dim), buffer[block, layer, kind, head])
