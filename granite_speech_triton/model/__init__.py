"""Plain PyTorch model code for Granite Speech 4.1: front end, encoder, projectors, decoders."""
