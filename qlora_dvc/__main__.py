"""`python -m qlora_dvc <command> ...`: the same as the `qlora-dvc` console script."""
import sys

from qlora_dvc.cli import main

sys.exit(main())
