"""service layer of MedBlindTuner."""
