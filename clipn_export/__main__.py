"""``python -m clipn_export`` is ``clipn-export``."""

from clipn_export.cli import main

if __name__ == "__main__":
    main(prog_name="clipn-export")
