"""harp's version, in a module of its own so that every module can import it without importing the
package root (which imports nearly everything)."""

__version__ = "0.1.0"
