"""`python -m homer_ref.generate`: the command is homer_ref/cli/generate.py (also installed as `homer-generate`)."""

from homer_ref.cli.generate import entry

if __name__ == "__main__":
    entry()
