"""On-device runtime: preprocessing, inference backends and the Predictor. No torch here."""
