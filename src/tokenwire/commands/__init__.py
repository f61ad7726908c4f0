"""The client commands of the ``tokenwire`` program (``generate``, ``chat``): they talk to a running server
through :mod:`tokenwire.client` and need none of the server's packages."""
