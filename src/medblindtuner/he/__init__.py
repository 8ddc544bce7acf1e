"""he layer of MedBlindTuner."""
