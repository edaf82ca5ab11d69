"""``python -m clipn_runtime`` is ``clipn-detect``."""

from clipn_runtime.cli import main

if __name__ == "__main__":
    main(prog_name="clipn-detect")
