"""Speculative decoding by n-gram prompt lookup: propose draft tokens, then accept or reject them.

A step that verifies ``k`` drafts feeds ``[last token, d_1 .. d_k]`` to the model at once (a short chunk
over the cached context) and gets ``k + 1`` next-token distributions ``p_0 .. p_k``. Draft ``d_i`` is checked
against ``p_{i-1}``:

* greedy: accepted while it equals the argmax; the first mismatch is replaced by the argmax;
* sampled: the draft comes from a deterministic proposer (all its mass on ``d_i``), so standard rejection
  sampling accepts it with probability ``p(d_i)`` and otherwise draws from ``p`` with ``d_i`` removed, which
  leaves every output token distributed exactly as plain sampling would.

If every draft is accepted, ``p_k`` gives one more ("bonus") token. So a step yields 1 to ``k + 1`` tokens.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the sequence's last n tokens.

    Tries the longest suffix first (``n_max`` down to ``n_min``); returns [] when nothing matches.
    """
    total = len(token_ids)
    if k < 1 or total < n_min + 1:
        return []
    # NOTE: only the tail can contain a match whose continuation we can use, but a match anywhere counts;
    # numpy keeps the scan of a few thousand tokens well under a millisecond.
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        suffix = tokens[total - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)  # starts 0 .. total - n - 1
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: the most local context
            return token_ids[start : start + k]
    return []
