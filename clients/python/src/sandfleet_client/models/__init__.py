"""Message models generated from schemas/*.v1.schema.json (scripts/gen_models.py)."""
