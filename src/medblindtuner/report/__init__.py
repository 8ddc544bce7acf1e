"""Report layer of MedBlindTuner: Markdown/HTML/PNG summaries of plaintext vs encrypted runs."""

from medblindtuner.report.report import build_combined_report, build_report

__all__ = ["build_report", "build_combined_report"]
