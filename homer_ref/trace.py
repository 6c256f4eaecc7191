"""`python -m homer_ref.trace`: the command is homer_ref/cli/trace.py (also installed as `homer-trace`)."""

from homer_ref.cli.trace import entry

if __name__ == "__main__":
    entry()
