"""The package version, in a module of its own so any stage can report it without importing the
package's top level."""

__version__ = "0.1.0"
