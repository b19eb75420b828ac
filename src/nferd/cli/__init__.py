"""The ``nferd`` command: argument parsing, configuration files and one function per verb."""

from .main import main

__all__ = ["main"]
