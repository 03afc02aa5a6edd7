"""activator: a socket-activation launcher and supervisor.

Daemon authors: ``activator.daemon`` is python-systemd's ``systemd.daemon`` in pure
Python (``listen_fds()``, ``notify()``, ``is_socket()``, ...; the first three are also
here at the top level); ``activator.listen_sockets()`` and
``activator.listen_sockets_with_names()`` return the passed sockets as socket objects.
Tests: ``activator.testing``.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "listen_fds", "listen_fds_with_names", "listen_sockets", "listen_sockets_with_names",
           "notify"]


def __getattr__(name: str) -> object:  # lazy, so that `activator --version` imports nothing it does not need
    if name in ("listen_fds", "listen_fds_with_names", "notify"):
        from . import daemon

        return getattr(daemon, name)
    if name in ("listen_sockets", "listen_sockets_with_names"):
        from . import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'activator' has no attribute {name!r}")
