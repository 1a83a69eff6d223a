"""nativeq: compiler-based edge deployment for speech recognition.

`nativeq.load(artifact_dir)` returns a callable compiled model (see `nativeq.runtime`).
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a compiled artifact directory; see `nativeq.runtime.load`."""
    from nativeq.runtime import load as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load"]
