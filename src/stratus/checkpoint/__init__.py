"""DCP checkpoints: atomic save with a verified manifest, load with fallback, retention, export."""
