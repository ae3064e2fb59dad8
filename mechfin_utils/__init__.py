"""mechfin_utils: the tested code behind mechfin's notebooks (one module per concept)."""

__version__ = "0.1.0"
