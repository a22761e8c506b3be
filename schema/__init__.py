"""What the trainer and the edge daemon share: vocabularies, channels, windows,
the schema hash, typed telemetry rows, the archive reader, the extractor and the
deck's events. Imports nothing from ``trainer`` or ``edge``."""
