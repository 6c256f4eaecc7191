"""`python -m homer_ref.eval`: the command is homer_ref/cli/eval.py (also installed as `homer-eval`)."""

from homer_ref.cli.eval import entry

if __name__ == "__main__":
    entry()
