"""``python -m clipn_train`` (what ``torchrun … -m clipn_train`` launches): the ``clipn-train`` CLI."""

from clipn_train.cli import main

main()
