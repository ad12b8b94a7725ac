"""A config file for the ``--config`` flag that reads a run's saved ``config.json``.

  python -m ufo_jax.main --config=ufo_jax/run_config_file.py:/runs/x/config.json ...

``ufo_jax.main`` passes it by itself when ``--config.*`` overrides are given without
``--config`` and the run has a saved config (a rerun of ``--workdir``, or ``--mode=eval`` of a
checkpoint or an export folder): ml_collections only accepts overrides of a loaded config.
"""

from ufo_jax import config as config_lib


def get_config(path: str):
  if not path:
    raise config_lib.ConfigError('run_config_file.py needs the path of a config.json '
                                 '(--config=ufo_jax/run_config_file.py:PATH)')
  with open(path, encoding='utf-8') as f:
    return config_lib.config_from_json(f.read(), what=path)
