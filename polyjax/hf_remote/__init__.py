"""Files shipped inside Hugging Face exports (read as data, never imported by polyjax)."""
