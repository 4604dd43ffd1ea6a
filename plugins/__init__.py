"""Built-in plugins of bridged (installed as the ``bridge_plugins`` package).

Each module here uses only the public API exported by :mod:`bridge`.
"""
