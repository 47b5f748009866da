"""Shared code of the QLoRA-on-SNLI pipeline: each stage script in stages/ imports from here."""
