"""`python -m homer_ref.calibrate`: the command is homer_ref/cli/calibrate.py (also installed as `homer-calibrate`)."""

from homer_ref.cli.calibrate import entry

if __name__ == "__main__":
    entry()
