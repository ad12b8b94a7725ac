"""Converts raw datasets to ArrayRecord with the tfds builders of data_prep.builders.

  python -m data_prep.build --dataset=market1501 --raw_dir=/data/Market-1501-v15.09.15 \\
      --out_dir=/data/tfds
  python -m data_prep.build --dataset=all --raw_root=/data/raw --out_dir=/data/tfds
  python -m data_prep.build --dataset=ms1mv3 --raw_dir=... --out_dir=... --beam \\
      --beam_options=--runner=DataflowRunner,--project=...
  python -m data_prep.build --dataset=shoes --layout=csv --task=shoes --raw_dir=/data/shoes \\
      --out_dir=/data/tfds        # a custom set (data_prep.custom, docs/CUSTOM_DATA.md)

Output: ``<out_dir>/<name>/1.0.0/`` (read it with
``tfds.builder_from_directory(path).as_data_source(split)``). Before converting,
the listed images/ids per split are checked against ufo_jax/catalog.py (a
mismatch means a wrong or partial download) unless ``--skip_count_check``.
Corrupt images are skipped and named in the summary, or are an error with
``--strict``.

Every output records how it was built (``builder.info.metadata['provenance']``), including the
size and SHA-256 of every shard file. An existing output is reused only when it was built by
this data_prep version from the same raw folder with the same options and is complete, with
every shard of the recorded size and checksum. One built the same way but incomplete or
damaged (a truncated or altered shard) is rebuilt; otherwise the command stops and names what
differs (``--overwrite`` rebuilds it).

A conversion writes into a temporary folder beside the output (``<out_dir>/.<name>.build-*``)
and moves it into place only after it finished and passed every check, so an existing set is
replaced only by a complete one: an error (a wrong raw folder, a failed count check) or an
interrupt (Ctrl-C, SIGTERM) leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from typing import Any, Iterable, Sequence

import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath

import data_prep
from data_prep import builders, custom, ufo_archive
from ufo_jax import catalog

FLAGS = flags.FLAGS


@dataclasses.dataclass
class SplitSummary:
  """What one split of a converted dataset holds."""

  examples: int  # images (pairs for face sets)
  ids: int | None  # distinct identities (None for face pair sets)
  skipped: int  # corrupt or unreadable images (pairs) left out
  skipped_files: list[str]  # their paths (first builders.MAX_SKIPPED_NAMES)


@dataclasses.dataclass
class Summary:
  """The result of converting one dataset."""

  dataset: str
  path: str  # <out_dir>/<dataset>/1.0.0
  splits: dict[str, SplitSummary]
  seconds: float
  reused: bool = False  # the output existed already and was not rebuilt
  built: str = ''  # how it was built: raw folder and count check (from its provenance)

  def format(self, max_names: int = 20) -> str:
    """A human-readable table of the counts per split and the skipped files."""
    lines = [f'{self.dataset}: {self.path}' + (' (existing output reused)' if self.reused else
                                               f' ({self.seconds:.1f} s)')]
    if self.built:
      lines.append(f'  {self.built}')
    unit = 'pairs' if self.splits and all(s.ids is None for s in self.splits.values()) else 'images'
    lines.append(f'  {"split":12s} {unit:>10s} {"ids":>8s} {"skipped":>8s}')
    for name, s in self.splits.items():
      ids = '-' if s.ids is None else str(s.ids)
      lines.append(f'  {name:12s} {s.examples:10d} {ids:>8s} {s.skipped:8d}')
      for path in s.skipped_files[:max_names]:
        lines.append(f'    skipped: {path}')
      if len(s.skipped_files) > max_names:
        lines.append(f'    ... and {s.skipped - max_names} more (see metadata.json)')
    return '\n'.join(lines)


def raw_dir_of(dataset: str, raw_root: str) -> str:
  """Where ``dataset`` lives under a raw root (face sets: the root, see find_face_source).

  Under UFO's test archive (``data_prep.ufo_archive``) the archive's folder names.
  """
  if ufo_archive.is_archive_root(raw_root):
    return ufo_archive.raw_dir_of(dataset, raw_root) or os.path.join(raw_root, dataset)
  info = catalog.get(dataset)
  if dataset in builders.BUILDERS and builders.BUILDERS[dataset].pairs:
    return raw_root
  return os.path.join(raw_root, info.raw_folder)


class ReuseError(ValueError):
  """An existing output was built differently from what is asked (pass overwrite)."""


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:300]}' + ('...' if len(text) > 300 else '')


def shard_differences(path: str, splits: Iterable[str], record: dict[str, Any], *,
                      checksums: bool = True) -> list[str]:
  """How the shard files of ``splits`` of the set at ``path`` differ from the sizes and SHA-256
  recorded when it was built (``provenance['shards']``; empty: they match).
  ``checksums=False`` compares the sizes only."""
  shards = record.get('shards')
  if not shards:
    return ['it records no shard sizes or checksums (built before data_prep recorded them)']
  for split in splits:
    if split not in shards:
      return [f'it records no shards of split {split}']
    for entry in shards[split]:
      file = os.path.join(path, entry['file'])
      if not epath.Path(file).exists():
        return [f'it is incomplete ({file} is missing)']
      size = epath.Path(file).stat().length
      if size != entry['bytes']:
        return [f'it is damaged ({file} has {size} bytes, {entry["bytes"]} when built)']
      if checksums and builders.file_sha256(file) != entry['sha256']:
        return [f'it is damaged ({file} differs from the SHA-256 recorded when it was built)']
  return []


def reuse_differences(path: str, raw_dir: str, *, skip_count_check: bool,
                      strict: bool) -> list[str]:
  """Why the finished output at ``path`` cannot be reused for this build (empty: it can)."""
  try:
    info = tfds.builder_from_directory(path).info
  except Exception as e:  # noqa: BLE001 - a corrupt dataset_info.json
    return [f'its dataset_info.json cannot be read ({_one_line(e)})']
  record: dict[str, Any] = dict((info.metadata or {}).get('provenance') or {})
  expected = os.path.basename(os.path.dirname(os.path.normpath(path)))
  if info.name != expected:
    return [f'it holds the dataset {info.name!r} (its dataset_info.json), not {expected!r}']
  if not record:
    return ['it was built by an earlier data_prep (no provenance record; old image format)']
  out = []
  if record.get('data_prep_version') != data_prep.__version__:
    out.append(f'it was built by data_prep {record.get("data_prep_version")}, this is '
               f'{data_prep.__version__}')
  built_from = record.get('raw_dir')
  if not built_from or os.path.realpath(built_from) != os.path.realpath(raw_dir):
    out.append(f'it was built from {built_from}, not from {os.path.abspath(raw_dir)}')
  options = record.get('options') or {}
  for name, value in (('skip_count_check', skip_count_check), ('strict', strict)):
    if bool(options.get(name)) != value:
      out.append(f'it was built {"with" if options.get(name) else "without"} --{name}, '
                 f'now {"with" if value else "without"}')
  return out + completeness_differences(path, info, record)


def custom_differences(path: str, *, layout: str, task: str | None,
                       protocol: str | None) -> list[str]:
  """Why the custom set at ``path`` was built otherwise (layout, task, protocol) than asked."""
  record = catalog.read_custom(os.path.dirname(os.path.dirname(path)),
                               os.path.basename(os.path.dirname(path))) or {}
  out = []
  for field, value in (('layout', layout), ('task', task)) + (
      (('protocol', protocol),) if protocol else ()):
    if record.get(field) != value:
      out.append(f'it was built with --{field}={record.get(field)}, now --{field}={value}')
  return out


def completeness_differences(path: str, info: Any, record: dict[str, Any], *,
                             checksums: bool = True) -> list[str]:
  """Why the set at ``path`` (its ``info`` and provenance ``record``) is not complete and intact
  (empty: it is): the conversion did not finish, a count or a shard file differs."""
  counts = record.get('counts') or {}
  if not record.get('complete') or set(counts) != set(info.splits):
    return ['it is incomplete (the conversion did not finish)']
  out = []
  for split, sinfo in info.splits.items():
    if counts[split].get('examples') != sinfo.num_examples:
      out.append(f'it is incomplete ({split}: {sinfo.num_examples} examples, '
                 f'{counts[split].get("examples")} written)')
  return out + shard_differences(path, list(info.splits), record, checksums=checksums)


def summarize(dataset: str, path: str, seconds: float = 0.0, reused: bool = False) -> Summary:
  """Reads the summary of a converted dataset back from ``path`` (OUT/name/1.0.0)."""
  info = tfds.builder_from_directory(path).info
  md = info.metadata or {}
  splits = {}
  for split, sinfo in info.splits.items():
    skipped = [k['path'] for k in md.get('skipped', {}).get(split, [])]
    splits[split] = SplitSummary(
        examples=sinfo.num_examples, ids=md.get('num_ids', {}).get(split),
        skipped=md.get('num_skipped', {}).get(split, 0), skipped_files=skipped)
  known = catalog.get(dataset).splits if dataset in catalog.DATASETS else custom.SPLITS
  order = [s for s in known if s in splits]
  splits = {s: splits[s] for s in order + [s for s in splits if s not in order]}
  record = md.get('provenance') or {}
  check = record.get('count_check') or {}
  if md.get(catalog.CUSTOM_KEY):
    status = '\n  '.join(custom.summary_lines(dict(md[catalog.CUSTOM_KEY])))
  elif check.get('passed'):
    status = 'counts match the published release' + ('' if check.get('ran') else
                                                     ' (count check skipped)')
  else:
    status = ('PARTIAL: counts differ from the published release (--skip_count_check); '
              'training refuses it unless input.allow_partial_data=True')
  built = f'from {record.get("raw_dir")}; {status}' if record else ''
  if record.get('absent_splits'):  # UFO's test archive holds no train images
    built += (f'; {", ".join(record["absent_splits"])} split not in the raw data (UFO\'s test '
              'archive): evaluation only')
  return Summary(dataset, path, splits, seconds, reused, built)


def convert(dataset: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
            skip_count_check: bool = False, strict: bool = False, beam: bool = False,
            beam_runner: str | None = None, beam_options: Sequence[str] = (),
            overwrite: bool = False, beam_chunk_size: int = 2000, layout: str | None = None,
            task: str | None = None, protocol: str | None = None) -> Summary:
  """Converts ``dataset`` from its raw folder (or .bin) to ``out_dir/<dataset>/1.0.0``.

  Args:
    dataset: a name of ufo_jax.catalog.DATASETS, or with ``layout`` a custom set's name.
    raw_dir: the raw folder as downloaded (face sets: the .bin or its folder).
    out_dir: the tfds data_dir to write into.
    skip_count_check: convert even if the listing differs from catalog.py.
    strict: a corrupt or unreadable image is an error (else skipped and named).
    beam: run the conversion on Apache Beam with ``beam_options`` (pipeline
      flags such as ``--runner=DataflowRunner`` or ``--direct_num_workers=2``)
      and ``beam_runner`` (default: DirectRunner unless the flags name one).
    overwrite: rebuild an existing output (else it is reused when it was built by this
      data_prep version from the same raw folder with the same options and is complete,
      and ``ReuseError`` names what differs otherwise).
    beam_chunk_size: items per Beam work unit.
    layout, task, protocol: a custom set (``data_prep.custom``): its layout ('csv' or
      'folders'), its task and optionally its protocol ('reid' or 'retrieval'); it has no
      published counts (``skip_count_check`` is implied).
  Returns:
    the Summary (counts per split, skipped files).
  """
  if layout is not None:
    builder = custom.make_builder(dataset, layout=layout, task=task or '', protocol=protocol)
    skip_count_check = True
  elif dataset not in builders.BUILDERS:
    raise ValueError(f'unknown dataset {dataset!r}; known: {", ".join(builders.BUILDERS)} (a '
                     'set of your own: --layout=csv|folders --task=TASK, docs/CUSTOM_DATA.md)')
  else:
    builder = builders.BUILDERS[dataset]
  raw_dir, out_dir = os.fspath(raw_dir), os.fspath(out_dir)
  if not os.path.exists(raw_dir):
    raise FileNotFoundError(f'{dataset}: raw folder not found: {raw_dir}')
  path = os.path.join(out_dir, dataset, builders.VERSION)
  if epath.Path(path).is_dir() and not overwrite:
    if not (epath.Path(path) / 'dataset_info.json').exists():
      why = ['it holds no dataset_info.json (not a finished conversion)']
    else:
      why = reuse_differences(path, raw_dir, skip_count_check=skip_count_check, strict=strict)
      if layout is not None and not why:
        why = custom_differences(path, layout=layout, task=task, protocol=protocol)
    damage = [w for w in why if w.startswith(('it is incomplete', 'it is damaged'))]
    if why and len(damage) < len(why):
      raise ReuseError(f'{dataset}: {path} exists but {"; ".join(why)}; pass --overwrite to '
                       'rebuild it (or choose another --out_dir)')
    if not why:
      logging.info('%s: %s exists, built the same way; reusing it (pass overwrite to rebuild)',
                   dataset, path)
      return summarize(dataset, path, reused=True)
    # Built the same way but damaged or incomplete: rebuilt (it is replaced only once the new
    # set is complete), never reused.
    print(f'{dataset}: {path} {"; ".join(damage)}: rebuilding it', file=sys.stderr, flush=True)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  _remove_stale_builds(out_dir, dataset)
  # Built beside the output (same filesystem: the final move is a rename), moved into place
  # only when complete; any error or interrupt before that removes it and leaves `path` as is.
  staging = epath.Path(out_dir) / f'{_staging_prefix(dataset)}{uuid.uuid4().hex[:8]}'
  staging.mkdir()
  try:
    start = time.time()
    _prepare(builder, raw_dir, os.fspath(staging), skip_count_check=skip_count_check,
             strict=strict, beam=beam, beam_runner=beam_runner, beam_options=beam_options,
             beam_chunk_size=beam_chunk_size)
    built = os.fspath(staging / dataset / builders.VERSION)
    info = tfds.builder_from_directory(built).info
    why = completeness_differences(built, info, dict(info.metadata.get('provenance') or {}),
                                   checksums=False)
    if why:
      raise ValueError(f'{dataset}: the new conversion in {built} failed its check: '
                       f'{"; ".join(why)}')
    _swap_into_place(built, path)
  finally:
    if staging.exists():
      staging.rmtree()
  return summarize(dataset, path, time.time() - start)


def _staging_prefix(dataset: str) -> str:
  """Names the temporary folders of this process's builds of ``dataset``: host and pid, so
  that a later build can tell a killed build's folder from a running one's."""
  return f'.{dataset}.build-{socket.gethostname()}-{os.getpid()}-'


def _remove_stale_builds(out_dir: str, dataset: str) -> None:
  """Removes the temporary folders of earlier builds of ``dataset`` on this host whose
  process is gone (killed before it could clean up, or interrupted right after the swap);
  those of running builds are left alone."""
  prefix = f'.{dataset}.build-{socket.gethostname()}-'
  for entry in epath.Path(out_dir).glob(f'{prefix}*'):
    pid = entry.name[len(prefix):].split('-')[0]
    if not pid.isdigit() or not entry.is_dir():
      continue
    try:
      os.kill(int(pid), 0)
      continue  # still running
    except ProcessLookupError:
      pass
    except PermissionError:
      continue  # another user's live process
    logging.info('removing %s, left by an earlier build that was killed', entry)
    entry.rmtree()


def _swap_into_place(built: str, path: str) -> None:
  """Moves the finished set ``built`` to ``path``, replacing what is there. SIGINT/SIGTERM are
  held back during the two renames, so ``path`` is always either the old set or the new one."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  old = None
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
  try:
    if target.exists():
      old = target.parent.parent / (f'{_staging_prefix(target.parent.name)}'
                                    f'{uuid.uuid4().hex[:8]}-replaced')
      target.rename(old)
    try:
      epath.Path(built).rename(target)
    except OSError:
      if old is not None:
        old.rename(target)  # put the old set back
      raise
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
  if old is not None:
    old.rmtree()


