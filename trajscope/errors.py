"""The exception types for bad input: the CLI prints the message as one line and exits non-zero."""

from __future__ import annotations


class TrajscopeError(Exception):
    """Bad input (not a run, wrong format version, missing chunk, mismatched model, ...).

    The message is one line naming what is wrong and what to do.
    """


class DamagedRecordError(TrajscopeError):
    """A recorded record, or an array it is read from, failed its check on read: a CRC32C mismatch,
    a missing or cut-short shard file, an empty index entry, a missing or unreadable ``zarr.json``.

    The damage is local: other steps may still read (an analysis can skip this one).

    Attributes:
        step: the training step of the damaged record, or None where it is not known (the probe
            batch, an array document needed by every step).
        array: the array's name inside the store (``params/float32``, ``batch/.0``, ...).
        problem: what is wrong, in a few words.
        store: the store's path.
    """

    def __init__(self, store: object, array: str, step: int | None, problem: str) -> None:
        self.store, self.array, self.step, self.problem = str(store), array, step, problem
        if step is None:
            what, advice = array, "what it holds cannot be trusted"
        else:
            what, advice = f"step {step} of {array}", "the record cannot be trusted; other steps can still be analysed"
        super().__init__(f"{self.store}: {what} is damaged ({problem}): {advice}")

    def __reduce__(self):  # picklable (e.g. across worker processes) despite the custom signature
        return type(self), (self.store, self.array, self.step, self.problem)
