"""`python -m homer_ref.conformance`: the command is homer_ref/cli/conformance.py (also `homer-conformance`)."""

from homer_ref.cli.conformance import entry

if __name__ == "__main__":
    entry()
