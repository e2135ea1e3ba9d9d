"""The errors and warnings of bad data: each names the file, the record and the field.

A module of its own, free of the data package's other imports, so that code below the data loaders (the run's
checkpoints) can tell a bad record from other failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A record that cannot be used; the message names the JSON file, the record and the field.

    Build one with :meth:`at`. The plain one-argument form ``DataError(message)`` also works, so that a
    DataLoader worker's error is re-raised in the main process as a DataError, message intact.
    """

    # Under several processes a bad record met by one stops every process at the same batch (LlavaDataModule
    # decides it together), so the run's checkpoint can save the state they all stopped in
    stopped_together: bool = False  # every process of the run raised one at this same batch
    met_by_process: int | None = None  # the process whose batch held the record, where it is not this one

    def __init__(
        self,
        message: str,
        json_path: str | None = None,
        record_id: Any = None,
        index: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.json_path = json_path
        self.record_id = record_id
        self.index = index
        self.field = field
        self.reason = reason

    @classmethod
    def at(
        cls,
        json_path: str | Path,
        reason: str,
        record_id: Any = None,
        index: int | None = None,
        field: str | None = None,
    ) -> DataError:
        """``{json_path}, record id {id!r} (index {index}), field {field!r}: {reason}``."""
        where = str(json_path)
        if index is not None:
            where += f", record id {record_id!r} (index {index})"
        if field is not None:
            where += f", field {field!r}"
        return cls(f"{where}: {reason}", str(json_path), record_id, index, field, reason)

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.json_path, self.record_id, self.index, self.field, self.reason)


class DataWarning(UserWarning):
    """A bad record dropped because ``skip_bad_records`` is on (the message is the DataError's)."""
