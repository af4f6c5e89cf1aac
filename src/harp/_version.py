"""harp's version, in a module of its own so that every module can import it without importing the
package root (which imports nearly everything). The one place it is written: pyproject.toml reads it
from here (setuptools' dynamic version)."""

__version__ = "0.1.0"