def _prepare(builder_cls: Any, raw_dir: str, data_dir: str, *, skip_count_check: bool,
             strict: bool, beam: bool, beam_runner: str | None, beam_options: Sequence[str],
             beam_chunk_size: int) -> None:
  """Runs the tfds builder class into ``data_dir`` (``data_dir/<name>/1.0.0``)."""
  builder = builder_cls(
      raw_dir=raw_dir, strict=strict, check_counts=not skip_count_check, data_dir=data_dir,
      beam_chunk_size=beam_chunk_size)
  kwargs = {}
  if beam:
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
    options = list(beam_options)
    if beam_runner is None and not any(o.startswith('--runner') for o in options):
      beam_runner = 'DirectRunner'
    kwargs = dict(beam_runner=beam_runner, beam_options=PipelineOptions(options))
  with tempfile.TemporaryDirectory(prefix='data_prep_dl_') as tmp:
    builder.download_and_prepare(
        download_dir=tmp, download_config=tfds.download.DownloadConfig(**kwargs))


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('dataset', None, 'Dataset name, comma-separated names, or "all".')
  flags.DEFINE_string('raw_dir', None, 'Raw folder of one dataset (face: .bin or folder).')
  flags.DEFINE_string('raw_root', None, 'Folder holding the datasets under their '
                                  'standard names (with --dataset=all or several names).')
  flags.DEFINE_string('out_dir', None, 'tfds data_dir to write <name>/1.0.0/ into.')
  flags.DEFINE_bool('skip_count_check', False,
                                        'Do not compare the counts with the full-size release.')
  flags.DEFINE_bool('strict', False, 'A corrupt or unreadable image is an error.')
  flags.DEFINE_bool('overwrite', False, 'Rebuild outputs that exist already (otherwise one is '
                    'reused only when built the same way from the same raw folder).')
  flags.DEFINE_bool('beam', False, 'Convert on Apache Beam.')
  flags.DEFINE_string('beam_runner', None, 'Beam runner with --beam (default: '
                      'DirectRunner, or the --runner of --beam_options).')
  flags.DEFINE_list('beam_options', [], 'Beam pipeline flags with --beam.')
  flags.DEFINE_enum('layout', None, list(custom.LAYOUTS), 'A custom set of your own: '
                    'DIR/images.csv (csv) or DIR/<split>/<identity>/<images> (folders); needs '
                    '--task (docs/CUSTOM_DATA.md).')
  flags.DEFINE_string('task', None, 'With --layout: the task of the custom set (a config '
                      'task name, e.g. shoes).')
  flags.DEFINE_enum('protocol', None, list(custom.PROTOCOLS), 'With --layout: the evaluation '
                    'protocol (default: from the splits; query+gallery: reid, test: retrieval).')


