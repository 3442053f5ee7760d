"""flywheel: an orchestrator for the self-improvement data flywheel of LLM post-training."""

__version__ = "0.1.0"
