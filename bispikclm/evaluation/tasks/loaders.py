"""Dataset loader for the lm-evaluation-harness task YAMLs beside this file (``custom_dataset: !function``).

lm-eval calls it with the run's metadata (model arguments, ``--metadata``) and the task's ``dataset_kwargs``;
``data_dir`` may come from ``--metadata '{"data_dir": "..."}'``, else ``$BISPIKCLM_DATA`` or the default."""

from datasets import Dataset, DatasetDict

from bispikclm.evaluation.tasks import TASKS, read_task


def load(task: str, data_dir: str | None = None, **_) -> DatasetDict:
    """The items of our task ``task`` as the ``test`` split."""
    return DatasetDict({"test": Dataset.from_list(read_task(TASKS[task], data_dir))})
