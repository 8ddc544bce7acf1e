"""report layer of MedBlindTuner."""
