"""Command-line tools: assets, tiny models, the export tool, the embedded server (installed as templar.tools)."""