def _interrupt(signum, frame) -> None:
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.dataset or not FLAGS.out_dir:
    raise app.UsageError('--dataset and --out_dir are required')
  if FLAGS.layout or FLAGS.task or FLAGS.protocol:
    _main_custom()
    return
  names = list(builders.BUILDERS) if FLAGS.dataset == 'all' else FLAGS.dataset.split(',')
  if FLAGS.dataset == 'all' and FLAGS.raw_root and ufo_archive.is_archive_root(FLAGS.raw_root):
    print(f'{FLAGS.raw_root}: UFO\'s test archive; not in it: '
          f'{", ".join(n for n in names if ufo_archive.raw_dir_of(n, FLAGS.raw_root) is None)}')
    names = [n for n in names if ufo_archive.raw_dir_of(n, FLAGS.raw_root) is not None]
  for name in names:
    catalog.get(name)  # a clear error for an unknown name
  if len(names) == 1 and FLAGS.raw_dir:
    raw_dirs = {names[0]: FLAGS.raw_dir}
  elif FLAGS.raw_root:
    raw_dirs = {n: raw_dir_of(n, FLAGS.raw_root) for n in names}
  else:
    raise app.UsageError('give --raw_dir for one dataset, or --raw_root')
  missing = []
  signal.signal(signal.SIGTERM, _interrupt)
  for name, raw_dir in raw_dirs.items():
    if FLAGS.dataset == 'all':
      try:
        if builders.BUILDERS[name].pairs:
          builders.find_face_source(name, raw_dir)
        elif not os.path.isdir(raw_dir):
          raise FileNotFoundError(f'{name}: folder not found: {raw_dir}')
      except FileNotFoundError as e:
        missing.append(str(e))
        print(f'not found, skipped: {e}')
        continue
    path = os.path.join(FLAGS.out_dir, name, builders.VERSION)
    kept = (f' ({path} is unchanged)' if FLAGS.overwrite and os.path.isdir(path) else '')
    try:
      summary = convert(name, raw_dir, FLAGS.out_dir, skip_count_check=FLAGS.skip_count_check,
                        strict=FLAGS.strict, beam=FLAGS.beam, beam_runner=FLAGS.beam_runner,
                        beam_options=FLAGS.beam_options, overwrite=FLAGS.overwrite)
    except (ValueError, OSError) as e:  # count check, reuse, layout and corrupt-file errors
      print(f'error: {e}{kept}', file=sys.stderr)
      sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (_interrupt)
      print(f'error: {name}: interrupted; the unfinished conversion was removed'
            f'{kept or f" (nothing was written to {path})"}', file=sys.stderr)
      sys.exit(130)
    print(summary.format(), flush=True)
  if missing:
    raise SystemExit('some datasets were not found under --raw_root:\n  ' + '\n  '.join(missing))


def _main_custom() -> None:
  """``--layout``: one custom set from --raw_dir (data_prep.custom)."""
  if not FLAGS.layout or not FLAGS.task or not FLAGS.raw_dir:
    raise app.UsageError('a custom set needs --layout=csv|folders, --task=TASK and --raw_dir')
  name = FLAGS.dataset
  path = os.path.join(FLAGS.out_dir, name, builders.VERSION)
  kept = (f' ({path} is unchanged)' if FLAGS.overwrite and os.path.isdir(path) else '')
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    summary = convert(name, FLAGS.raw_dir, FLAGS.out_dir, strict=FLAGS.strict,
                      overwrite=FLAGS.overwrite, layout=FLAGS.layout, task=FLAGS.task,
                      protocol=FLAGS.protocol, beam=FLAGS.beam, beam_runner=FLAGS.beam_runner,
                      beam_options=FLAGS.beam_options)
  except (ValueError, OSError) as e:  # bad input (custom.InputError), reuse, corrupt files
    print(f'error: {e}{kept}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print(f'error: {name}: interrupted; the unfinished conversion was removed'
          f'{kept or f" (nothing was written to {path})"}', file=sys.stderr)
    sys.exit(130)
  print(summary.format(), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
