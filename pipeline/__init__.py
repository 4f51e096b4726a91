"""FractureNode analysis pipeline: validation, models, explanations, synthetic data, training, evaluation."""
