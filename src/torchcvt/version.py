"""The package version: one place, read by torchcvt.__version__ and `torchcvt --version`."""

__version__ = "0.1.0"
