"""training layer of MedBlindTuner."""
