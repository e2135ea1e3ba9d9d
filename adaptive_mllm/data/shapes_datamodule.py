"""The generated shapes-VQA set as a datamodule: LlavaDataModule over files it writes itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adaptive_mllm.data.directory_lock import DirectoryLock
from adaptive_mllm.data.llava_json import LlavaDataModule
from adaptive_mllm.data.shapes import (
    DEFAULT_QUESTION_KINDS,
    IMAGE_DIR,
    MAX_SHAPES,
    TOKENIZER_DIR,
    check_max_shapes,
    check_question_kinds,
    hold_shapes_vqa,
    is_generated,
)


class ShapesVQADataModule(LlavaDataModule):
    """Shapes-VQA (see :mod:`adaptive_mllm.data.shapes`), generated on first use by ``prepare_data``.

    The tokenizer trained on the generated text is written to ``{data_dir}/tokenizer``, where the tiny
    backbone's ``tokenizer`` argument points; ``prepare_data`` runs before ``configure_model``, so it
    exists by the time the model is built. Prediction answers the test split; a split of size 0 is
    not set (no validation, or no test split).

    ``data_dir`` holds one set: asking for another one there (other sizes, seed, question kinds or
    max_shapes) is refused with a FileExistsError naming both, never regenerated, since the runs trained
    on the set read its tokenizer; use another ``data_dir`` (or delete this one to regenerate it). From
    ``prepare_data`` (or ``setup``) to ``teardown`` the datamodule holds a shared lock on ``data_dir``,
    so the set is never completed or rewritten under a run that reads it.

    Args:
        data_dir: where the set lives (generated there if it is missing or incomplete; a directory holding
            a set made with other sizes / seed / kinds is refused).
        num_train: training examples.
        num_val: validation examples.
        num_test: test examples.
        seed: generation seed; the same seed gives byte-identical files.
        question_kinds: which kinds of question to ask, in equal shares (any of colour, shape, count,
            count_shape, left_of; by default colour, shape, count_shape).
        max_shapes: most shapes in one scene (1 to ``max_shapes``, one per cell of the 4x4 grid).
        batch_size: training batch size.
        eval_batch_size: validation / test / predict batch size; None = ``batch_size``.
        num_workers: DataLoader worker processes.
        skip_bad_records: warn about bad records and drop them instead of raising.
    """

    def __init__(
        self,
        data_dir: str = "data/shapes-vqa",
        num_train: int = 20_000,
        num_val: int = 1_000,
        num_test: int = 2_000,
        seed: int = 0,
        question_kinds: Sequence[str] = DEFAULT_QUESTION_KINDS,
        max_shapes: int = MAX_SHAPES,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        skip_bad_records: bool = False,
    ) -> None:
        directory = Path(data_dir)
        super().__init__(
            train_json=str(directory / "train.json"),
            val_json=str(directory / "val.json") if num_val > 0 else None,
            test_json=str(directory / "test.json") if num_test > 0 else None,
            predict_json=str(directory / "test.json") if num_test > 0 else None,
            image_folder=str(directory / IMAGE_DIR),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            skip_bad_records=skip_bad_records,
        )
        self.data_dir = directory
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.seed = seed
        self.kinds_to_ask = check_question_kinds(question_kinds)
        self.max_shapes = check_max_shapes(max_shapes)
        self._lock: DirectoryLock | None = None

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / TOKENIZER_DIR

    def prepare_data(self) -> None:
        """Generate the set unless ``meta.json`` says it is already there (then this is instant), and
        hold it until ``teardown``."""
        self.teardown("prepare_data")
        self._lock = hold_shapes_vqa(self.data_dir, self.num_train, self.num_val, self.num_test, self.seed, self.kinds_to_ask, self.max_shapes)

    def setup(self, stage: str) -> None:
        if self._lock is None and self.data_dir.is_dir():  # e.g. a DDP rank other than the one that prepared
            self._lock = DirectoryLock(self.data_dir)
            self._lock.shared()
        if not is_generated(self.data_dir, self.num_train, self.num_val, self.num_test, self.seed, self.kinds_to_ask, self.max_shapes):
            self.teardown(stage)
            raise RuntimeError(
                f"{self.data_dir} does not hold the shapes-VQA set asked for (sizes {self.num_train} / "
                f"{self.num_val} / {self.num_test}, seed {self.seed}, kinds {list(self.kinds_to_ask)}, max_shapes {self.max_shapes}): "
                "call prepare_data() first"
            )
        super().setup(stage)

    def teardown(self, stage: str) -> None:
        """Let other runs replace the set again."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
