"""The part of the ``socket`` module the engine uses, on the C module ``_socket`` alone.

``socket.py`` turns hundreds of constants into enums when it is imported (``AddressFamily``,
``SocketKind``, ``MsgFlag``, ``AddressInfo``): 2-4 ms of every start-up and about 300 KiB of an
idle init's memory, for names the engine never prints. Here the constants are the plain ints
``_socket`` has (they compare equal to the enums), and :class:`socket` adds to ``_socket.socket``
the few methods of socket.py's class the engine calls. The run-path modules import this module
*as* ``socket``; type checkers see the standard module (the names and signatures are the same).

Not here, on purpose: ``makefile``, ``sendfile`` and the enum-valued ``family``/``type`` (ints
here: :func:`activator.sockets.family_of` reads them without a conversion anyway). Code off the
run path (the proxy, the daemon library, the tests) uses the standard module, and takes these
sockets as they are: the same C object underneath.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from socket import *  # noqa: F403 - checkers see the standard module's names and types
else:
    import os

    import _socket
    from _socket import *  # noqa: F403 - the constants and functions, as ints and C functions

    class socket(_socket.socket):
        """``_socket.socket`` with socket.py's context manager, ``accept``, ``dup`` and inheritability."""

        __slots__ = ("__weakref__",)

        def __enter__(self) -> socket:
            return self

        def __exit__(self, *exc_info: object) -> None:
            self.close()

        def __repr__(self) -> str:
            closed = " [closed]" if self.fileno() == -1 else ""
            return f"<activator socket{closed} fd={self.fileno()}, family={self.family}, type={self.type}>"

        def accept(self) -> tuple[socket, object]:
            """As socket.socket.accept: the connection (blocking unless a default timeout is set), its peer."""
            fd, addr = self._accept()
            conn = socket(self.family, self.type, self.proto, fileno=fd)
            if getdefaulttimeout() is None and self.gettimeout():  # noqa: F405
                conn.setblocking(True)
            return conn, addr

        def dup(self) -> socket:
            conn = socket(self.family, self.type, self.proto, fileno=_socket.dup(self.fileno()))
            conn.settimeout(self.gettimeout())
            return conn

        def get_inheritable(self) -> bool:
            return os.get_inheritable(self.fileno())

        def set_inheritable(self, inheritable: bool) -> None:
            os.set_inheritable(self.fileno(), inheritable)

    def socketpair(family: int = AF_UNIX, type: int = SOCK_STREAM, proto: int = 0) -> tuple[socket, socket]:  # noqa: F405
        a, b = _socket.socketpair(family, type, proto)
        return socket(family, type, proto, a.detach()), socket(family, type, proto, b.detach())
