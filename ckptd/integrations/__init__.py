"""Framework integrations (optional extras): ``lightning`` (PyTorch Lightning) and ``hf``
(Hugging Face Transformers). Import the submodule you need; each imports its framework."""
