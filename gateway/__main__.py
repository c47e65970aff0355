"""`python -m gateway`: the `duragate` command line."""

from gateway.cli import run

if __name__ == "__main__":
    run()
