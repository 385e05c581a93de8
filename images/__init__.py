"""Container images: the GPU and CPU bases and one generated image per stage (``python -m images.generate``)."""
