"""Data: one store protocol (store) with three row formats: sample records (records), VLM
features (features) and VAE latents (latents, written by encode_latents); converters (sources),
the synthetic set, preprocessing (preprocess) and the grain pipelines that join them (pipeline)."""
