"""ufo-jax input pipeline: grain sources, identity sampling, augmentation, batch mixing.

Public entry points (see docs/INPUT.md):

* ``create_train_dataset(config, data_dir)``: grain ``IterDataset`` of this
  process's mixed batches ``{'image', 'label', 'task'}``; resumable (state
  ``{'step': n}``, saved with ``grain.checkpoint.CheckpointSave``).
* ``open_training_data(config, data_dir)``: checks the sets' provenance once, returns
  ``TrainingData(sources, num_classes)`` (``num_classes``: {task: identities of its label space});
  ``build_train_dataset(config, sources)`` then makes the dataset.
* ``create_eval_dataset(data_dir, dataset, split, *, image_size, batch_size, ...)``:
  in-order, padded evaluation batches with a validity ``mask``.
* ``load_pairs_labels(data_dir, dataset)``: ``is_same`` of a face verification set.
* ``open_split(data_dir, dataset, split)``: raw random access to a converted split.
* ``provenance.check_sets(data_dir, names, allow_partial=...)``: logs how each set was built,
  refuses partial sets (``PartialDataError``).

The names are imported lazily (PEP 562), so ``from ufo_jax.data import
device_ops`` does not pull in grain, PIL or tensorflow_datasets.
"""

import importlib

_EXPORTS = {
    'augment': ('AugmentParams', 'DecodeError', 'auto_augment', 'decode_failure_counts',
                'decode_image', 'eval_transform', 'train_transform'),
    'eval_input': ('EvalDataset', 'create_eval_dataset', 'load_pairs_labels', 'pairs_labels',
                   'split_info'),
    'mixing': ('BatchMaker',),
    'pipeline': ('TrainDataset', 'TrainIterator', 'TrainingData', 'build_train_dataset',
                 'create_train_dataset', 'open_training_data'),
    'provenance': ('PartialDataError', 'check_sets'),
    'sampling': ('IdentitySampler', 'TaskChooser', 'UniformSampler'),
    'sources': ('MemorySplit', 'OldFormatError', 'TaskSource', 'TfdsSplit', 'builder_dir',
                'open_split', 'open_task_sources'),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name in _WHERE:
    value = getattr(importlib.import_module(f'{__name__}.{_WHERE[name]}'), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(__all__))
