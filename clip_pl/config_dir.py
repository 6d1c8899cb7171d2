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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def global_batch_problem(global_batch, devices, nodes) -> str | None:
    """Why ``global_batch_size`` cannot be split over ``trainer.devices`` × ``trainer.num_nodes``, in the
    keys and values the user gave, with the fix; None when it splits. ``per_device_batch`` below and
    ``clip_pl.config_checks`` both ask this, so a bad value reads the same wherever it is first met."""
    per_device = "or set global_batch_size=null and give data.batch_size per device"
    if not _is_int(global_batch) or global_batch < 1:
        return (
            f"global_batch_size={global_batch!r} must be a positive integer (the batch of all devices together), "
            f"{per_device}."
        )
    if not (_is_int(devices) and _is_int(nodes)):
        return (
            f"global_batch_size={global_batch} is divided over trainer.devices × trainer.num_nodes, which must then be "
            f"integers (got trainer.devices={devices!r}, trainer.num_nodes={nodes!r}); set both, {per_device}."
        )
    if devices == -1:
        return (
            f"trainer.devices=-1 (Lightning: every GPU of the node) does not say how many devices share "
            f"global_batch_size={global_batch}; set trainer.devices to the number of devices per node, {per_device}."
        )
    if devices < 1:
        return f"trainer.devices={devices} must be a positive number of devices per node (1 on a CPU)."
    if nodes < 1:
        return f"trainer.num_nodes={nodes} must be a positive number of nodes."
    world = devices * nodes
    if global_batch % world:
        return (
            f"global_batch_size={global_batch} is not divisible by the {world} devices ({nodes} nodes × {devices}); "
            f"pick a global batch that is a multiple of {world}, {per_device}."
        )
    return None


def per_device_batch(default: int, _root_) -> int:
    """``data.batch_size: ${per_device_batch:256}`` in the data configs: ``global_batch_size`` divided by
    the world size when that is set, else the data config's own default. A value written anywhere else
    (command line, experiment file) replaces the interpolation, and ``clip_pl.config_checks`` refuses it
    if it disagrees with ``global_batch_size``."""
    global_batch = _root_.get("global_batch_size")
    if global_batch is None:
        return default
    devices, nodes = _root_.trainer.get("devices"), _root_.trainer.get("num_nodes", 1)
    problem = global_batch_problem(global_batch, devices, nodes)
    if problem:
        raise ValueError(problem)
    return global_batch // (devices * nodes)


OmegaConf.register_new_resolver("per_device_batch", per_device_batch, replace=True)
