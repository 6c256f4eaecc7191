"""`python -m homer_ref.compare`: the command is homer_ref/cli/compare.py (also installed as `homer-compare`)."""

from homer_ref.cli.compare import entry

if __name__ == "__main__":
    entry()
