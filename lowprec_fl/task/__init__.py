"""The experiment both apps share: configuration, data, model and training loops."""
