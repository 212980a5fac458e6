"""When a read of an epoch's data was asked for, handed its first item over and ran out.

The ring's reads (:class:`~lepton_ray.train.ring_reader.RemoteBlocks`) and the streamed feed's
(:class:`~lepton_ray.train.readahead.ReadAhead`) record one :class:`ReadTimes` each; the training
loop reports it with the epoch (``read_ahead_s``, ``read_first_block_s``, ``read_s``). Imports
neither torch nor Ray: the ring's reader actor runs without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadTimes:
    """When one read was asked for, handed its first block (the ring's) or batch (the streamed
    feed's) over and ran out (``time.time()``; None until then, and ``done`` for good if the read
    was stopped first), and what it handed over; :meth:`seconds` puts them against the start of
    the epoch it serves."""

    requested: float
    first_block: float | None = None
    done: float | None = None
    blocks: int = 0
    rows: int = 0

    def seconds(self, epoch_started: float) -> dict[str, float]:
        """``read_ahead_s``: how long before the epoch began its read was asked for (0 when the
        epoch asked); ``read_first_block_s``: from the ask to the first block or batch;
        ``read_s``: to the read's end (absent while it runs, as in a mid-epoch report)."""
        out = {"read_ahead_s": round(max(epoch_started - self.requested, 0.0), 3)}
        if self.first_block is not None:
            out["read_first_block_s"] = round(self.first_block - self.requested, 3)
        if self.done is not None:
            out["read_s"] = round(self.done - self.requested, 3)
        return out
