"""`python -m homer_ref.explain`: the command is homer_ref/cli/explain.py (also installed as `homer-explain`)."""

from homer_ref.cli.explain import entry

if __name__ == "__main__":
    entry()
