"""features layer of MedBlindTuner."""
