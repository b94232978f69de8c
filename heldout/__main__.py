"""`python -m heldout OUT_DIR ...`: write a held-out set (heldout.cli)."""

from heldout.cli import main

main()
