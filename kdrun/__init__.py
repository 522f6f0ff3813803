"""kdrun: a knowledge-distillation experiment runner for image classifiers."""
