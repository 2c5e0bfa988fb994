"""Using a trained run: opening its directory (`run`), restoring the model (`model`) and
answering queries for masks and images (`queries`)."""
