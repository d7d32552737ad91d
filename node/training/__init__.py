"""Dataset export and model training helpers (need the AI extras, see docs/ai-backends.md)."""
