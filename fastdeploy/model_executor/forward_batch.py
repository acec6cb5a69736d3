"""The flattened (varlen) batch one model step runs on: all sequences' new tokens concatenated."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle


@dataclass
class ForwardBatch:
    """Tensors describing one step. Sequence i owns rows query_start_loc[i]:query_start_loc[i+1]."""

    input_ids: paddle.Tensor  # int64 [num_tokens]
    positions: paddle.Tensor  # int64 [num_tokens]
    slot_mapping: paddle.Tensor  # int64 [num_tokens], block_id * block_size + offset
    block_tables: paddle.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: paddle.Tensor  # int32 [num_seqs], tokens in cache after this step's writes
    query_start_loc: paddle.Tensor  # int32 [num_seqs + 1]
    logits_indices: paddle.Tensor  # int64 [num_logits], rows whose logits are wanted

    @classmethod
    def build(
        cls,
        token_chunks: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        logits_rows: list[int] | None = None,
    ) -> "ForwardBatch":
        """Assemble a batch from per-sequence token chunks.

        token_chunks[i] are the new tokens of sequence i, placed at positions start_positions[i]...;
        block_tables[i] must already cover every position written. By default the logits of each
        sequence's last new token are computed.
        """
        lens = [len(c) for c in token_chunks]
        ids = np.fromiter((t for c in token_chunks for t in c), dtype=np.int64, count=sum(lens))
        positions = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(start_positions, lens)])
        slots = np.empty_like(positions)
        offset = 0
        for table, start, n in zip(block_tables, start_positions, lens):
            pos = np.arange(start, start + n)
            slots[offset:offset + n] = np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size
            offset += n
        width = max(len(t) for t in block_tables)
        tables = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = t
        qsl = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=qsl[1:])
        ctx = np.asarray([s + n for s, n in zip(start_positions, lens)], dtype=np.int32)
        rows = np.asarray(logits_rows if logits_rows is not None else qsl[1:] - 1, dtype=np.int64)
        return cls(
            input_ids=paddle.to_tensor(ids),
            positions=paddle.to_tensor(positions),
            slot_mapping=paddle.to_tensor(slots),
            block_tables=paddle.to_tensor(tables),
            context_lens=paddle.to_tensor(ctx),
            query_start_loc=paddle.to_tensor(qsl),
            logits_indices=paddle.to_tensor(rows),
        )
