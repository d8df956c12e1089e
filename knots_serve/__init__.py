"""knots-serve: serve merged LoRA models (KnOTS, Core Space, TIES, DARE, TA) through vLLM."""

__version__ = "0.1.0"
