"""α-query expansion (αQE, Radenović et al., TPAMI 2018).

The query descriptor is replaced by the normalized sum of itself and its top-n neighbours,
each weighted by its similarity to the query raised to α, and the index is searched again.
Neighbours of the same object pull the query towards views it did not match at first; α > 0
lets weak (likely wrong) neighbours count for little. With n=0 search is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.descriptors.pooling import l2_normalize


@dataclass(frozen=True)
class QueryExpansion:
    """αQE settings; chosen on oxford-dev (README, "Choosing the defaults")."""

    n: int = 3  # neighbours added to the query (0 turns expansion off)
    alpha: float = 3.0

    def __post_init__(self) -> None:
        if self.n < 0 or self.alpha < 0:
            raise ValueError("query expansion needs n >= 0 and alpha >= 0")


def alpha_query_expansion(
    queries: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray, alpha: float
) -> np.ndarray:
    """Expanded queries (nq, d) from queries (nq, d), neighbours (nq, n, d), similarities (nq, n).

    Negative similarities get weight 0; so do padding neighbours given similarity 0.
    """
    weights = np.power(np.clip(similarities, 0.0, None), alpha)
    expanded = queries + np.einsum("qn,qnd->qd", weights, neighbours)
    return l2_normalize(expanded).astype(np.float32)
