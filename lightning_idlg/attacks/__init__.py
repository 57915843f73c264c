"""What the attacker runs, given only what was shared (a SharedGradient): the GradientInversion module and its
parts (dummy, label strategy, objective, regularizers, optimizer, stopping), FedAvg's replay, and fitting."""
