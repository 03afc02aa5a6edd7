"""activator: a socket-activation launcher and supervisor.

Daemon authors: ``activator.listen_fds()``, ``activator.listen_fds_with_names()``
and ``activator.notify()``; tests: ``activator.testing``.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "listen_fds", "listen_fds_with_names", "notify"]


def __getattr__(name):  # lazy, so that `activator --version` imports nothing it does not need
    if name in ("listen_fds", "listen_fds_with_names"):
        from . import protocol

        return getattr(protocol, name)
    if name == "notify":
        from .sdnotify import notify

        return notify
    raise AttributeError(f"module 'activator' has no attribute {name!r}")
