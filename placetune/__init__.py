"""placetune: measure llama.cpp tensor placements and pick the fastest for this machine."""

__version__ = "0.1.0"
