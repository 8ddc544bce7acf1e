"""data layer of MedBlindTuner."""
