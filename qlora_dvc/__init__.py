"""User commands of the qlora-dvc project (not DVC stages): `qlora-dvc <command>`, see cli.py."""
