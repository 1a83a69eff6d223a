"""Targets are data: one entry per device, read from `builtin.json` and user files.

Code asks a target what it has (`has_vnni`, `has_dotprod`, `is_cross`, `int8`), never its
name. Users add or override entries with a JSON file of the same shape, named by
`--targets-file`, by `$NATIVEQ_TARGETS`, or found at `~/.config/nativeq/targets.json`; an
entry may say `"inherit": "rpi5"` and change only some fields.
"""

from nativeq.targets.registry import (
    Target,
    get_target,
    host_cpu_features,
    list_targets,
    set_user_targets_file,
)

__all__ = ["Target", "get_target", "host_cpu_features", "list_targets", "set_user_targets_file"]
