"""ml_collections config files (each has get_config()) and the model presets they share."""
