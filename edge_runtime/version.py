"""The tool's version, one place: setup.cfg, ``--version`` on every command, every summary JSON, card and report.

Kept in a module of its own with no imports so that setup.cfg can read it statically and a device install without
TensorFlow prints it without loading an interpreter.
"""
__version__ = "0.2.0"
