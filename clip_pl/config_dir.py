"""Where the Hydra configs live (``clip_pl/conf/``, shipped inside the package, wheel included), and
the one resolver they use. Everything that composes clip_pl's configs goes through here.

``clip_pl.train``, ``clip_pl.eval``, the tests and the benchmarks all ask ``config_dir()``, so
``pip install clip_pl`` (not editable) runs ``clip-pl-train`` from any directory.

Your own configs: ``clip-pl-train --config-dir /my/conf experiment=mine`` adds a folder to the
search path (its files win over the package's of the same name), or list it under
``hydra.searchpath`` in a config of your own.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

_CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def config_dir() -> str:
    """Absolute path of the packaged Hydra config folder (``train.yaml``, ``eval_app.yaml``, the groups)."""
    return str(_CONFIG_DIR)


def per_device_batch(default: int, _root_) -> int:
    """``data.batch_size: ${per_device_batch:256}`` in the data configs: ``global_batch_size`` divided by
    the world size when that is set, else the data config's own default. A value written anywhere else
    (command line, experiment file) replaces the interpolation, and ``clip_pl.config_checks`` refuses it
    if it disagrees with ``global_batch_size``."""
    global_batch = _root_.get("global_batch_size")
    if global_batch is None:
        return default
    devices, nodes = _root_.trainer.get("devices"), _root_.trainer.get("num_nodes", 1)
    if not (isinstance(devices, int) and isinstance(nodes, int)) or global_batch % (devices * nodes):
        raise ValueError(
            f"global_batch_size={global_batch} does not divide over trainer.devices={devices!r} × "
            f"trainer.num_nodes={nodes!r}."
        )
    return global_batch // (devices * nodes)


OmegaConf.register_new_resolver("per_device_batch", per_device_batch, replace=True)
