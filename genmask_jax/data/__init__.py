"""Data: one store protocol (store) with three row formats: sample records (records), VLM
features (features) and VAE latents (latents, written by encode_latents); the two tasks (tasks),
mask values and images (masks), the model's square input and back (resize), converters
(sources), the synthetic set, preprocessing (preprocess) and the grain pipelines (pipeline)."""
