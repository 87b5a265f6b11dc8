"""pgolf: a staged, cached, checked pipeline for the Parameter Golf challenge."""

__version__ = "0.1.0"
