"""How a network learns: the Trainer's step, captured steps, the fit loop,
the divergence guard and recovery, callbacks and checkpoints."""

from .loop import StepInterrupt

__all__ = ["StepInterrupt"]
