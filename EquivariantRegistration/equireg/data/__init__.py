"""Generated training and sample data (nothing is downloaded)."""
