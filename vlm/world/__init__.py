"""The offline world: the model zoo (`zoo/`), the synthetic fine-grained data (`synth/`) and the demo."""
