"""Roles of the sequences in a pair / mismatched-unit micro-batch (``batch["roles"]``).

Shared by the data path that builds the batches and the losses that read them; torch-free.
"""

CHOSEN, REJECTED, KL_SAMPLE = (
    1,
    -1,
    0,
)  # mismatched units: desirable = CHOSEN, undesirable = REJECTED
