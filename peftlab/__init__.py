"""peftlab: fine-tune pre-trained models on your own data, measured and reproducible."""

__version__ = "0.1.0"
