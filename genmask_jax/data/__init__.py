"""Data: the sample store (records), converters (sources), the synthetic set, the VLM feature
store (features) and the grain pipelines that join them (pipeline)."""
