"""`make bench`: a typical PyTorch reproduction against our runner, side by side (see bench/cli.py)."""
