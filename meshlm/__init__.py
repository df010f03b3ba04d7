"""meshlm: train and serve language models on an N-D device mesh (data x tensor x pipeline x expert x context)."""

__version__ = "0.1.0"
