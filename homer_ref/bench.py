"""`python -m homer_ref.bench`: the command is homer_ref/cli/bench.py (also installed as `homer-bench`)."""

from homer_ref.cli.bench import entry

if __name__ == "__main__":
    entry()
