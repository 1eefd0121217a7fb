"""What the command-line tools (sample.py, benchmark.py, evaluate.py) share: checking a user's
input before any work starts, and writing files whole."""
