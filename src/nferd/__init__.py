"""nferd: Normal Feature-Enhanced Reverse teacher-student Distillation for anomaly detection."""

__version__ = "0.1.0"
