"""Converters from public data sets to the sample store, one module per source."""
